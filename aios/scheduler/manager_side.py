"""The scheduler core's manager side: what managers tell it, and what happens when one is lost.

A part of `SchedulerCore` (a mixin it inherits, in a file of its own for size):
READY (registration, re-registration after a restart, a replacement
incarnation), replies and yields of dispatched requests (freeing the slot,
charging the policy, the final answer and the reply cache), and a lost
manager's work (re-queued when safe to repeat, at most `max_requeues` times;
else answered with an error that says it may have run). Every method works on
the core's own state and uses its helpers (`dispatch`, `_fail`, `_enqueue`...).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from aios.messages import Call, Disconnect, Heartbeat, Message, Ready, Reply, Reregister, Yield
from aios.protocol import ErrorCode, Status, pack
from aios.scheduler.registry import ManagerRecord
from aios.scheduler.request import BACKEND_CLIENT, IllegalTransition, Job, State

if TYPE_CHECKING:
    from aios.scheduler.core import SchedulerCore

log = logging.getLogger("aios.scheduler")

_PARTIAL, _ERROR = Status.PARTIAL.value, Status.ERROR.value


class ManagerSide:
    """Manager events, as methods of `SchedulerCore`."""

    def on_manager(self, identity: bytes, msg: Message, body_raw: bytes, now: float) -> None:
        mgr = self.registry.get(identity)
        if mgr is not None:
            mgr.last_seen = now
        if isinstance(msg, Ready):
            return self.on_ready(identity, msg, now)
        if mgr is None:
            if isinstance(msg, (Reply, Yield)):
                self.adoption.untracked(identity, None, msg, body_raw, now)
            self.out.to_manager(identity, Reregister())
            return
        if isinstance(msg, Reply):
            self.on_manager_reply(mgr, msg, body_raw, now)
        elif isinstance(msg, Call):
            self.on_request(BACKEND_CLIENT + identity, msg, body_raw, now, caller=mgr)
        elif isinstance(msg, Heartbeat):
            if msg.running is not None:
                freed = mgr.report(msg.running)
                self.adoption.reported(mgr, now)
                if freed:
                    self.dispatch(mgr.service, now)
        elif isinstance(msg, Yield):
            self.on_yield(mgr, msg, now)
        elif isinstance(msg, Disconnect):
            self.manager_lost(mgr, "it was stopped" if msg.reason == "stopping" else "disconnected", now,
                              stopping=msg.reason == "stopping")

    def on_ready(self, identity: bytes, msg: Ready, now: float) -> None:
        old = self.registry.get(identity)
        if old is not None:
            if old.incarnation == msg.incarnation:
                # the same process announcing itself again (it thought we had gone, or its health
                # changed): refresh what it says about itself
                old.health, old.detail = msg.health, msg.detail
                old.ops, old.targets, old.limits, old.default = dict(msg.ops), frozenset(msg.targets), \
                    dict(msg.limits), msg.default
                old.idempotent_targets = frozenset(msg.idempotent_targets)
                old.report(msg.running)
                self.adoption.reported(old, now)
                self.dispatch(msg.service, now)
                return
            self.manager_lost(old, f"replaced by incarnation {msg.incarnation}", now)
        same_name = self.registry.by_name(msg.name)
        if same_name is not None:
            # a restarted process under a new routing id: the old one is gone for good
            self.manager_lost(same_name, f"replaced by incarnation {msg.incarnation}", now)
        mgr = ManagerRecord.from_ready(identity, msg, now)
        self.registry.add(mgr)
        self.adoption.reported(mgr, now)
        self.expected_services.add(msg.service)
        self._refuse_unknown_targets(msg.service, now)
        log.info("manager %s ready: service=%s capacity=%d running=%d incarnation=%s%s", msg.name, msg.service,
                 msg.capacity, len(msg.running), msg.incarnation, f" ({msg.health}: {msg.detail})" if msg.detail else "")
        self.dispatch(msg.service, now)

    def _refuse_unknown_targets(self, service: str, now: float) -> None:
        """Once every configured manager of a service has registered, requests queued for a target
        none of them serves will never run: answer them now instead of at their deadline."""
        names = [n for n, s in self.expected.items() if s == service]
        if not all(self.registry.by_name(n) is not None for n in names):
            return
        q = self.queues.get(service)
        if not q:
            return
        served = {t for m in self.registry.of(service) for t in m.targets}
        for r in [r for r in q if r.target is not None and r.target not in served]:
            self._fail(r, ErrorCode.UNKNOWN_TARGET,
                       f"no {service} manager serves {r.target!r}; available: {sorted(served)}", now)

    def on_manager_reply(self, mgr: ManagerRecord, msg: Reply, body_raw: bytes, now: float) -> None:
        key = (msg.client, msg.id) if msg.client is not None and msg.id is not None else None
        req = mgr.inflight.get(key) if key is not None else None
        if req is None:
            # late (timed out, cancelled or re-queued), or a run from before a scheduler restart
            self.adoption.untracked(mgr.identity, mgr, msg, body_raw, now)
            return
        if msg.status == _PARTIAL:
            req.streamed = True
            self._reply(req.client, Reply(req.id, _PARTIAL), body_raw)
            return
        self._release(mgr, req, now, msg.tokens)
        if self._finish(req, msg.status, body_raw, now) and msg.status != _ERROR:
            mgr.completed += 1
        self.dispatch(mgr.service, now)

    def _finish(self, req: Job, status: str, body_raw: bytes, now: float) -> bool:
        """Answer a running request with its final reply (it has left its manager's books)."""
        try:
            req.move(State.DONE)
        except IllegalTransition as exc:  # cannot happen for an in-flight request; never corrupt the books
            log.error("%s", exc)
            return False
        req.finished = now
        stats = self.stats[req.service]
        if status == _ERROR:
            stats.errors += 1
        else:
            stats.completed += 1
        stats.wait_s_total += (req.finished - req.created) - req.run_s
        stats.turnaround_s_total += req.finished - req.created
        reply = Reply(req.id, status, timing=req.timing())
        self._forget(req, now)
        self._cache(req, reply, body_raw)
        self._reply(req.client, reply, body_raw)
        return True

    def on_yield(self, mgr: ManagerRecord, msg: Yield, now: float) -> None:
        req = mgr.inflight.get((msg.client, msg.id))
        if req is None:
            self.adoption.untracked(mgr.identity, mgr, msg, b"", now)
            return
        self._release(mgr, req, now, msg.tokens)
        req.preemptions += 1
        req.affinity = mgr.identity if msg.affinity else None
        self.stats[req.service].preemptions += 1
        req.move(State.YIELDED)
        self._enqueue(req, requeue=True)
        self.dispatch(mgr.service, now)

    def _release(self, mgr: ManagerRecord, req: Job, now: float, tokens: int) -> None:
        """A request stops running on `mgr`: free its slot and charge the service it used."""
        mgr.discard(req)
        run_s = now - (req.dispatched_at if req.dispatched_at is not None else now)
        req.run_s += run_s
        req.tokens += tokens
        req.manager = None
        self.queue(req.service).charge(req, run_s, tokens)

    def manager_lost(self, mgr: ManagerRecord, why: str, now: float, stopping: bool = False) -> None:
        """Forget a manager; re-queue or fail what it was running, and cancel the calls it made."""
        self.registry.remove(mgr)
        state = self.process_state(mgr.name, fresh=True)
        if state is not None and state[1]:
            why = f"{why}; the supervisor says: {state[1]}"
        log.warning("manager %s (incarnation %s) lost: %s; %d request(s) in flight",
                    mgr.name, mgr.incarnation, why, len(mgr.inflight))
        limit = self.config.scheduler.max_requeues
        for req in list(mgr.inflight.values()):
            mgr.discard(req)
            req.run_s += now - (req.dispatched_at if req.dispatched_at is not None else now)
            req.manager = None
            if req.affinity == mgr.identity:
                req.affinity = None  # its saved context died with the manager
            if not req.live:
                continue
            req.failures += 1
            if req.idempotent and req.failures <= limit:
                self.stats[req.service].requeued += 1
                self._reset_stream(req)
                self._enqueue(req, requeue=True)
            elif req.idempotent:
                self._fail(req, ErrorCode.RETRIES_EXHAUSTED,
                           f"the {req.service} manager died {req.failures} times while running this request "
                           f"(last: {mgr.name}, {why}); not re-queued again ([scheduler] max_requeues = {limit}): "
                           f"the request itself may be what kills it", now)
            # not safe to repeat and it may have run: a retry could do it twice, so it is not retryable
            elif stopping:
                self._fail(req, ErrorCode.SHUTTING_DOWN,
                           f"the {req.service} manager {mgr.name} was stopped while running this request (the "
                           f"kernel is stopping); it is not safe to repeat, so it was not re-run: it may or may not "
                           f"have taken effect", now, retryable=False)
            else:
                self._fail(req, ErrorCode.MANAGER_DIED,
                           f"the {req.service} manager {mgr.name} died while running this request ({why}); "
                           f"it is not safe to repeat, so it was not re-run: it may or may not have taken effect",
                           now, retryable=False)
        # requests whose saved context lived there must start over elsewhere
        q = self.queues.get(mgr.service)
        if q is not None:
            for req in q.reaffine(mgr.identity):
                self._reset_stream(req)
        # calls this manager's handlers made have nobody to answer to
        self.client_gone(BACKEND_CLIENT + mgr.identity, now)
        self.dispatch(mgr.service, now)

    def _reset_stream(self, req: Job) -> None:
        """The request will run again from the start: tell the caller to drop what it was streamed."""
        if req.streamed:
            self._reply(req.client, Reply(req.id, _PARTIAL, reset=True), pack({"reset": True}))
            req.streamed = False

