"""After a scheduler restart, a re-sent call is bound to the run its manager still holds, never copied.

Unit tests of `aios.scheduler.adoption` through the scheduler core (no sockets,
no processes): each race between the caller's re-send, the manager's READY and
the manager's own messages about the run is played in each order, and each
ends the same way: the run's partials and one final reply reach the caller,
nothing is dispatched a second time, and no reset is sent. Where no run is
left, the request runs again, after a reset if the caller holds partials.
"""
from __future__ import annotations

from typing import Any, Callable

from aios import messages
from aios.messages import Reregister
from aios.scheduler.request import State
from tests.support.core_harness import IDEMPOTENT, PLAIN, PREEMPTIBLE, CoreHarness, Dispatched, make_config

A = b"c-agent-a"  # callers' routing ids are fixed for a connection's life (aios.sockets.caller_identity)
B = b"c-agent-b"
M1, M2 = b"m1", b"m2"
RUN = (A, "r1", None)  # what manager m1 has been running since before the restart
OPS = {"sleep": IDEMPOTENT}


def states(**by_name: str) -> Callable[[str], tuple[str, str] | None]:
    """A supervisor's process table: name -> state."""
    return lambda name: (by_name[name], "") if name in by_name else None


def reply(h: CoreHarness, mgr: bytes, status: str, body: Any, now: float, rid: str = "r1",
          client: bytes = A) -> None:
    """A reply from `mgr` about the run (client, rid)."""
    h.manager(mgr, messages.Reply(rid, status, client=client), body, now)


def bodies(rs: list[Any]) -> list[tuple[str, Any]]:
    return [(r.status, r.body) for r in rs]


def two_managers(process: str = "RUNNING") -> CoreHarness:
    """echo-1 (m1) and echo-2 (m2) both configured; the supervisor says echo-1 is `process`; only
    echo-2 has registered with the new scheduler so far (idle)."""
    h = CoreHarness(expected={"echo-1": "echo", "echo-2": "echo"},
                    process_state=states(**{"echo-1": process, "echo-2": "RUNNING"}))
    h.ready(M2, "echo", ops=OPS, capacity=2, name="echo-2", now=0.0)
    return h


# ======================================================== the re-send and the READY
def test_a_resend_after_the_managers_ready_is_bound_to_the_run_it_reports() -> None:
    h = CoreHarness()
    h.ready(M1, "echo", ops=OPS, capacity=2, running=[RUN], now=0.0)
    h.request(A, "r1", "echo", "sleep", now=0.2)
    assert h.take() == ([], [], []), "nothing dispatched, nothing answered yet"
    job = h.core.pending[(A, "r1")]
    m1 = h.core.registry.get(M1)
    assert job.state is State.RUNNING and job.manager == M1
    assert m1.busy == 1 and not m1.ghosts  # the run counts once, now as the request's
    h.request(A, "r1", "echo", "sleep", now=0.3)  # a periodic re-send of the same id changes nothing
    assert h.take() == ([], [], [])
    # its later partials and its final reply go to the caller, with no reset
    reply(h, M1, "partial", {"i": 7}, now=0.5)
    reply(h, M1, "ok", {"slept": 4}, now=1.0)
    _, rs, _ = h.take()
    assert bodies(rs) == [("partial", {"i": 7}), ("ok", {"slept": 4})]
    assert [r.to for r in rs] == [A, A] and not any(r.msg.reset for r in rs)
    stats = h.core.stats["echo"]
    assert (stats.adopted, stats.completed, stats.submitted) == (1, 1, 1)
    assert m1.busy == 0 and h.core.status(1.0)["services"]["echo"]["adopted"] == 1


