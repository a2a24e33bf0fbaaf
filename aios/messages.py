"""Typed AIOS messages: one definition per message kind, converted to and from the wire header here.

`aios.protocol` signs and verifies frames and decodes the header map; this
module turns that map into a typed message (and back). Field names, types
and defaults live here and nowhere else: the scheduler, the manager base and
the SDK build and read only these classes. Like the protocol module it
depends on the standard library only (plus `aios.protocol`), so it can be
followed from this file alone.

Who sends what:

    agent    -> scheduler   Request     a system call
    manager  -> scheduler   Call        a system call made by a handler on behalf of its request's agent
    scheduler-> manager     Dispatch    run this request (or resume it)
    manager  -> scheduler   Reply       partial or final answer to a Dispatch (carries `client`, `tokens`)
    scheduler-> agent/mgr   Reply       partial or final answer to a Request/Call (carries `timing`, `reset`)
    manager  -> scheduler   Ready       READY(service, capacity, incarnation, ops, targets, limits)
    manager  -> scheduler   Yield       preempted: put the request back in the queue
    scheduler-> manager     Cancel      stop working on a request / drop what you keep for it
    both ways               Heartbeat   liveness (a manager's lists the requests it is running)
    scheduler-> manager     Reregister  "I do not know you": send READY again
    manager  -> scheduler   Disconnect  leaving on purpose

Every `from_header` checks types and bounds and raises `ProtocolError(BAD_FRAME)`
with a message naming the field; nothing else escapes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Union

from aios.agent_names import agent_name_problem, good_agent_name
from aios.protocol import ErrorCode, Kind, ProtocolError, Status

#: longest string accepted in an identifying header field (ids, names, services, ops, targets)
MAX_NAME = 256
#: longest deadline accepted, in seconds: beyond a week is a mistake, not a plan
MAX_DEADLINE_S = 7 * 24 * 3600.0
#: ops, targets and limits a READY may announce
MAX_READY_ENTRIES = 4096

_REQUEST, _CALL, _DISPATCH = Kind.REQUEST.value, Kind.CALL.value, Kind.DISPATCH.value
_REPLY, _READY, _YIELD, _CANCEL = Kind.REPLY.value, Kind.READY.value, Kind.YIELD.value, Kind.CANCEL.value
_HEARTBEAT, _REREGISTER, _DISCONNECT = Kind.HEARTBEAT.value, Kind.REREGISTER.value, Kind.DISCONNECT.value
_STATUSES = frozenset(s.value for s in Status)


def _bad(message: str, header: dict[str, Any]) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_FRAME, message, header)


def _name(h: dict[str, Any], key: str, default: Any = ...) -> Any:
    """A required (or defaulted) non-empty string of at most MAX_NAME characters."""
    v = h.get(key, default)
    if v is ...:
        raise _bad(f"header field {key!r} is missing", h)
    if v is default and default is not ...:
        return v
    if type(v) is not str or not v or len(v) > MAX_NAME:
        raise _bad(f"header field {key!r} must be a non-empty string of at most {MAX_NAME} characters", h)
    return v


def _opt_name(h: dict[str, Any], key: str) -> str | None:
    v = h.get(key)
    if v is None:
        return None
    if type(v) is not str or not v or len(v) > MAX_NAME:
        raise _bad(f"header field {key!r} must be a non-empty string of at most {MAX_NAME} characters", h)
    return v


def _bytes(h: dict[str, Any], key: str) -> bytes:
    v = h.get(key)
    if type(v) is not bytes or len(v) > MAX_NAME:
        raise _bad(f"header field {key!r} must be bytes", h)
    return v


def _int(h: dict[str, Any], key: str, default: int = 0, lo: int = 0, hi: int = 1 << 31) -> int:
    v = h.get(key, default)
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(f"header field {key!r} must be an integer from {lo} to {hi}", h)
    return v


def _bool(h: dict[str, Any], key: str) -> bool:
    v = h.get(key, False)
    if type(v) is not bool:
        raise _bad(f"header field {key!r} must be true or false", h)
    return v


RunningEntry = tuple[bytes, str, "str | None"]  # (client, request id, target) of a request a manager runs


def _running(h: dict[str, Any], key: str) -> list[RunningEntry] | None:
    """A manager's list of the requests it is running: [[client, id, target], ...]."""
    v = h.get(key)
    if v is None:
        return None
    if type(v) is not list or len(v) > MAX_READY_ENTRIES:
        raise _bad(f"header field {key!r} must be a list of [client, id, target]", h)
    out: list[RunningEntry] = []
    for e in v:
        if (type(e) is not list or len(e) != 3 or type(e[0]) is not bytes or len(e[0]) > MAX_NAME
                or type(e[1]) is not str or not 0 < len(e[1]) <= MAX_NAME
                or (e[2] is not None and (type(e[2]) is not str or len(e[2]) > MAX_NAME))):
            raise _bad(f"header field {key!r} must be a list of [client, id, target]", h)
        out.append((e[0], e[1], e[2]))
    return out


