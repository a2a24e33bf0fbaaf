"""The scheduler's core: every scheduling decision, with no sockets.

The broker (`aios.scheduler.broker`) is a thin shell around this object: it
receives frames, verifies and parses them into typed messages
(`aios.messages`), hands them to the core with the current time, and sends
whatever the core puts in its `Outbox`. Everything else lives here, as plain
objects that unit tests drive directly:

- the manager registry and credit (`registry.py`): a manager gets work only
  while it has free capacity, and only requests it may run (its targets, the
  per-target limits it announced, the affinity of a saved context);
- one ready queue per service, ordered by the scheduling policy (`policies.py`);
- the admission step (`admission.py`) between validation and queueing;
- the request lifecycle (`request.py`) with guarded transitions, deadlines,
  preemption (yield and requeue), cancellation when a caller goes away, the
  reply cache that answers retried request ids, and the fate of a dead
  manager's work (re-queued when safe to repeat, at most `max_requeues`
  times; else an error that is not retryable, since it may have run);
- after a restart, runs its managers still hold are adopted by the callers'
  re-sends instead of being run twice (`adoption.py`);
- calls between managers: a handler's call is queued and charged like the
  agent's own, on behalf of the agent of the request it serves, within that
  request's deadline; a call that would wait on a service already waiting
  for it (a cycle) is refused with CALL_CYCLE instead of deadlocking a
  thread pool;
- the built-in `kernel` service (ping, status, shutdown).

What managers tell the scheduler (READY, replies, yields, their loss) is
handled in `manager_side.py`, a part of this class kept in a file of its own.
"""
from __future__ import annotations

import heapq
import logging
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Protocol

from aios.config import Config
from aios.messages import (
    Call,
    Cancel,
    Dispatch,
    Heartbeat,
    Reply,
    Request,
    Reregister,
    Timing,
)
from aios.protocol import ErrorCode, Status, error_body, pack
from aios.scheduler.admission import Admission, Decision, make_admission
from aios.scheduler.manager_side import ManagerSide
from aios.scheduler.adoption import Adoption
from aios.scheduler.nesting import Refusal, place_call
from aios.scheduler.policies import Policy, make_policy
from aios.scheduler.registry import ManagerRecord, ManagerRegistry
from aios.scheduler.request import BACKEND_CLIENT, Job, State
from aios.scheduler.status import KERNEL, ServiceStats, kernel_status
from aios.scheduler.supervised import WILL_NOT_SERVE, exited, service_down

log = logging.getLogger("aios.scheduler")

KERNEL_OPS = ("ops", "ping", "shutdown", "status")
#: rough per-entry overhead of a cached reply beyond its body, for the byte bound
_CACHE_ENTRY_BYTES = 200

_OK, _PARTIAL, _ERROR = Status.OK.value, Status.PARTIAL.value, Status.ERROR.value
_PONG = pack({"pong": True})
_CALLER_HEARTBEAT = Heartbeat()


class Outbox(Protocol):
    """Where the core's messages go (the broker's sockets; a list in unit tests)."""

    def to_caller(self, client: bytes, msg: Reply | Heartbeat, body_raw: bytes) -> None:
        """To an agent (frontend routing id) or a manager's call (BACKEND_CLIENT + its routing id)."""

    def to_manager(self, identity: bytes, msg: Dispatch | Cancel | Heartbeat | Reregister,
                   body_raw: bytes = b"") -> None: ...

    def shutdown(self) -> None:
        """`kernel.shutdown` was called: ask the supervisor to stop the kernel."""