def test_a_resend_before_the_managers_ready_waits_for_it_and_is_not_given_to_another() -> None:
    """The re-send arrives first; echo-2 is idle, but echo-1, which the supervisor says is running,
    has not registered yet and may hold the run: the service waits for it. Its READY lists the run."""
    h = two_managers()
    h.request(A, "r1", "echo", "sleep", now=0.1)
    assert h.take() == ([], [], []), "dispatched before every running manager had re-registered"
    h.ready(M1, "echo", ops=OPS, capacity=2, name="echo-1", running=[RUN], now=0.4)
    assert h.take() == ([], [], [])
    job = h.core.pending[(A, "r1")]
    assert job.state is State.RUNNING and job.manager == M1 and h.core.stats["echo"].adopted == 1
    reply(h, M1, "ok", {"slept": 4}, now=1.0)
    assert bodies(h.take()[1]) == [("ok", {"slept": 4})]
    # and the service is open now: new work is dispatched at once
    h.request(B, "x1", "echo", "sleep", agent="bob", now=1.1)
    assert [d.id for d in h.take()[0]] == ["x1"]


def test_the_wait_for_a_manager_that_does_not_come_back_ends_after_a_heartbeat_expiry() -> None:
    """echo-1 never re-registers: after a heartbeat expiry (3 s by default) the request runs on
    echo-2, from the start; its caller held partials, so it is told first (a reset)."""
    h = two_managers()
    h.request(A, "r1", "echo", "sleep", streamed=True, now=0.1)
    h.heartbeat(M2, running=[], now=2.5)
    h.tick(now=2.9)
    assert h.take()[:2] == ([], [])
    h.tick(now=3.0)
    sent = [s for s in h.new() if not isinstance(s.msg, messages.Heartbeat)]
    assert [(s.side, s.to) for s in sent] == [("caller", A), ("manager", M2)], "a reset, then the dispatch"
    assert sent[0].msg.reset and isinstance(sent[1].msg, messages.Dispatch)
    assert h.core.stats["echo"].adopted == 0


def test_a_manager_that_is_restarting_is_not_waited_for() -> None:
    h = two_managers(process="BACKOFF")
    h.request(A, "r1", "echo", "sleep", now=0.1)
    assert [(d.id, d.to) for d in h.take()[0]] == [("r1", M2)]


def test_at_a_first_start_nothing_waits_for_managers_still_starting() -> None:
    h = CoreHarness(expected={"echo-1": "echo", "echo-2": "echo"},
                    process_state=states(**{"echo-1": "STARTING", "echo-2": "STARTING"}))
    h.request(A, "r1", "echo", "sleep", now=0.0)
    h.ready(M2, "echo", ops=OPS, capacity=1, name="echo-2", now=0.2)
    assert [(d.id, d.to) for d in h.take()[0]] == [("r1", M2)]


# ============================================== the run's messages before the re-send
def test_the_runs_reply_before_the_resend_is_kept_and_answers_it() -> None:
    """After the READY, the run streams and ends before its caller re-sends: nothing is forwarded to
    anyone, the slot is free again, and the re-send gets the partials and the reply, once."""
    h = CoreHarness()
    h.ready(M1, "echo", ops=OPS, capacity=1, running=[RUN], now=0.0)
    reply(h, M1, "partial", {"i": 0}, now=0.1)
    reply(h, M1, "partial", {"i": 1}, now=0.2)
    reply(h, M1, "ok", {"done": True}, now=0.3)
    assert h.take() == ([], [], [])
    assert h.core.registry.get(M1).busy == 0
    assert h.core.status(0.3)["unclaimed"]["entries"] == 1
    h.request(A, "r1", "echo", "sleep", now=1.0)
    ds, rs, _ = h.take()
    assert ds == [] and bodies(rs) == [("partial", {"i": 0}), ("partial", {"i": 1}), ("ok", {"done": True})]
    assert not any(r.msg.reset for r in rs)
    assert h.core.stats["echo"].adopted == 1 and h.core.status(1.0)["unclaimed"] == {"entries": 0, "bytes": 0}
    h.request(A, "r1", "echo", "sleep", now=1.5)  # one more re-send: from the reply cache, not run
    ds, rs, _ = h.take()
    assert ds == [] and bodies(rs) == [("ok", {"done": True})]