def check_deadline(value: Any) -> float | None:
    """A deadline in seconds from now: None, or a finite number in (0, MAX_DEADLINE_S].

    NaN and infinities are refused: a NaN compares false with everything and
    would stop deadline expiry for every request queued behind it.
    """
    if value is None:
        return None
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 < value <= MAX_DEADLINE_S:
        raise ValueError(f"a deadline must be a finite number of seconds in (0, {MAX_DEADLINE_S:.0f}]")
    return float(value)


def _agent(h: dict[str, Any]) -> str:
    """The agent a request names, which must follow the agent-name rule (`aios.agent_names`)."""
    v = _name(h, "agent")
    problem = agent_name_problem(v)
    if problem is not None:
        raise _bad(f"header field 'agent': {problem}", h)
    return v


def _deadline(h: dict[str, Any]) -> float | None:
    try:
        return check_deadline(h.get("deadline"))
    except ValueError as exc:
        raise _bad(f"header field 'deadline': {exc}", h) from None


# --------------------------------------------------------------------------- calls


@dataclass(slots=True)
class Request:
    """agent -> scheduler: a system call. `deadline` is seconds from when the scheduler receives it.

    `streamed`: the caller already holds partial replies for this request id (it is re-sending it,
    after a scheduler restart). A scheduler that must run it again from the start sends a `reset`
    first; one that finds it still running (and adopts it) sends none.
    """

    KIND: ClassVar[str] = _REQUEST
    id: str
    service: str
    op: str
    agent: str
    deadline: float | None = None
    target: str | None = None
    streamed: bool = False

    def to_header(self) -> dict[str, Any]:
        h: dict[str, Any] = {"kind": _REQUEST, "id": self.id, "agent": self.agent,
                             "service": self.service, "op": self.op}
        if self.deadline is not None:
            h["deadline"] = self.deadline
        if self.target is not None:
            h["target"] = self.target
        if self.streamed:
            h["streamed"] = True
        return h

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> "Request":
        # The hot path of every system call: the common well-formed case is checked inline
        # (measured: the generic helpers cost ~3 µs per request in the scheduler).
        rid, service, op, agent = h.get("id"), h.get("service"), h.get("op"), h.get("agent")
        deadline, target = h.get("deadline"), h.get("target")
        if (type(rid) is str and type(service) is str and type(op) is str and type(agent) is str
                and 0 < len(rid) <= MAX_NAME and 0 < len(service) <= MAX_NAME and 0 < len(op) <= MAX_NAME
                and good_agent_name(agent) and target is None and h.get("streamed") is None
                and (deadline is None or (type(deadline) is float and 0.0 < deadline <= MAX_DEADLINE_S))):
            return cls(rid, service, op, agent, deadline, None)
        return cls(id=_name(h, "id"), service=_name(h, "service"), op=_name(h, "op"),
                   agent=_agent(h), deadline=_deadline(h), target=_opt_name(h, "target"),
                   streamed=_bool(h, "streamed"))


