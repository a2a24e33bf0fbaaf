"""Drive a `SchedulerCore` by hand: a recording Outbox and helpers, no sockets, explicit times.

Every message goes the way the broker sends it: built as a typed message,
turned into a wire header (`to_header`) and msgpack, parsed back (`messages.parse` with
the side's allowed kinds) and handed to the core with `now`. Every message
the core emits is parsed back the same way, so a test also checks that the
core only ever sends well-formed messages.

    h = CoreHarness(expected={"echo1": "echo"})
    h.ready(b"m1", "echo", ops={"get": IDEMPOTENT}, capacity=2)
    h.request(b"\\0a", "r1", "echo", "get", body={"k": 1})
    (d,), _, _ = h.take()                 # dispatches, caller replies, other manager messages since the last look
    h.now = 0.5
    h.reply(b"m1", d, body={"v": 1})
    _, (rep,), _ = h.take()
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from aios import messages
from aios.config import Config
from aios.messages import OpInfo
from aios.protocol import pack, unpack
from aios.scheduler.admission import Admission
from aios.scheduler.core import SchedulerCore
from aios.scheduler.request import BACKEND_CLIENT

#: op flags for `CoreHarness.ready(ops=...)`
PLAIN = OpInfo(idempotent=False, preemptible=False)
IDEMPOTENT = OpInfo(idempotent=True, preemptible=False)
PREEMPTIBLE = OpInfo(idempotent=True, preemptible=True)


@dataclass
class Sent:
    """One message the core handed to its outbox."""

    side: str            # "caller" or "manager"
    to: bytes            # caller's client address or manager's routing id
    header: dict[str, Any]
    body_raw: bytes

    @property
    def body(self) -> Any:
        return unpack(self.body_raw) if self.body_raw else {}

    @property
    def msg(self) -> messages.Message:
        """The typed message (parsed as its receiver would)."""
        if self.side == "manager":
            return messages.parse(self.header, messages.FROM_SCHEDULER_TO_MANAGER)
        return messages.Reply.from_header(self.header)


class RecordingOutbox:
    """The core's Outbox as a list."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.probes: list[tuple[bytes, dict[str, Any]]] = []
        self.shutdowns = 0

    def to_caller(self, client: bytes, msg: messages.Reply | messages.Heartbeat, body_raw: bytes) -> None:
        header = unpack(pack(msg.to_header()))  # as the broker frames it
        if isinstance(msg, messages.Heartbeat):
            self.probes.append((client, header))  # the scheduler checking a caller is still there
            return
        self.sent.append(Sent("caller", client, header, body_raw))

    def to_manager(self, identity: bytes, msg: messages.Message, body_raw: bytes = b"") -> None:
        self.sent.append(Sent("manager", identity, unpack(pack(msg.to_header())), body_raw))

    def shutdown(self) -> None:
        self.shutdowns += 1


@dataclass
class Reply:
    """A reply the core sent to a caller, decoded."""

    to: bytes
    msg: messages.Reply
    body: Any

    @property
    def id(self) -> str | None:
        return self.msg.id

    @property
    def status(self) -> str:
        return self.msg.status

    @property
    def code(self) -> str | None:
        err = self.body.get("error") if isinstance(self.body, dict) else None
        return err["code"] if isinstance(err, dict) else None

    @property
    def message(self) -> str:
        err = self.body.get("error") if isinstance(self.body, dict) else None
        return err["message"] if isinstance(err, dict) else ""

    @property
    def retryable(self) -> bool | None:
        err = self.body.get("error") if isinstance(self.body, dict) else None
        return err["retryable"] if isinstance(err, dict) else None


@dataclass
class Dispatched:
    """A Dispatch the core sent to a manager, with the request body it forwarded."""

    to: bytes
    msg: messages.Dispatch
    body_raw: bytes

    @property
    def id(self) -> str:
        return self.msg.id

    @property
    def body(self) -> Any:
        return unpack(self.body_raw) if self.body_raw else {}


def make_config(**sections: Any) -> Config:
    """A validated Config from sections, e.g. make_config(scheduler={"policy": "las"})."""
    return Config.model_validate(sections)


def _entries(running: Any) -> list[tuple[bytes, str, str | None]]:
    out = []
    for r in running:
        if isinstance(r, Dispatched):
            out.append((r.msg.client, r.id, r.msg.target))
        else:
            out.append(tuple(r))
    return out


def ghosts(n: int, target: str | None = None) -> list[tuple[bytes, str, str | None]]:
    """`n` requests a manager runs that this scheduler never dispatched (from before its restart)."""
    return [(b"\x00old-client", f"old-{i}", target) for i in range(n)]