def test_the_runs_reply_before_the_managers_ready_and_the_resend_is_kept_too() -> None:
    """What the manager's socket queued while no scheduler was there arrives before its READY."""
    h = CoreHarness()
    reply(h, M1, "partial", {"i": 0}, now=0.0)
    reply(h, M1, "ok", {"v": 1}, now=0.0)
    assert all(isinstance(s.msg, Reregister) for s in h.new())
    h.ready(M1, "echo", ops=OPS, capacity=1, running=[], now=0.1)
    h.request(A, "r1", "echo", "sleep", now=0.2)
    ds, rs, _ = h.take()
    assert ds == [] and bodies(rs) == [("partial", {"i": 0}), ("ok", {"v": 1})]


def test_the_runs_messages_reach_a_resend_already_waiting_for_its_manager() -> None:
    """The re-send waits (its manager has not registered); the manager's queued partial and final
    reply arrive before its READY: they answer the waiting request, and nothing is dispatched."""
    h = CoreHarness(expected={"echo-1": "echo"}, process_state=states(**{"echo-1": "RUNNING"}))
    h.request(A, "r1", "echo", "sleep", now=0.0)
    reply(h, M1, "partial", {"i": 3}, now=0.1)
    reply(h, M1, "ok", {"v": 1}, now=0.2)
    ds, rs, _ = h.take()
    assert ds == [] and bodies(rs) == [("partial", {"i": 3}), ("ok", {"v": 1})]
    assert h.core.pending == {}
    h.ready(M1, "echo", ops=OPS, capacity=1, name="echo-1", running=[], now=0.3)
    assert h.take()[0] == []


def test_a_waiting_resend_gets_the_runs_partials_then_is_adopted_when_the_ready_lists_it() -> None:
    h = CoreHarness(expected={"echo-1": "echo"}, process_state=states(**{"echo-1": "RUNNING"}))
    h.request(A, "r1", "echo", "sleep", streamed=True, now=0.0)
    reply(h, M1, "partial", {"i": 3}, now=0.1)
    h.ready(M1, "echo", ops=OPS, capacity=1, name="echo-1", running=[RUN], now=0.2)
    reply(h, M1, "ok", {"v": 1}, now=0.3)
    ds, rs, _ = h.take()
    assert ds == [] and bodies(rs) == [("partial", {"i": 3}), ("ok", {"v": 1})]
    assert not any(r.msg.reset for r in rs) and h.core.stats["echo"].adopted == 1


# ========================================================= runs that must start over
def test_a_resend_whose_run_died_with_its_manager_runs_again_after_a_reset() -> None:
    """The manager was killed too: its new incarnation runs nothing. A caller that holds partials
    gets a reset before the new run's stream; one that holds none gets no reset."""
    h = CoreHarness()
    h.ready(M1, "llm", ops={"chat": PREEMPTIBLE}, capacity=2, running=[], now=0.0)
    h.request(A, "r1", "llm", "chat", streamed=True, now=0.1)
    sent = h.new()
    assert [(s.side, s.to) for s in sent] == [("caller", A), ("manager", M1)], "a reset, then the dispatch"
    assert sent[0].msg.reset and sent[0].body == {"reset": True}
    h.request(B, "r2", "llm", "chat", agent="bob", now=0.2)
    ds, rs, _ = h.take()
    assert [d.id for d in ds] == ["r2"] and rs == []
    assert h.core.stats["llm"].adopted == 0


def test_a_run_this_scheduler_cancelled_is_not_adopted() -> None:
    """A ghost that is a cancelled handler winding down is no run to bind a request to."""
    h = CoreHarness()
    h.ready(M1, "echo", ops=OPS, capacity=2, now=0.0)
    h.request(A, "r1", "echo", "sleep", deadline=1.0, now=0.0)
    assert len(h.take()[0]) == 1
    h.tick(now=1.0)
    assert h.take()[1][0].code == "DEADLINE_EXCEEDED"
    h.heartbeat(M1, running=[RUN], now=1.2)  # still winding down
    assert not h.core.registry.get(M1).adoptable((A, "r1"))
    h.request(A, "r1", "echo", "sleep", now=1.5)
    assert [(d.id, d.to) for d in h.take()[0]] == [("r1", M1)]
    assert h.core.stats["echo"].adopted == 0