@dataclass(slots=True)
class Call:
    """manager -> scheduler: a system call a handler makes while serving request `parent`.

    It is made on behalf of the parent request's agent (the scheduler takes the
    agent from the parent, never from the caller), queued and charged like the
    agent's own calls, and bounded by the parent's deadline.
    """

    KIND: ClassVar[str] = _CALL
    id: str
    service: str
    op: str
    parent: str
    parent_client: bytes
    deadline: float | None = None
    target: str | None = None

    def to_header(self) -> dict[str, Any]:
        h: dict[str, Any] = {"kind": _CALL, "id": self.id, "service": self.service, "op": self.op,
                             "parent": self.parent, "parent_client": self.parent_client}
        if self.deadline is not None:
            h["deadline"] = self.deadline
        if self.target is not None:
            h["target"] = self.target
        return h

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> "Call":
        return cls(id=_name(h, "id"), service=_name(h, "service"), op=_name(h, "op"), parent=_name(h, "parent"),
                   parent_client=_bytes(h, "parent_client"), deadline=_deadline(h), target=_opt_name(h, "target"))


@dataclass(slots=True)
class Dispatch:
    """scheduler -> manager: run request `id` of `client` for `agent`.

    `attempt` counts runs lost to a manager's death plus one; `resume` says a
    saved context of this request should be here; `slice` is how many tokens a
    preemptible op may produce before yielding (None: run to completion);
    `deadline` is seconds left; `caller` is the service of the manager that
    made the call (None when an agent did).
    """

    KIND: ClassVar[str] = _DISPATCH
    id: str
    client: bytes
    agent: str
    service: str
    op: str
    target: str | None = None
    attempt: int = 1
    resume: bool = False
    slice: int | None = None
    deadline: float | None = None
    caller: str | None = None

    def to_header(self) -> dict[str, Any]:
        return {"kind": _DISPATCH, "id": self.id, "client": self.client, "agent": self.agent,
                "service": self.service, "op": self.op, "target": self.target, "attempt": self.attempt,
                "resume": self.resume, "slice": self.slice, "deadline": self.deadline, "caller": self.caller}

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> "Dispatch":
        # Every system call's hot path on the manager side: the common case (an agent's request,
        # first attempt, run to completion) is checked inline, as in Request.from_header
        # (measured: 0.6 us against 3.4 us through the helpers below).
        rid, client, agent, service, op = h.get("id"), h.get("client"), h.get("agent"), h.get("service"), h.get("op")
        deadline, attempt = h.get("deadline"), h.get("attempt", 1)
        if (type(rid) is str and type(client) is bytes and type(agent) is str and type(service) is str
                and type(op) is str and 0 < len(rid) <= MAX_NAME and len(client) <= MAX_NAME
                and 0 < len(agent) <= MAX_NAME and 0 < len(service) <= MAX_NAME and 0 < len(op) <= MAX_NAME
                and h.get("target") is None and type(attempt) is int and attempt == 1
                and h.get("resume", False) is False
                and h.get("slice") is None and h.get("caller") is None
                and (deadline is None or (type(deadline) is float and math.isfinite(deadline)))):
            return cls(rid, client, agent, service, op, None, 1, False, None, deadline, None)
        slice_ = h.get("slice")
        if slice_ is not None and (type(slice_) is not int or slice_ < 1):
            raise _bad("header field 'slice' must be a positive integer or null", h)
        deadline = h.get("deadline")
        if deadline is not None and (type(deadline) not in (int, float) or not math.isfinite(deadline)):
            raise _bad("header field 'deadline' must be a finite number or null", h)
        return cls(id=_name(h, "id"), client=_bytes(h, "client"), agent=_name(h, "agent"),
                   service=_name(h, "service"), op=_name(h, "op"), target=_opt_name(h, "target"),
                   attempt=_int(h, "attempt", 1, 1), resume=_bool(h, "resume"), slice=slice_,
                   deadline=float(deadline) if deadline is not None else None, caller=_opt_name(h, "caller"))


_TIMING_FIELDS = ("wait_s", "first_wait_s", "run_s", "turnaround_s", "preemptions", "attempts")