class SchedulerCore(ManagerSide):
    """All scheduling state and decisions. Call its `on_*` methods with `now = time.monotonic()`.

    `expected` maps each configured manager process to its service, so that a
    request for a service whose managers have not registered yet waits in its
    queue instead of being refused as unknown. `process_state(name)` (from the
    supervisor's table) lets the core answer at once when a service's only
    managers cannot serve (FATAL, crash-looping).
    """

    def __init__(self, config: Config, outbox: Outbox, *, expected: dict[str, str] | None = None,
                 admission: Admission | None = None,
                 process_state: Callable[..., tuple[str, str] | None] = lambda name, fresh=False: None,
                 extra_status: Callable[[], dict[str, Any]] = dict) -> None:
        self.config = config
        self.out = outbox
        k = config.kernel
        self.hb_interval = k.heartbeat_interval_s
        self.hb_expiry = k.heartbeat_interval_s * k.heartbeat_liveness
        self.expected = dict(expected or {})
        self.expected_services = {KERNEL} | set(self.expected.values())
        self.admission = admission if admission is not None else make_admission(config)
        self.process_state = process_state
        self.extra_status = extra_status
        self.registry = ManagerRegistry()
        self.queues: dict[str, Policy] = {}
        self.pending: dict[tuple[bytes, str], Job] = {}
        self.by_client: dict[bytes, set[Job]] = defaultdict(set)
        self.queued_agents: dict[str, int] = defaultdict(int)
        self.held: dict[tuple[bytes, str], Job] = {}
        self.deadlines: list[tuple[float, int, Job]] = []
        self.reply_cache: OrderedDict[tuple[bytes, str], tuple[Reply, bytes]] = OrderedDict()
        self.reply_cache_bytes = 0
        self.stats: dict[str, ServiceStats] = defaultdict(ServiceStats)
        self.stopping = False
        self.started_at: float | None = None
        self._probed: dict[bytes, float] = {}
        self.adoption = Adoption(self)

    # ------------------------------------------------------------ view (admission)
    def queued_by_agent(self, agent: str) -> int:
        return self.queued_agents.get(agent, 0)

    def queued(self, service: str) -> int:
        q = self.queues.get(service)
        return len(q) if q is not None else 0

    def queue(self, service: str) -> Policy:
        q = self.queues.get(service)
        if q is None:
            q = self.queues[service] = make_policy(self.config.scheduler)
        return q

    # ------------------------------------------------------------------ replies
    def _reply(self, client: bytes, msg: Reply | Heartbeat, body_raw: bytes) -> None:
        self.out.to_caller(client, msg, body_raw)

    def reply_error(self, client: bytes, rid: Any, code: ErrorCode, message: str,
                    timing: Timing | None = None, retryable: bool | None = None) -> None:
        rid = rid if isinstance(rid, str) else None
        self._reply(client, Reply(rid, _ERROR, timing=timing), pack(error_body(code, message, retryable)))

    # -------------------------------------------------------------------- intake
    def on_request(self, client: bytes, msg: Request | Call, body_raw: bytes, now: float,
                   caller: ManagerRecord | None = None) -> None:
        """A system call from an agent (`msg` a Request) or from a manager's handler (a Call)."""
        key = (client, msg.id)
        if key in self.pending:
            return  # a re-sent request we are still working on: its reply will come
        cached = self.reply_cache.get(key)
        if cached is not None:
            self._reply(client, cached[0], cached[1])
            return
        service, op = msg.service, msg.op
        if service == KERNEL:
            return self.on_kernel(client, msg.id, op, now)
        if self.stopping:
            return self.reply_error(client, msg.id, ErrorCode.SHUTTING_DOWN, "the kernel is shutting down")
        managers = self.registry.of(service)
        if managers and self._drop_exited(managers, now):
            managers = self.registry.of(service)
        if not managers:
            if service not in self.expected_services:
                known = sorted(self.expected_services | self.registry.services())
                return self.reply_error(client, msg.id, ErrorCode.UNKNOWN_SERVICE,
                                        f"unknown service {service!r}; services: {known}")
            why = self.unavailable_reason(service)
            if why:
                return self.reply_error(client, msg.id, ErrorCode.UNAVAILABLE, why)
        info = ManagerRegistry.op_info(managers, op) if managers else None
        if managers and info is None:
            ops = sorted({o for m in managers for o in m.ops})
            return self.reply_error(client, msg.id, ErrorCode.UNKNOWN_OP,
                                    f"service {service!r} has no op {op!r}; ops: {ops}")
        target = msg.target
        if target is not None and managers and not any(target in m.targets for m in managers):
            known_targets = sorted({t for m in managers for t in m.targets})
            return self.reply_error(client, msg.id, ErrorCode.UNKNOWN_TARGET,
                                    f"no {service} manager serves {target!r}; available: {known_targets}")
        parent: Job | None = None
        agent: str
        deadline = msg.deadline
        if isinstance(msg, Call):
            assert caller is not None
            placed = place_call(msg, caller, now)
            if isinstance(placed, Refusal):
                return self.reply_error(client, msg.id, placed.code, placed.message)
            parent, deadline = placed
            agent = parent.agent
        else:
            agent = msg.agent
        q = self.queue(service)
        if len(q) >= self.config.kernel.max_queue:
            return self.reply_error(client, msg.id, ErrorCode.OVERLOADED,
                                    f"the {service} queue is full ({len(q)} requests, [kernel] max_queue)")
        req = Job(id=msg.id, client=client, agent=agent, service=service, op=op, body_raw=body_raw,
                      created=now, target=target, deadline=now + deadline if deadline is not None else None,
                      idempotent=bool(info and info.idempotent), preemptible=bool(info and info.preemptible),
                      parent=parent, caller=caller.service if caller is not None else None,
                      streamed=isinstance(msg, Request) and msg.streamed)
        decision = self.admission.admit(req, self)
        if decision.verdict == "deny":
            req.move(State.FAILED)
            assert decision.code is not None
            return self.reply_error(client, msg.id, decision.code, decision.message)
        self.pending[key] = req
        self.by_client[client].add(req)
        if parent is not None:
            if parent.children is None:
                parent.children = set()
            parent.children.add(req)
        self.stats[service].submitted += 1
        if req.deadline is not None:
            heapq.heappush(self.deadlines, (req.deadline, req.arrival, req))
        if decision.verdict == "hold":
            req.move(State.HELD)
            self.held[key] = req
            log.info("request %s (%s.%s for %s) held: %s", req.id, service, op, agent, decision.message)
            return
        self._enqueue(req)
        self.adoption.bind(req, now)
        self.dispatch(service, now)

    def unavailable_reason(self, service: str) -> str | None:
        """Why nothing can serve `service` now, if the supervisor says its processes are down for good."""
        return service_down(self.expected, self.process_state, service)

    def _drop_exited(self, managers: list[ManagerRecord], now: float) -> bool:
        """Forget registrations whose process has exited (`supervised.exited`); whether any was."""
        gone = exited(managers, self.process_state)
        for mgr, state in gone:
            self.manager_lost(mgr, f"its process is {state}", now)
        return bool(gone)

    def _answer_unservable(self, now: float) -> None:
        """Requests queued for a service that will not serve again (each of its processes FATAL or
        stopped, however it got there) are answered UNAVAILABLE now, not at their deadline."""
        for service, q in list(self.queues.items()):
            if not q or self.registry.of(service):
                continue
            why = service_down(self.expected, self.process_state, service, WILL_NOT_SERVE)
            if why:
                for req in list(q):
                    self._fail(req, ErrorCode.UNAVAILABLE, why, now)

    def _enqueue(self, req: Job, requeue: bool = False) -> None:
        req.move(State.QUEUED)
        q = self.queue(req.service)
        q.requeue(req) if requeue else q.push(req)
        self.queued_agents[req.agent] += 1

    def _dequeued(self, req: Job) -> None:
        n = self.queued_agents.get(req.agent, 0) - 1
        if n > 0:
            self.queued_agents[req.agent] = n
        else:
            self.queued_agents.pop(req.agent, None)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, service: str, now: float) -> None:
        q = self.queues.get(service)
        if not q:
            return
        managers = self.registry.of(service)
        if not managers or not self.adoption.settled(service, now):
            return
        pick = ManagerRegistry.pick
        while True:
            req = q.pop(lambda cls: pick(managers, cls[0], cls[1]) is not None)
            if req is None:
                return
            self._dequeued(req)
            if req.deadline is not None and req.deadline <= now:
                # its deadline passed between the last expiry sweep and this free slot
                self._fail(req, ErrorCode.DEADLINE_EXCEEDED,
                           f"deadline passed after {now - req.created:.3f}s (still queued)", now)
                continue
            mgr = pick(managers, req.target, req.affinity)
            assert mgr is not None
            self._start(req, mgr, q, now)

    def _start(self, req: Job, mgr: ManagerRecord, q: Policy, now: float) -> None:
        info = mgr.ops.get(req.op)
        if info is not None:  # a request queued before its manager registered learns its op's nature here
            req.preemptible = info.preemptible
        req.idempotent = mgr.safe_to_repeat(req.op, req.target)
        if req.streamed and not req.attempts:
            self._reset_stream(req)  # the caller holds partials of a run from before a restart: starting over
        req.move(State.RUNNING)
        if req.started is None:
            req.started = now
        req.dispatched_at = now
        req.attempts += 1
        req.manager = mgr.identity
        resume = req.affinity is not None
        mgr.add(req)
        d = Dispatch(id=req.id, client=req.client, agent=req.agent, service=req.service, op=req.op,
                     target=req.target, attempt=req.failures + 1, resume=resume,
                     slice=q.slice_tokens(req) if req.preemptible else None,
                     deadline=(req.deadline - now) if req.deadline is not None else None, caller=req.caller)
        mgr.last_sent = now
        self.out.to_manager(mgr.identity, d, req.body_raw)

    # ------------------------------------------------------------------ endings
    def _forget(self, req: Job, now: float) -> None:
        """Remove a finished request from the books, drop its body, cancel calls it left running."""
        self.pending.pop(req.key, None)
        peers = self.by_client.get(req.client)
        if peers is not None:
            peers.discard(req)
            if not peers:
                del self.by_client[req.client]
        self.held.pop(req.key, None)
        if req.parent is not None and req.parent.children is not None:
            req.parent.children.discard(req)
        req.release_body()
        if req.children:
            for child in list(req.children):
                if child.live:
                    self._fail(child, ErrorCode.CANCELLED,
                               f"the request that made this call ({req.service}.{req.op}) has ended", now)
            req.children = None

    def _fail(self, req: Job, code: ErrorCode, message: str, now: float, retryable: bool | None = None) -> None:
        """Answer a live request with an error, wherever it is (held, queued, running)."""
        if not req.live:
            return
        self._cancel_quietly(req, now)
        self.reply_error(req.client, req.id, code, message, req.timing(), retryable)

    def _cancel_on_manager(self, req: Job, now: float) -> None:
        """Tell the manager running the request (or keeping its saved context) to let go of it."""
        target = req.manager or req.affinity
        mgr = self.registry.get(target) if target else None
        if mgr is not None:
            # until the manager says its handler returned, the slot stays counted (a ghost)
            if req.manager is not None and mgr.discard(req, still_running=True):
                req.run_s += now - (req.dispatched_at if req.dispatched_at is not None else now)
            self.out.to_manager(mgr.identity, Cancel(req.id, req.client))
        req.manager = None
        req.affinity = None

    def client_gone(self, client: bytes, now: float) -> None:
        """A caller disconnected (or a manager that made calls died): cancel all its work."""
        reqs = self.by_client.pop(client, None)
        if not reqs:
            return
        services = {r.service for r in reqs}
        for req in list(reqs):
            if not req.live:
                continue
            self._cancel_quietly(req, now)
        if not client.startswith(BACKEND_CLIENT):
            log.info("agent connection %r gone; %d pending request(s) cancelled", client[:8], len(reqs))
        for service in services:
            self.dispatch(service, now)

    def _cancel_quietly(self, req: Job, now: float) -> None:
        """Like _fail, but nobody is there to answer."""
        if req.state == State.QUEUED:
            q = self.queues.get(req.service)
            if q is not None and q.remove(req):
                self._dequeued(req)
        elif req.state == State.HELD:
            self.admission.forget(req)
        self._cancel_on_manager(req, now)
        req.move(State.FAILED)
        req.finished = now
        self.stats[req.service].errors += 1
        self._forget(req, now)

    def _cache(self, req: Job, reply: Reply, body_raw: bytes) -> None:
        k = self.config.kernel
        if k.reply_cache <= 0:
            return
        self.reply_cache[req.key] = (reply, body_raw)
        self.reply_cache_bytes += len(body_raw) + _CACHE_ENTRY_BYTES
        limit = int(k.reply_cache_mb * 1024 * 1024)
        while self.reply_cache and (len(self.reply_cache) > k.reply_cache or self.reply_cache_bytes > limit):
            _, (_, old_body) = self.reply_cache.popitem(last=False)
            self.reply_cache_bytes -= len(old_body) + _CACHE_ENTRY_BYTES

    # -------------------------------------------------------------------- timers
    def tick(self, now: float) -> None:
        """Heartbeats, dead managers (silent, or exited by the supervisor's table), requests nothing
        will serve, deadlines and the admission step's verdicts."""
        for mgr in list(self.registry):
            if now - mgr.last_seen > self.hb_expiry:
                self.manager_lost(mgr, f"no heartbeat for {now - mgr.last_seen:.1f}s", now)
            elif now - mgr.last_sent >= self.hb_interval:
                mgr.last_sent = now
                self.out.to_manager(mgr.identity, Heartbeat())
        self._drop_exited(list(self.registry), now)
        self._answer_unservable(now)
        self._probe_callers(now)
        for req, decision in self.admission.poll(now):
            self._release_held(req, decision, now)
        self.adoption.tick(now)
        self.expire_deadlines(now)

    def _probe_callers(self, now: float) -> None:
        """Heartbeat every agent that has work here, once per interval. Sending to a vanished agent
        fails at once (ROUTER_MANDATORY), and its queued and running work is cancelled: so a dead
        agent's work stops within about a heartbeat interval, not when its reply finally bounces."""
        probed = self._probed
        for client in list(self.by_client):
            if client[:1] == BACKEND_CLIENT:
                continue  # managers making calls are watched by their own heartbeats
            if now - probed.get(client, -1e9) >= self.hb_interval:
                probed[client] = now
                self._reply(client, _CALLER_HEARTBEAT, b"")
        if len(probed) > 2 * len(self.by_client) + 64:
            self._probed = {c: t for c, t in probed.items() if c in self.by_client}

    def _release_held(self, req: Job, decision: Decision, now: float) -> None:
        if self.held.pop(req.key, None) is not req or req.state != State.HELD:
            return
        if decision.allowed:
            self._enqueue(req)
            self.adoption.bind(req, now)
            self.dispatch(req.service, now)
        else:
            assert decision.code is not None
            self._fail(req, decision.code, decision.message, now)

    def next_deadline(self) -> float | None:
        return self.deadlines[0][0] if self.deadlines else None

    def expire_deadlines(self, now: float) -> None:
        """Answer DEADLINE_EXCEEDED for every pending request whose deadline has passed."""
        if len(self.deadlines) > 2 * len(self.pending) + 1024:
            # entries of finished requests wait for their deadline; drop them in bulk so the
            # heap stays proportional to the pending work
            self.deadlines = [e for e in self.deadlines if e[2].live]
            heapq.heapify(self.deadlines)
        while self.deadlines and self.deadlines[0][0] <= now:
            _, _, req = heapq.heappop(self.deadlines)
            if req.live and self.pending.get(req.key) is req:
                where = {State.RUNNING: "running", State.HELD: "held for admission"}.get(req.state, "still queued")
                self._fail(req, ErrorCode.DEADLINE_EXCEEDED,
                           f"deadline passed after {now - req.created:.3f}s ({where})", now)
                self.dispatch(req.service, now)

    # ---------------------------------------------------------------- kernel ops
    def on_kernel(self, client: bytes, rid: str, op: str, now: float) -> None:
        if op == "ping":  # the body is a constant: packed once
            self._reply(client, Reply(rid, _OK), _PONG)
            return
        if op == "status":
            body = self.status(now)
        elif op == "ops":
            # what the registered managers declare about their ops: the SDK re-sends the idempotent
            # ones after a scheduler restart (kernel ops are answered here, and are all safe to repeat)
            body = {KERNEL: {o: {"idempotent": o != "shutdown", "preemptible": False} for o in KERNEL_OPS}}
            for m in self.registry:
                for name, info in m.ops.items():
                    body.setdefault(m.service, {})[name] = info.to_wire()
        elif op == "shutdown":
            body = {"stopping": True}
            self.out.shutdown()
        else:
            return self.reply_error(client, rid, ErrorCode.UNKNOWN_OP,
                                    f"service 'kernel' has no op {op!r}; ops: {list(KERNEL_OPS)}")
        self._reply(client, Reply(rid, _OK), pack(body))

    def status(self, now: float) -> dict[str, Any]:
        return kernel_status(self, now)

    def close(self, now: float) -> None:
        """The kernel is stopping: answer everything still pending."""
        self.stopping = True
        for req in list(self.pending.values()):
            self._fail(req, ErrorCode.SHUTTING_DOWN, "the kernel is shutting down", now)