# =============================================================== preempted runs
def test_a_run_preempted_before_the_resend_resumes_where_its_context_is_without_a_reset() -> None:
    h = CoreHarness(make_config(scheduler={"policy": "rr"}))
    h.ready(M1, "llm", ops={"chat": PREEMPTIBLE}, capacity=1, running=[RUN], now=0.0)
    h.ready(M2, "llm", ops={"chat": PREEMPTIBLE}, capacity=1, now=0.0)
    reply(h, M1, "partial", {"delta": " w0"}, now=0.1)
    h.manager(M1, messages.Yield("r1", A, affinity=True, tokens=32), now=0.2)
    h.request(A, "r1", "llm", "chat", streamed=True, now=0.3)
    ds, rs, _ = h.take()
    assert bodies(rs) == [("partial", {"delta": " w0"})] and not any(r.msg.reset for r in rs)
    d = ds[0]
    assert len(ds) == 1 and d.to == M1 and d.msg.resume, "resumed on the manager holding its context"


def test_a_run_preempted_on_a_manager_that_is_gone_starts_over_with_a_reset() -> None:
    h = CoreHarness(make_config(scheduler={"policy": "rr"}))
    h.manager(M1, messages.Yield("r1", A, affinity=True), now=0.0)  # m1 never registers again
    h.ready(M2, "llm", ops={"chat": PREEMPTIBLE}, capacity=1, now=0.1)
    h.request(A, "r1", "llm", "chat", streamed=True, now=0.2)
    sent = [s for s in h.new() if not isinstance(s.msg, Reregister)]
    assert [(s.side, s.to) for s in sent] == [("caller", A), ("manager", M2)]
    assert sent[0].msg.reset and not sent[1].msg.resume


# ====================================================== calls made by adopted runs
def test_a_call_made_by_a_run_not_yet_adopted_is_retried_then_placed_under_its_parent() -> None:
    """A handler of a run from before the restart re-sends its call before the agent has re-sent the
    request it serves: "retry in a moment" (OVERLOADED, which the call engine retries), not
    INVALID_ARGUMENT. Once the parent is adopted, the call is queued on its behalf."""
    h = CoreHarness()
    h.ready(M1, "memory", ops={"search": IDEMPOTENT}, capacity=2, running=[RUN], now=0.0)
    h.ready(M2, "storage", ops={"read": PLAIN}, capacity=1, now=0.0)
    parent = Dispatched(M1, messages.Dispatch(id="r1", client=A, agent="alice", service="memory", op="search"),
                        b"")
    h.call(M1, "c1", "storage", "read", parent=parent, now=0.1)
    r = h.take()[1][0]
    assert (r.code, r.retryable) == ("OVERLOADED", True) and "re-sent" in r.message
    h.request(A, "r1", "memory", "search", agent="alice", deadline=30.0, now=0.2)  # adopted
    h.call(M1, "c2", "storage", "read", parent=parent, now=1.2)
    ds, rs, _ = h.take()
    assert rs == [] and [(d.id, d.to, d.msg.agent) for d in ds] == [("c2", M2, "alice")]


# =================================================================== bounds
def test_what_is_kept_for_unclaimed_runs_is_bounded_like_the_reply_cache() -> None:
    """Runs whose callers never re-send (non-idempotent calls fail at once instead) must not pile up."""
    h = CoreHarness(make_config(kernel={"reply_cache": 2}))
    h.ready(M1, "echo", ops=OPS, capacity=1, now=0.0)
    for i in range(3):
        reply(h, M1, "ok", {"i": i}, rid=f"old{i}", now=0.1)
    assert h.core.status(0.1)["unclaimed"]["entries"] == 2
    h.request(A, "old0", "echo", "sleep", now=0.2)  # the oldest was dropped: it runs again
    assert [d.id for d in h.take()[0]] == ["old0"]
    h.request(A, "old2", "echo", "sleep", now=0.3)
    assert bodies(h.take()[1]) == [("ok", {"i": 2})]