@dataclass(frozen=True, slots=True, eq=False)  # eq: Mapping's (a Timing equals a map of the same figures)
class Timing(Mapping[str, float]):
    """What the scheduler measured about a finished call, in seconds (and counts).

    `wait_s`: time queued or held, all slices together; `first_wait_s`: until its first dispatch;
    `run_s`: time on managers; `turnaround_s`: arrival to answer; `preemptions`: slices it yielded;
    `attempts`: dispatches (more than preemptions + 1 when a manager died under it).
    It reads as attributes (`timing.wait_s`) and, for code written before it was typed, as a
    read-only map (`timing["wait_s"]`, `dict(timing)`).
    """

    wait_s: float = 0.0
    first_wait_s: float = 0.0
    run_s: float = 0.0
    turnaround_s: float = 0.0
    preemptions: int = 0
    attempts: int = 0

    def __getitem__(self, key: str) -> float:
        if key not in _TIMING_FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_TIMING_FIELDS)

    def __len__(self) -> int:
        return len(_TIMING_FIELDS)

    def to_wire(self) -> dict[str, float]:
        return {f: getattr(self, f) for f in _TIMING_FIELDS}

    @classmethod
    def from_wire(cls, v: Any, h: dict[str, Any]) -> "Timing":
        if type(v) is not dict:
            raise _bad("header field 'timing' must be a map", h)
        values: dict[str, Any] = {}
        for f in _TIMING_FIELDS:
            x = v.get(f, 0)
            if type(x) not in (int, float) or not math.isfinite(x):
                raise _bad(f"header field 'timing.{f}' must be a finite number", h)
            values[f] = x
        return cls(**values)


@dataclass(slots=True)
class Reply:
    """A partial or final answer.

    manager -> scheduler: `client` names the request's caller, `tokens` the service
    units this run consumed (LLM tokens).
    scheduler -> caller: `timing` (final replies) and `reset` (a partial that says
    the call restarted and what was streamed so far must be discarded).
    `id` is None only in the answer to a frame whose id could not be read.
    """

    KIND: ClassVar[str] = _REPLY
    id: str | None
    status: str
    client: bytes | None = None
    tokens: int = 0
    timing: Timing | None = None
    reset: bool = False

    @property
    def final(self) -> bool:
        return self.status != Status.PARTIAL.value

    def to_header(self) -> dict[str, Any]:
        h: dict[str, Any] = {"kind": _REPLY, "id": self.id, "status": self.status}
        if self.client is not None:
            h["client"] = self.client
        if self.tokens:
            h["tokens"] = self.tokens
        if self.timing is not None:
            h["timing"] = self.timing.to_wire()
        if self.reset:
            h["reset"] = True
        return h

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> "Reply":
        rid = h.get("id")
        if rid is not None and (type(rid) is not str or len(rid) > MAX_NAME):
            raise _bad("header field 'id' must be a string or null", h)
        status = h.get("status")
        if type(status) is not str or status not in _STATUSES:
            raise _bad(f"header field 'status' must be one of {sorted(_STATUSES)}", h)
        client = h.get("client")
        if client is not None and type(client) is not bytes:
            raise _bad("header field 'client' must be bytes", h)
        timing, tokens, reset = h.get("timing"), h.get("tokens", 0), h.get("reset", False)
        if type(tokens) is not int or not 0 <= tokens <= 1 << 31:
            tokens = _int(h, "tokens")  # raises, naming the field
        if type(reset) is not bool:
            reset = _bool(h, "reset")
        return cls(rid, status, client, tokens, Timing.from_wire(timing, h) if timing is not None else None, reset)


# --------------------------------------------------------------------------- manager control


@dataclass(slots=True)
class OpInfo:
    """What the scheduler must know about an op: may it be repeated, may it be preempted."""

    idempotent: bool = False
    preemptible: bool = False

    def to_wire(self) -> dict[str, bool]:
        return {"idempotent": self.idempotent, "preemptible": self.preemptible}


