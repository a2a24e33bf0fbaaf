"""Runs that outlive their scheduler: a call re-sent after a restart is bound to its run, not copied.

When the scheduler is killed and restarted, its managers keep running what
they were given. Each re-announces itself (READY) with the requests it is
running, and the SDK re-sends its idempotent calls under the same request id
from the same routing id (`aios.sockets.caller_identity`), so both name a run
by the same key, (client, request id). The new scheduler adopts such a run
instead of dispatching a copy: the re-sent request takes over the manager's
slot, later partials and the final reply go to the caller, and no reset is
sent, since nothing was repeated. A request with no run left (its manager
died too, or it was never dispatched) runs again, after a `reset` when the
caller says it holds partials of it (`Request.streamed`; see `SchedulerCore._start`).

Every order of events ends the same way:
- the re-send arrives before the manager's READY: it waits in its queue, for
  right after a restart a service dispatches nothing until each of its
  managers that the supervisor says is running has registered again, or a
  heartbeat expiry has passed (`settled`); the READY listing it adopts it
  (`reported`);
- the re-send arrives after the READY: it is adopted at once (`bind`);
- the manager's messages about the run arrive first (partials, the final
  reply, a preempted slice's yield; even before its READY, from what its
  socket queued while no scheduler was there): they are kept, bounded like the
  reply cache, and handed to the re-send when it comes (`Unclaimed`);
- they arrive while the re-send waits in its queue: they go to it at once
  (`untracked`).

This is part of the scheduler core (it reads and moves the core's books); it
lives in its own module because it is one concern with its own races.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aios.messages import Reply, Yield
from aios.protocol import Status
from aios.scheduler.registry import ManagerRecord
from aios.scheduler.request import Job, State

if TYPE_CHECKING:
    from aios.scheduler.core import SchedulerCore

log = logging.getLogger("aios.scheduler")

_PARTIAL = Status.PARTIAL.value
#: rough per-entry overhead of an unclaimed run's record, for the byte bound
_ENTRY_BYTES = 200
Key = tuple[bytes, str]


@dataclass(slots=True)
class Unclaimed:
    """What a manager said about a run that no request here is bound to yet."""

    partials: list[bytes] = field(default_factory=list)
    final: tuple[str, bytes] | None = None  # status and body of its final reply
    yielded: bool = False                   # its slice ran out: it waits to be resumed
    affinity: bytes | None = None           # the manager keeping its saved context (if it yielded)
    size: int = _ENTRY_BYTES


class Adoption:
    """The restarted scheduler's side of runs it did not start (see the module docstring)."""

    def __init__(self, core: "SchedulerCore") -> None:
        self.core = core
        self.unclaimed: OrderedDict[Key, Unclaimed] = OrderedDict()
        self.unclaimed_bytes = 0
        self.seen: set[str] = set()  # manager processes that registered since this scheduler started
        self._settled: set[str] = set()
        self._settle_by: float | None = None
        self._all_settled = False

    def figures(self) -> dict[str, int]:
        """For `kernel.status`: what is kept for runs whose callers have not re-sent them yet."""
        return {"entries": len(self.unclaimed), "bytes": self.unclaimed_bytes}

    # ------------------------------------------------------------------ the gate
    def settled(self, service: str, now: float) -> bool:
        """Whether `service` may dispatch. Right after a (re)start it may not while one of its
        managers that the supervisor says is RUNNING has not registered here yet: that one may be
        running a request whose re-send would otherwise be dispatched as a copy to another. A
        manager that is restarting runs nothing from before; one that does not come back within a
        heartbeat expiry is not waited for (the scheduler would declare it dead by then anyway)."""
        if self._all_settled or service in self._settled:
            return True
        if self._window_over(now):
            return True
        core = self.core
        for name, of in core.expected.items():
            if of == service and name not in self.seen:
                state = core.process_state(name)
                if state is not None and state[0] == "RUNNING":
                    return False
        self._settled.add(service)
        return True

    def _window_over(self, now: float) -> bool:
        if self._settle_by is None:
            core = self.core
            self._settle_by = (core.started_at if core.started_at is not None else now) + core.hb_expiry
        if now >= self._settle_by:
            self._all_settled = True  # from now on nothing waits, and this costs nothing
        return self._all_settled

    def tick(self, now: float) -> None:
        """Dispatch for the services whose wait has just ended."""
        if self._all_settled:
            return
        over = self._window_over(now)
        for service in list(self.core.queues):
            if service not in self._settled and (over or self.settled(service, now)):
                self._settled.add(service)
                self.core.dispatch(service, now)

    # ---------------------------------------------------------------- binding
    def bind(self, req: Job, now: float) -> None:
        """`req` was just queued: if a run of it is known (a re-send after a restart), bind it there."""
        key = req.key
        if self.unclaimed:
            entry = self.unclaimed.pop(key, None)
            if entry is not None:
                self.unclaimed_bytes -= entry.size
                self._claim(req, entry, now)
                if req.state is not State.QUEUED or req.attempts:
                    return
        for mgr in self.core.registry.of(req.service):
            if mgr.ghosts and mgr.adoptable(key):
                self._adopt(req, mgr, now)
                return

    def reported(self, mgr: ManagerRecord, now: float) -> None:
        """`mgr` registered or said what it runs: adopt the waiting re-sends of runs it lists."""
        self.seen.add(mgr.name)
        if not mgr.ghosts:
            return
        pending = self.core.pending
        for key in [k for k in mgr.ghosts if k not in mgr.cancelled]:
            req = pending.get(key)
            if req is not None and _waiting(req, mgr.service):
                self._adopt(req, mgr, now)

    def untracked(self, identity: bytes, mgr: ManagerRecord | None, msg: Reply | Yield, body_raw: bytes,
                  now: float) -> None:
        """A reply or yield from manager `identity` (`mgr`, None if it has not registered) about a
        request the core does not track there: a run from before the restart, or one it cancelled."""
        if msg.client is None or msg.id is None:
            return
        key = (msg.client, msg.id)
        core = self.core
        req = core.pending.get(key)
        waiting = req is not None and _waiting(req, mgr.service if mgr is not None else req.service)
        if mgr is not None:
            if waiting and mgr.adoptable(key):
                assert req is not None
                self._adopt(req, mgr, now)  # now tracked: the core's usual path takes the message
                if isinstance(msg, Yield):
                    core.on_yield(mgr, msg, now)
                else:
                    core.on_manager_reply(mgr, msg, body_raw, now)
                return
            cancelled = key in mgr.cancelled
            if (isinstance(msg, Yield) or msg.status != _PARTIAL) and mgr.ghost_gone(key):
                core.dispatch(mgr.service, now)  # that handler returned: its slot is free
            if cancelled:
                return
        if waiting:
            assert req is not None
            self._deliver(req, identity, msg, body_raw, now)
        elif req is None:
            self._keep(key, identity, msg, body_raw)
        # else: a request this scheduler runs itself; the message is about a stale run

    # ---------------------------------------------------------------- moves
    def _adopt(self, req: Job, mgr: ManagerRecord, now: float) -> None:
        """The queued `req` is the run `mgr` reports: running there, with nothing dispatched."""
        self._off_queue(req)
        req.move(State.RUNNING)
        info = mgr.ops.get(req.op)
        if info is not None:
            req.preemptible = info.preemptible
        req.idempotent = mgr.safe_to_repeat(req.op, req.target)
        if req.started is None:
            req.started = now
        req.dispatched_at = now
        req.attempts += 1
        req.manager = mgr.identity
        mgr.adopt(req)
        self.core.stats[req.service].adopted += 1
        log.info("request %s (%s.%s for %s) adopted: it has been running on %s since before the scheduler "
                 "restarted", req.id, req.service, req.op, req.agent, mgr.name)

    def _claim(self, req: Job, entry: Unclaimed, now: float) -> None:
        """Hand the queued `req` what its run said before it came: partials, then the end or a yield."""
        core = self.core
        for body in entry.partials:
            core._reply(req.client, Reply(req.id, _PARTIAL), body)
        if entry.partials:
            req.streamed = True
        if entry.final is not None:
            self._finish(req, entry.final[0], entry.final[1], now)
        elif entry.yielded:
            self._resume(req, entry.affinity)

    def _deliver(self, req: Job, identity: bytes, msg: Reply | Yield, body_raw: bytes, now: float) -> None:
        """A message of the run the queued `req` waits for (its manager has not registered yet)."""
        if isinstance(msg, Yield):
            self._resume(req, identity if msg.affinity else None)
        elif msg.status == _PARTIAL:
            req.streamed = True
            self.core._reply(req.client, Reply(req.id, _PARTIAL), body_raw)
        else:
            self._finish(req, msg.status, body_raw, now)

    def _finish(self, req: Job, status: str, body_raw: bytes, now: float) -> None:
        """Its run ended before the request was bound to it: answer with that run's final reply."""
        self._off_queue(req)
        req.move(State.RUNNING)
        if req.started is None:
            req.started = now
        req.dispatched_at = now
        req.attempts += 1
        self.core.stats[req.service].adopted += 1
        log.info("request %s (%s.%s for %s) answered with the reply of its run from before the scheduler "
                 "restarted", req.id, req.service, req.op, req.agent)
        self.core._finish(req, status, body_raw, now)

    def _resume(self, req: Job, affinity: bytes | None) -> None:
        """Its run was preempted (a slice ran out): the next dispatch resumes it where its context is."""
        core = self.core
        req.attempts += 1  # so the next dispatch continues the run instead of resetting the stream
        core.stats[req.service].adopted += 1
        if affinity is not None and core.registry.get(affinity) is None:
            affinity = None  # its saved context is on a manager that is not here: start over
            core._reset_stream(req)
        q = core.queue(req.service)
        if q.remove(req):
            req.affinity = affinity
            q.requeue(req)

    def _off_queue(self, req: Job) -> None:
        q = self.core.queues.get(req.service)
        if q is not None and q.remove(req):
            self.core._dequeued(req)

    def _keep(self, key: Key, identity: bytes, msg: Reply | Yield, body_raw: bytes) -> None:
        """Keep what a run said until its caller re-sends it; bounded like the reply cache."""
        k = self.core.config.kernel
        if k.reply_cache <= 0:
            return
        entry = self.unclaimed.get(key)
        if entry is None:
            entry = self.unclaimed[key] = Unclaimed()
            self.unclaimed_bytes += entry.size
        else:
            self.unclaimed.move_to_end(key)
        if isinstance(msg, Yield):
            entry.yielded, entry.affinity = True, identity if msg.affinity else None
        else:
            if msg.status == _PARTIAL:
                entry.partials.append(body_raw)
            else:
                entry.final = (msg.status, body_raw)
            entry.size += len(body_raw)
            self.unclaimed_bytes += len(body_raw)
        limit = int(k.reply_cache_mb * 1024 * 1024)
        while self.unclaimed and (len(self.unclaimed) > k.reply_cache or self.unclaimed_bytes > limit):
            old_key, old = self.unclaimed.popitem(last=False)
            self.unclaimed_bytes -= old.size
            log.debug("dropped what was kept for the unclaimed run %s", old_key[1])


def _waiting(req: Job, service: str) -> bool:
    """`req` waits in its queue and was never dispatched here: it may be the re-send of a run."""
    return req.state is State.QUEUED and req.attempts == 0 and req.service == service