class CoreHarness:
    def __init__(self, config: Config | None = None, *, expected: dict[str, str] | None = None,
                 admission: Admission | None = None,
                 process_state: Callable[[str], tuple[str, str] | None] | None = None) -> None:
        self.config = config if config is not None else make_config()
        self.out = RecordingOutbox()
        kwargs: dict[str, Any] = {}
        if process_state is not None:
            kwargs["process_state"] = lambda name, fresh=False: process_state(name)
        self.core = SchedulerCore(self.config, self.out, expected=expected, admission=admission, **kwargs)
        self.now = 0.0
        self.core.started_at = self.now  # as the broker does: the scheduler starts at time 0
        self._seen = 0
        self._incarnations = 0

    def _t(self, now: float | None) -> float:
        return self.now if now is None else now

    # ------------------------------------------------------------ from managers
    def manager(self, identity: bytes, msg: Any, body: Any = None, now: float | None = None) -> None:
        """Any manager message, through the wire header and `parse` like the broker does."""
        typed = messages.parse(msg.to_header(), messages.FROM_MANAGER)
        self.core.on_manager(identity, typed, pack(body if body is not None else {}), self._t(now))

    def ready(self, identity: bytes, service: str, *, ops: dict[str, OpInfo], capacity: int = 1,
              targets: tuple[str, ...] | list[str] = (), default: bool = False,
              limits: dict[str, int] | None = None, running: list[Any] = (), name: str | None = None,
              incarnation: str | None = None, now: float | None = None) -> None:
        """`running`: what the manager says it already runs: Dispatched records or (client, id, target)."""
        if incarnation is None:
            self._incarnations += 1
            incarnation = f"inc{self._incarnations}"
        self.manager(identity, messages.Ready(
            name=name or identity.decode(), service=service, capacity=capacity, incarnation=incarnation,
            pid=1000, running=_entries(running), ops=dict(ops), targets=list(targets), default=default,
            limits=dict(limits or {})), now=now)

    def reply(self, identity: bytes, d: Dispatched, *, status: str = "ok", body: Any = None, tokens: int = 0,
              now: float | None = None) -> None:
        self.manager(identity, messages.Reply(d.id, status, client=d.msg.client, tokens=tokens),
                     body if body is not None else {"ok": True}, now)

    def partial(self, identity: bytes, d: Dispatched, body: Any, now: float | None = None) -> None:
        self.manager(identity, messages.Reply(d.id, "partial", client=d.msg.client), body, now)

    def yield_(self, identity: bytes, d: Dispatched, *, affinity: bool = True, tokens: int = 0,
               now: float | None = None) -> None:
        self.manager(identity, messages.Yield(d.id, d.msg.client, affinity=affinity, tokens=tokens), now=now)

    def heartbeat(self, identity: bytes, running: list[Any] | None = None, now: float | None = None) -> None:
        """A manager's heartbeat; `running` (Dispatched records or (client, id, target)) is what it
        says it runs; None sends a heartbeat without a list."""
        self.manager(identity, messages.Heartbeat(running=None if running is None else _entries(running)), now=now)

    def disconnect(self, identity: bytes, now: float | None = None) -> None:
        self.manager(identity, messages.Disconnect(), now=now)

    def call(self, identity: bytes, rid: str, service: str, op: str, *, parent: Dispatched,
             body: Any = None, deadline: float | None = None, target: str | None = None,
             now: float | None = None) -> None:
        """A call made by the handler of `parent` running on manager `identity`."""
        self.manager(identity, messages.Call(id=rid, service=service, op=op, parent=parent.id,
                                             parent_client=parent.msg.client, deadline=deadline, target=target),
                     body, now)

    # -------------------------------------------------------------- from agents
    def request(self, client: bytes, rid: str, service: str, op: str, *, agent: str = "alice", body: Any = None,
                deadline: float | None = None, target: str | None = None, streamed: bool = False,
                now: float | None = None) -> None:
        """`streamed`: a re-send whose caller already holds partials of it."""
        header = messages.Request(id=rid, service=service, op=op, agent=agent, deadline=deadline,
                                  target=target, streamed=streamed).to_header()
        typed = messages.parse(header, messages.FROM_AGENT)
        assert isinstance(typed, messages.Request)
        self.core.on_request(client, typed, pack(body if body is not None else {}), self._t(now))

    def tick(self, now: float | None = None) -> None:
        self.core.tick(self._t(now))

    def client_gone(self, client: bytes, now: float | None = None) -> None:
        self.core.client_gone(client, self._t(now))

    # ----------------------------------------------------------------- looking
    def new(self) -> list[Sent]:
        """What the core sent since the last look."""
        out = self.out.sent[self._seen:]
        self._seen = len(self.out.sent)
        return out

    def take(self) -> tuple[list[Dispatched], list[Reply], list[Sent]]:
        """New dispatches, new replies to callers, and the other new messages to managers."""
        ds: list[Dispatched] = []
        rs: list[Reply] = []
        other: list[Sent] = []
        for s in self.new():
            m = s.msg
            if isinstance(m, messages.Dispatch):
                ds.append(Dispatched(s.to, m, s.body_raw))
            elif s.side == "caller":
                assert isinstance(m, messages.Reply)
                rs.append(Reply(s.to, m, s.body))
            else:
                other.append(s)
        return ds, rs, other


def backend_client(identity: bytes) -> bytes:
    """The client address of calls made by the manager `identity`."""
    return BACKEND_CLIENT + identity