@dataclass(slots=True)
class Ready:
    """manager -> scheduler: READY(service, capacity, incarnation) plus what it serves.

    `targets` are the resources within the service this manager serves (the
    models of an LLM core, the tools of the tool manager); a request naming a
    target goes only to a manager that lists it. `idempotent_targets` are
    targets whose requests are safe to repeat whatever the op says (a tool
    that declares itself so). `default` marks the manager
    for requests that name no target. `limits` caps how many requests per
    target may run at once (a tool's concurrency limit). `running` lists the
    requests it is already running (after a scheduler restart: work the new
    scheduler never saw, which still occupies its slots). `health` is
    "ok" or "degraded" with `detail` saying why (a remote LLM server that
    does not answer).
    """

    KIND: ClassVar[str] = _READY
    name: str
    service: str
    capacity: int
    incarnation: str
    pid: int = 0
    running: list[RunningEntry] = field(default_factory=list)
    ops: dict[str, OpInfo] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    default: bool = False
    limits: dict[str, int] = field(default_factory=dict)
    idempotent_targets: list[str] = field(default_factory=list)
    health: str = "ok"
    detail: str = ""

    def to_header(self) -> dict[str, Any]:
        return {"kind": _READY, "name": self.name, "service": self.service, "capacity": self.capacity,
                "incarnation": self.incarnation, "pid": self.pid, "running": [list(e) for e in self.running],
                "ops": {n: o.to_wire() for n, o in self.ops.items()}, "targets": list(self.targets),
                "default": self.default, "limits": dict(self.limits), "idempotent_targets": list(self.idempotent_targets),
                "health": self.health, "detail": self.detail}

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> "Ready":
        ops_raw, targets, limits = h.get("ops", {}), h.get("targets", []), h.get("limits", {})
        idem = h.get("idempotent_targets", [])
        if type(ops_raw) is not dict or len(ops_raw) > MAX_READY_ENTRIES:
            raise _bad("header field 'ops' must be a map of op names", h)
        ops: dict[str, OpInfo] = {}
        for name, info in ops_raw.items():
            if not name or len(name) > MAX_NAME or type(info) is not dict:
                raise _bad(f"READY op {name!r} is malformed", h)
            flags = (info.get("idempotent", False), info.get("preemptible", False))
            if any(type(f) is not bool for f in flags):
                raise _bad(f"READY op {name!r}: idempotent and preemptible must be true or false", h)
            ops[name] = OpInfo(*flags)
        if type(targets) is not list or len(targets) > MAX_READY_ENTRIES or any(
                type(t) is not str or not t or len(t) > MAX_NAME for t in targets):
            raise _bad("header field 'targets' must be a list of names", h)
        if type(idem) is not list or len(idem) > MAX_READY_ENTRIES or any(type(t) is not str for t in idem):
            raise _bad("header field 'idempotent_targets' must be a list of names", h)
        if type(limits) is not dict or len(limits) > MAX_READY_ENTRIES or any(
                type(v) is not int or v < 1 for v in limits.values()):
            raise _bad("header field 'limits' must map names to positive integers", h)
        health = h.get("health", "ok")
        if health not in ("ok", "degraded"):
            raise _bad("header field 'health' must be 'ok' or 'degraded'", h)
        detail = h.get("detail", "")
        if type(detail) is not str:
            raise _bad("header field 'detail' must be a string", h)
        return cls(name=_name(h, "name"), service=_name(h, "service"), capacity=_int(h, "capacity", 1, 1, 1 << 16),
                   incarnation=_name(h, "incarnation"), pid=_int(h, "pid"), running=_running(h, "running") or [],
                   ops=ops,
                   targets=list(targets), default=_bool(h, "default"), limits=dict(limits),
                   idempotent_targets=list(idem), health=health,
                   detail=detail[:1000])


@dataclass(slots=True)
class Yield:
    """manager -> scheduler: the request's slice ran out; queue it again.

    `affinity`: this manager keeps the request's saved context, so the request
    must come back here.
    """

    KIND: ClassVar[str] = _YIELD
    id: str
    client: bytes
    affinity: bool = True
    tokens: int = 0

    def to_header(self) -> dict[str, Any]:
        return {"kind": _YIELD, "id": self.id, "client": self.client, "affinity": self.affinity,
                "tokens": self.tokens}

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> "Yield":
        return cls(id=_name(h, "id"), client=_bytes(h, "client"), affinity=_bool(h, "affinity"),
                   tokens=_int(h, "tokens"))


@dataclass(slots=True)
class Cancel:
    """scheduler -> manager: stop running request (`id`, `client`), or drop what is kept for it."""

    KIND: ClassVar[str] = _CANCEL
    id: str
    client: bytes

    def to_header(self) -> dict[str, Any]:
        return {"kind": _CANCEL, "id": self.id, "client": self.client}

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> "Cancel":
        return cls(id=_name(h, "id"), client=_bytes(h, "client"))


@dataclass(slots=True)
class Heartbeat:
    """Liveness, both ways. A manager's heartbeat lists the requests it is running
    ([client, id, target] each), so the scheduler's view of its free capacity follows what really
    runs there (cancelled handlers still finishing, work from before a scheduler restart)."""

    KIND: ClassVar[str] = _HEARTBEAT
    running: list[RunningEntry] | None = None

    def to_header(self) -> dict[str, Any]:
        if self.running is None:
            return {"kind": _HEARTBEAT}
        return {"kind": _HEARTBEAT, "running": [list(e) for e in self.running]}

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> "Heartbeat":
        return cls(running=_running(h, "running"))


@dataclass(slots=True)
class Reregister:
    """scheduler -> manager: the scheduler does not know this manager (it restarted): send READY."""

    KIND: ClassVar[str] = _REREGISTER

    def to_header(self) -> dict[str, Any]:
        return {"kind": _REREGISTER}

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> "Reregister":
        return cls()


@dataclass(slots=True)
class Disconnect:
    """manager -> scheduler: leaving on purpose; fail or re-queue what I was running.
    `reason` "stopping" means the manager was asked to stop (the kernel is shutting down)."""

    KIND: ClassVar[str] = _DISCONNECT
    reason: str = ""

    def to_header(self) -> dict[str, Any]:
        return {"kind": _DISCONNECT, "reason": self.reason} if self.reason else {"kind": _DISCONNECT}

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> "Disconnect":
        reason = h.get("reason", "")
        if type(reason) is not str or len(reason) > MAX_NAME:
            raise _bad("header field 'reason' must be a short string", h)
        return cls(reason)


Message = Union[Request, Call, Dispatch, Reply, Ready, Yield, Cancel, Heartbeat, Reregister, Disconnect]

_BY_KIND: dict[str, Any] = {c.KIND: c for c in (Request, Call, Dispatch, Reply, Ready, Yield, Cancel, Heartbeat,
                                                 Reregister, Disconnect)}
#: what each side may receive
FROM_AGENT = frozenset({_REQUEST})
FROM_MANAGER = frozenset({_CALL, _REPLY, _READY, _YIELD, _HEARTBEAT, _DISCONNECT})
FROM_SCHEDULER_TO_MANAGER = frozenset({_DISPATCH, _REPLY, _CANCEL, _HEARTBEAT, _REREGISTER})
#: what a caller (an agent, the supervisor's probe) receives: answers, and the scheduler's liveness probe
TO_CALLER = frozenset({_REPLY, _HEARTBEAT})


def parse(header: dict[str, Any], allowed: frozenset[str]) -> Message:
    """The typed message a verified header carries; BAD_FRAME if its kind is not `allowed` here.

    An agent's header may omit "kind" (it can only be a request)."""
    kind = header.get("kind", _REQUEST if allowed is FROM_AGENT else None)
    if type(kind) is not str or kind not in allowed:
        what = "agents may only send requests" if allowed is FROM_AGENT else "unexpected message kind"
        raise _bad(f"{what}, not {kind!r}", header)
    return _BY_KIND[kind].from_header(header)


def request_id_of(header: dict[str, Any] | None) -> str | None:
    """The request id a header carries, if it is a string: what an error answer to a frame that
    failed parsing can still name, so the caller matches the refusal to its call (even an id too
    long or empty to accept is echoed back: the caller chose it)."""
    rid = header.get("id") if isinstance(header, dict) else None
    return rid if type(rid) is str else None
