"""Unit tests of the scheduler core (no sockets, no processes): the request lifecycle and every decision.

The core is driven through `tests/support/core_harness.py`: messages go through
their wire headers and `messages.parse` as the broker hands them over, with an
explicit `now`, and what the core sends is read back from a recording Outbox.
"""
from __future__ import annotations

import itertools
from typing import Any

import pytest

from aios import messages
from aios.messages import Cancel, Heartbeat, Reregister
from aios.protocol import ErrorCode, pack
from aios.scheduler.request import BACKEND_CLIENT, IllegalTransition, Job, State
from tests.support.core_harness import (
    IDEMPOTENT,
    PLAIN,
    PREEMPTIBLE,
    CoreHarness,
    Dispatched,
    backend_client,
    ghosts,
    make_config,
)

A = b"\x00agent-a"
B = b"\x00agent-b"
M1, M2 = b"m1", b"m2"
MA, MB = b"ma", b"mb"


def one(items: list[Any]) -> Any:
    assert len(items) == 1, items
    return items[0]


def cancels(other: list[Any]) -> list[tuple[bytes, str, bytes]]:
    out = []
    for s in other:
        m = s.msg
        if isinstance(m, Cancel):
            out.append((s.to, m.id, m.client))
    return out


# ===================================================================== lifecycle
NEW = None
# the lifecycle as request.py's docstring draws it
LEGAL: dict[State | None, set[State]] = {
    NEW: {State.HELD, State.QUEUED, State.FAILED},
    State.HELD: {State.QUEUED, State.FAILED},
    State.QUEUED: {State.RUNNING, State.FAILED},
    State.RUNNING: {State.DONE, State.FAILED, State.YIELDED, State.QUEUED},
    State.YIELDED: {State.QUEUED, State.FAILED},
    State.DONE: set(),
    State.FAILED: set(),
}


def _req(rid: str = "r1", client: bytes = A, **kw: Any) -> Job:
    fields: dict[str, Any] = dict(id=rid, client=client, agent="alice", service="echo", op="get",
                                  body_raw=b"\x81\xa1k\x01", created=10.0)
    fields.update(kw)
    return Job(**fields)


@pytest.mark.parametrize("src,dst", list(itertools.product(list(LEGAL), list(State))),
                         ids=lambda s: s.value if isinstance(s, State) else "new")
def test_every_transition_is_allowed_or_refused(src: State | None, dst: State) -> None:
    r = _req()
    r.state = src
    if dst in LEGAL[src]:
        r.move(dst)
        assert r.state is dst
    else:
        with pytest.raises(IllegalTransition) as info:
            r.move(dst)
        assert r.state is src  # an illegal move leaves the books as they were
        assert "r1" in str(info.value) and "echo.get" in str(info.value)


def test_request_identity_liveness_chain_and_body() -> None:
    parent = _req("p", client=A)
    child = _req("c", client=BACKEND_CLIENT + b"m1", parent=parent)
    grandchild = _req("g", client=BACKEND_CLIENT + b"m2", parent=child)
    assert parent.key == (A, "p") and not parent.from_manager and child.from_manager
    assert grandchild.chain() == [grandchild, child, parent]
    assert parent.live
    for s in (State.QUEUED, State.RUNNING, State.DONE):
        parent.move(s)
    assert not parent.live
    assert parent.body_raw
    parent.release_body()
    assert parent.body_raw == b""
    assert _req().arrival < _req().arrival  # arrival order is global


def test_request_timing() -> None:
    r = _req(created=10.0)
    r.started, r.finished, r.run_s, r.preemptions, r.attempts = 11.5, 14.0, 2.0, 1, 2
    assert r.timing() == {"wait_s": 2.0, "first_wait_s": 1.5, "run_s": 2.0, "turnaround_s": 4.0,
                          "preemptions": 1, "attempts": 2}
    never_ran = _req(created=10.0)
    never_ran.finished = 12.0
    assert never_ran.timing()["first_wait_s"] == 2.0 and never_ran.timing()["wait_s"] == 2.0


# ================================================================ basic routing
def test_a_request_waits_for_its_manager_then_is_dispatched() -> None:
    h = CoreHarness(expected={"echo1": "echo"})
    h.request(A, "r1", "echo", "get", agent="alice", body={"text": "hi"}, deadline=5.0, now=0.0)
    ds, rs, _ = h.take()
    assert ds == [] and rs == []
    assert h.core.queued("echo") == 1 and h.core.queued_by_agent("alice") == 1
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, now=1.0)
    ds, rs, _ = h.take()
    d = one(ds)
    assert rs == []
    assert d.to == M1
    m = d.msg
    assert (m.id, m.client, m.agent, m.service, m.op) == ("r1", A, "alice", "echo", "get")
    assert (m.target, m.attempt, m.resume, m.slice, m.caller) == (None, 1, False, None, None)
    assert m.deadline == pytest.approx(4.0)  # seconds left when dispatched
    assert d.body == {"text": "hi"}  # the body is forwarded as it came
    assert h.core.queued("echo") == 0 and h.core.queued_by_agent("alice") == 0


def test_a_preemptible_op_queued_before_its_manager_registered_gets_a_time_slice() -> None:
    """The op's flags come from the manager that serves it, even if the request arrived first
    (agents commonly start while the LLM core is still loading its model)."""
    h = CoreHarness(make_config(scheduler={"policy": "rr", "time_slice_tokens": 16}), expected={"core0": "llm"})
    h.request(A, "r1", "llm", "chat", now=0.0)
    h.ready(M1, "llm", ops={"chat": PREEMPTIBLE}, name="core0", now=1.0)
    d = one(h.take()[0])
    assert d.msg.slice == 16


def test_an_idempotent_op_queued_before_its_manager_registered_is_requeued_when_it_dies() -> None:
    h = CoreHarness(expected={"echo1": "echo", "echo2": "echo"})
    h.request(A, "r1", "echo", "get", now=0.0)
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, name="echo1", now=1.0)
    one(h.take()[0])
    h.ready(M2, "echo", ops={"get": IDEMPOTENT}, name="echo2", now=1.5)
    h.disconnect(M1, now=2.0)
    ds, rs, _ = h.take()
    assert rs == [], [(r.code, r.message) for r in rs]
    d = one(ds)
    assert d.to == M2 and d.msg.attempt == 2


def test_an_unknown_target_queued_before_registration_is_answered_once_its_service_registered() -> None:
    """Once every expected manager of the service has registered and none serves the target,
    the request must be answered, not left waiting for a manager that will never come."""
    h = CoreHarness(expected={"tools": "tool"})
    h.request(A, "r1", "tool", "run", target="nosuch", now=0.0)
    h.ready(M1, "tool", ops={"run": PLAIN}, targets=["calc"], name="tools", now=1.0)
    ds, rs, _ = h.take()
    assert ds == []
    r = one(rs)
    assert (r.id, r.code) == ("r1", ErrorCode.UNKNOWN_TARGET.value)
    assert "nosuch" in r.message and "calc" in r.message


def test_credit_follows_capacity() -> None:
    h = CoreHarness()
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, capacity=2, now=0.0)
    for i in range(3):
        h.request(A, f"r{i}", "echo", "get", now=0.1)
    ds, _, _ = h.take()
    assert [d.id for d in ds] == ["r0", "r1"]
    assert h.core.queued("echo") == 1
    h.reply(M1, ds[0], now=0.2)  # no busy field: credit follows the scheduler's own books
    ds2, rs, _ = h.take()
    assert [d.id for d in ds2] == ["r2"] and [r.id for r in rs] == ["r0"]
    assert h.core.registry.get(M1).busy == 2


def test_the_reply_reaches_the_caller_with_timing_and_a_retry_is_answered_from_the_cache() -> None:
    h = CoreHarness(expected={"echo1": "echo"})
    h.request(A, "r1", "echo", "get", body={"k": 1}, now=0.0)
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, now=1.0)
    d = one(h.take()[0])
    h.reply(M1, d, body={"value": 42}, tokens=7, now=3.0)
    ds, rs, _ = h.take()
    r = one(rs)
    assert ds == []
    assert (r.to, r.id, r.status, r.body) == (A, "r1", "ok", {"value": 42})
    assert r.msg.timing == {"wait_s": 1.0, "first_wait_s": 1.0, "run_s": 2.0, "turnaround_s": 3.0,
                            "preemptions": 0, "attempts": 1}
    assert r.msg.client is None and r.msg.tokens == 0  # the manager's bookkeeping fields stay inside
    stats = h.core.stats["echo"]
    assert (stats.submitted, stats.completed, stats.errors) == (1, 1, 0)
    # the caller re-sends the same id (its reply was lost): answered from the cache, not run again
    h.request(A, "r1", "echo", "get", body={"k": 1}, now=4.0)
    ds, rs, _ = h.take()
    again = one(rs)
    assert ds == []
    assert again.msg == r.msg and again.body == r.body
    assert h.core.stats["echo"].submitted == 1
    # the same id from another connection is another request
    h.request(B, "r1", "echo", "get", now=4.0)
    assert [d.id for d in h.take()[0]] == ["r1"]


def test_a_duplicate_id_while_pending_is_ignored() -> None:
    h = CoreHarness(expected={"echo1": "echo"})
    h.request(A, "r1", "echo", "get", now=0.0)
    h.request(A, "r1", "echo", "get", now=0.5)  # while queued
    assert h.core.queued("echo") == 1 and h.take() == ([], [], [])
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, capacity=4, now=1.0)
    d = one(h.take()[0])
    h.request(A, "r1", "echo", "get", now=1.5)  # while running
    assert h.take() == ([], [], [])
    h.reply(M1, d, now=2.0)
    assert [r.id for r in h.take()[1]] == ["r1"]
    assert h.core.stats["echo"].submitted == 1


def test_unknown_service_op_and_target() -> None:
    h = CoreHarness(expected={"echo1": "echo"})
    h.ready(M1, "echo", ops={"get": IDEMPOTENT, "put": PLAIN}, targets=["a", "b"], now=0.0)
    h.request(A, "r1", "nosvc", "get")
    h.request(A, "r2", "echo", "nosuchop")
    h.request(A, "r3", "echo", "get", target="c")
    ds, rs, _ = h.take()
    assert ds == []
    by_id = {r.id: r for r in rs}
    r1, r2, r3 = by_id["r1"], by_id["r2"], by_id["r3"]
    assert r1.code == "UNKNOWN_SERVICE" and "'nosvc'" in r1.message and "echo" in r1.message
    assert "kernel" in r1.message
    assert r2.code == "UNKNOWN_OP" and "'nosuchop'" in r2.message and "get" in r2.message and "put" in r2.message
    assert r3.code == "UNKNOWN_TARGET" and "'c'" in r3.message and "'a'" in r3.message and "'b'" in r3.message
    assert not any(r.retryable for r in rs)
    assert all(r.to == A for r in rs) and not h.core.pending


def test_a_full_queue_is_overloaded() -> None:
    h = CoreHarness(make_config(kernel={"max_queue": 2}, scheduler={"max_queued_per_agent": 0}),
                    expected={"echo1": "echo"})
    for i in range(3):
        h.request(A, f"r{i}", "echo", "get")
    r = one(h.take()[1])
    assert (r.id, r.code, r.retryable) == ("r2", "OVERLOADED", True)
    assert "[kernel] max_queue" in r.message and "2" in r.message


def test_a_request_without_target_goes_to_the_default_manager() -> None:
    h = CoreHarness()
    h.ready(M1, "llm", ops={"chat": PLAIN}, targets=["big"], capacity=4, now=0.0)
    h.ready(M2, "llm", ops={"chat": PLAIN}, targets=["small"], default=True, capacity=1, now=0.0)
    h.request(A, "r1", "llm", "chat")
    h.request(A, "r2", "llm", "chat")
    h.request(A, "r3", "llm", "chat", target="big")
    ds = h.take()[0]
    assert [(d.id, d.to) for d in ds] == [("r1", M2), ("r3", M1)]  # r2 waits for the default manager


# ===================================================================== deadlines
def test_deadline_of_a_queued_request() -> None:
    h = CoreHarness(expected={"echo1": "echo"})
    h.request(A, "r1", "echo", "get", deadline=2.0, now=0.0)
    assert h.core.next_deadline() == 2.0
    h.tick(now=1.999)
    assert h.take() == ([], [], [])
    h.tick(now=2.0)
    r = one(h.take()[1])
    assert (r.id, r.code, r.retryable) == ("r1", "DEADLINE_EXCEEDED", False)
    assert "still queued" in r.message
    assert r.msg.timing is not None and r.msg.timing["turnaround_s"] == 2.0
    assert h.core.queued("echo") == 0 and h.core.queued_by_agent("alice") == 0 and not h.core.pending
    # the manager that registers later gets nothing
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, now=3.0)
    assert h.take()[0] == []


def test_deadline_of_a_running_request_cancels_it_on_the_manager() -> None:
    h = CoreHarness()
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, capacity=1, now=0.0)
    h.request(A, "r1", "echo", "get", deadline=2.0, now=0.0)
    h.request(B, "r2", "echo", "get", agent="bob", now=0.5)
    d1 = one(h.take()[0])
    h.core.expire_deadlines(2.0)
    ds, rs, other = h.take()
    r = one(rs)
    assert (r.to, r.id, r.code) == (A, "r1", "DEADLINE_EXCEEDED") and "running" in r.message
    assert cancels(other) == [(M1, "r1", A)]
    # the handler may still be running: the slot stays counted until the manager says otherwise
    assert ds == []
    h.reply(M1, d1, now=2.5)  # the late reply: not forwarded, but it frees the slot
    ds, rs, _ = h.take()
    assert rs == [] and [d.id for d in ds] == ["r2"]


def test_a_cancelled_running_request_keeps_its_slot_until_the_manager_reports() -> None:
    """Capacity 2, two running, one queued: the first's deadline passes. Its handler thread is still
    busy until the manager reports, so the queued request must wait (core.py: "until the manager
    says its handler stopped, the slot stays counted as busy")."""
    h = CoreHarness()
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, capacity=2, now=0.0)
    h.request(A, "r1", "echo", "get", deadline=2.0, now=0.0)
    h.request(A, "r2", "echo", "get", now=0.0)
    h.request(A, "r3", "echo", "get", now=0.0)
    ds0 = h.take()[0]
    assert [d.id for d in ds0] == ["r1", "r2"]
    h.core.expire_deadlines(2.0)
    ds, rs, other = h.take()
    assert [r.id for r in rs] == ["r1"] and cancels(other) == [(M1, "r1", A)]
    assert ds == [], "r3 was dispatched while both of the manager's handler threads were still busy"
    h.heartbeat(M1, running=[d for d in ds0 if d.id == "r2"], now=2.1)  # r1's handler stopped
    assert [d.id for d in h.take()[0]] == ["r3"]


def test_a_late_final_reply_after_the_deadline_is_not_forwarded_or_cached() -> None:
    h = CoreHarness()
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, now=0.0)
    h.request(A, "r1", "echo", "get", deadline=1.0, now=0.0)
    d = one(h.take()[0])
    h.tick(now=1.0)
    assert one(h.take()[1]).code == "DEADLINE_EXCEEDED"
    h.reply(M1, d, body={"late": True}, now=1.2)
    assert h.take()[1] == []
    assert (A, "r1") not in h.core.reply_cache


def test_a_request_whose_deadline_passed_is_never_dispatched() -> None:
    """A slot frees a moment after a queued request's deadline, before the broker's next
    expire_deadlines: the request must be answered DEADLINE_EXCEEDED, not sent to the manager
    with a negative time budget (and cancelled right after)."""
    h = CoreHarness()
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, capacity=1, now=0.0)
    h.request(A, "r1", "echo", "get", now=0.0)
    h.request(B, "r2", "echo", "get", agent="bob", deadline=1.0, now=0.0)
    d1 = one(h.take()[0])
    h.reply(M1, d1, now=1.05)
    ds, rs, _ = h.take()
    assert [d.id for d in ds] == [], f"dispatched with deadline {[d.msg.deadline for d in ds]}"
    h.core.expire_deadlines(1.05)
    assert sorted((r.id, r.code) for r in rs + h.take()[1]) == [("r1", None), ("r2", "DEADLINE_EXCEEDED")]


def test_deadline_of_a_yielded_request_drops_its_saved_context() -> None:
    h = CoreHarness(make_config(scheduler={"policy": "rr"}))
    h.ready(M1, "llm", ops={"chat": PREEMPTIBLE}, capacity=1, now=0.0)
    h.request(A, "r1", "llm", "chat", deadline=2.0, now=0.1)
    d = one(h.take()[0])
    h.ready(M1, "llm", ops={"chat": PREEMPTIBLE}, capacity=1, incarnation="inc1",
            running=[("\x00x".encode(), "other", None)], now=0.4)  # m1 now busy with something else
    h.yield_(M1, d, affinity=True, now=0.5)  # m1 keeps the context
    assert h.take() == ([], [], [])
    h.tick(now=2.1)
    ds, rs, other = h.take()
    assert [(r.id, r.code) for r in rs] == [("r1", "DEADLINE_EXCEEDED")] and "still queued" in rs[0].message
    assert cancels(other) == [(M1, "r1", A)]  # m1 may drop the saved context
    assert ds == [] and h.core.queued("llm") == 0


# ============================================================== managers lost
def _two_requests_on_m1(h: CoreHarness) -> tuple[Dispatched, Dispatched]:
    h.ready(M1, "echo", ops={"get": IDEMPOTENT, "put": PLAIN}, capacity=2, now=0.0)
    h.request(A, "get1", "echo", "get", now=0.0)
    h.request(A, "put1", "echo", "put", now=0.0)
    g, p = h.take()[0]
    assert (g.id, p.id) == ("get1", "put1") and g.to == p.to == M1
    h.ready(M2, "echo", ops={"get": IDEMPOTENT, "put": PLAIN}, capacity=2, running=ghosts(2), now=0.5)
    return g, p


def test_a_manager_missing_heartbeats_is_lost_and_its_work_requeued_or_failed() -> None:
    h = CoreHarness()  # heartbeat every 1 s, dead after 3 silent ones
    _two_requests_on_m1(h)
    h.heartbeat(M2, running=ghosts(2), now=3.0)
    h.tick(now=3.0)  # m1 silent for exactly 3 s: still alive
    ds, rs, other = h.take()
    assert ds == [] and rs == []
    assert any(isinstance(s.msg, Heartbeat) and s.to == M1 for s in other)  # the scheduler beats too
    assert h.core.registry.get(M1) is not None
    h.heartbeat(M2, running=[], now=3.2)  # m2 has room now; still nothing may be dispatched there
    h.tick(now=3.5)
    ds, rs, _ = h.take()
    assert h.core.registry.get(M1) is None
    d = one(ds)
    assert (d.id, d.to, d.msg.attempt) == ("get1", M2, 2)  # idempotent: re-run elsewhere
    r = one(rs)
    # not safe to repeat and it may have run: not retryable, whatever MANAGER_DIED usually advises
    assert (r.to, r.id, r.code, r.retryable) == (A, "put1", "MANAGER_DIED", False)
    assert "m1" in r.message and "not safe to repeat" in r.message and "no heartbeat" in r.message
    assert h.core.stats["echo"].requeued == 1


def test_a_manager_that_disconnects_loses_its_work_the_same_way() -> None:
    h = CoreHarness()
    _two_requests_on_m1(h)
    h.heartbeat(M2, running=[], now=1.0)
    h.disconnect(M1, now=1.0)
    ds, rs, _ = h.take()
    assert [(d.id, d.to, d.msg.attempt) for d in ds] == [("get1", M2, 2)]
    r = one(rs)
    assert (r.id, r.code, r.retryable) == ("put1", "MANAGER_DIED", False) and "disconnected" in r.message


def test_requeues_are_capped_by_max_requeues() -> None:
    h = CoreHarness(make_config(scheduler={"max_requeues": 1}), expected={"e1": "echo", "e2": "echo"})
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, now=0.0)
    h.request(A, "r1", "echo", "get", now=0.0)
    assert one(h.take()[0]).msg.attempt == 1
    h.disconnect(M1, now=1.0)
    assert h.take() == ([], [], [])  # re-queued; no manager left to run it
    assert h.core.queued("echo") == 1
    h.ready(M2, "echo", ops={"get": IDEMPOTENT}, now=2.0)
    assert one(h.take()[0]).msg.attempt == 2
    h.disconnect(M2, now=3.0)
    r = one(h.take()[1])
    assert (r.id, r.code, r.retryable) == ("r1", "RETRIES_EXHAUSTED", False)
    assert "[scheduler] max_requeues = 1" in r.message and "2 times" in r.message
    assert "m2" in r.message and "disconnected" in r.message
    assert not h.core.pending and h.core.queued("echo") == 0


def test_max_requeues_zero_fails_at_the_first_death() -> None:
    h = CoreHarness(make_config(scheduler={"max_requeues": 0}), expected={"e1": "echo"})
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, now=0.0)
    h.request(A, "r1", "echo", "get", now=0.0)
    h.take()
    h.disconnect(M1, now=1.0)
    r = one(h.take()[1])
    assert r.code == "RETRIES_EXHAUSTED" and "max_requeues = 0" in r.message


def test_a_new_incarnation_replaces_the_old_one() -> None:
    h = CoreHarness()
    h.ready(M1, "echo", ops={"get": IDEMPOTENT, "put": PLAIN}, capacity=2, incarnation="one", now=0.0)
    h.request(A, "g", "echo", "get")
    h.request(A, "p", "echo", "put")
    h.take()
    # the same process announcing itself again: nothing lost
    g, p = h.core.registry.get(M1).inflight.values()
    h.ready(M1, "echo", ops={"get": IDEMPOTENT, "put": PLAIN}, capacity=2, incarnation="one",
            running=[(g.client, g.id, None), (p.client, p.id, None)], now=0.5)
    assert h.take() == ([], [], [])
    assert len(h.core.registry.get(M1).inflight) == 2
    # a restarted process under the same name and a new routing id: the old one's work is lost
    h.ready(M2, "echo", ops={"get": IDEMPOTENT, "put": PLAIN}, capacity=2, incarnation="two", name="m1", now=1.0)
    ds, rs, _ = h.take()
    assert h.core.registry.get(M1) is None
    assert [(d.id, d.to, d.msg.attempt) for d in ds] == [("g", M2, 2)]
    assert [(r.id, r.code) for r in rs] == [("p", "MANAGER_DIED")]
    assert "replaced by incarnation two" in rs[0].message


def test_a_message_from_an_unknown_manager_asks_it_to_register() -> None:
    h = CoreHarness()
    h.heartbeat(M1, running=[])
    s = one(h.new())
    assert s.to == M1 and isinstance(s.msg, Reregister)


# ==================================================================== preemption
def _two_llm_cores(h: CoreHarness) -> tuple[Dispatched, Dispatched]:
    h.ready(M1, "llm", ops={"chat": PREEMPTIBLE}, capacity=1, now=0.0)
    h.ready(M2, "llm", ops={"chat": PREEMPTIBLE}, capacity=1, now=0.0)
    h.request(A, "r1", "llm", "chat", now=0.1)
    h.request(B, "r2", "llm", "chat", agent="bob", now=0.1)
    d1, d2 = h.take()[0]
    assert (d1.id, d1.to, d2.id, d2.to) == ("r1", M1, "r2", M2)
    assert d1.msg.slice == 32 and not d1.msg.resume
    return d1, d2


def test_yield_with_affinity_brings_the_request_back_only_to_that_manager() -> None:
    h = CoreHarness(make_config(scheduler={"policy": "rr"}))
    d1, d2 = _two_llm_cores(h)
    h.partial(M1, d1, {"text": "Par"}, now=0.2)
    p = one(h.take()[1])
    assert (p.to, p.id, p.status, p.body) == (A, "r1", "partial", {"text": "Par"})
    busy_elsewhere = [(b"\x00x", "other", None)]
    h.heartbeat(M1, running=[d1] + busy_elsewhere, now=0.45)  # m1 also started something we do not track
    h.yield_(M1, d1, affinity=True, tokens=32, now=0.5)
    assert h.take() == ([], [], [])  # m1 still finishing that other work
    h.reply(M2, d2, now=0.6)  # m2 is free, but it does not hold r1's context
    ds, rs, _ = h.take()
    assert ds == [] and [r.id for r in rs] == ["r2"]
    assert h.core.queued("llm") == 1
    h.heartbeat(M1, running=[], now=0.7)
    d = one(h.take()[0])
    assert (d.id, d.to, d.msg.resume, d.msg.attempt) == ("r1", M1, True, 1)
    h.reply(M1, d, tokens=10, now=1.0)
    r = one(h.take()[1])
    assert r.msg.timing["preemptions"] == 1 and r.msg.timing["attempts"] == 2
    assert r.msg.timing["run_s"] == pytest.approx(0.4 + 0.3)  # both slices, not the wait between them
    assert h.core.stats["llm"].preemptions == 1


def test_yield_without_affinity_may_resume_anywhere() -> None:
    h = CoreHarness(make_config(scheduler={"policy": "rr"}))
    d1, d2 = _two_llm_cores(h)
    h.reply(M2, d2, now=0.3)
    h.take()
    h.heartbeat(M1, running=[d1, (b"\x00x", "other", None)], now=0.45)  # m1 busy with other work too
    h.yield_(M1, d1, affinity=False, now=0.5)
    d = one(h.take()[0])
    assert (d.id, d.to, d.msg.resume) == ("r1", M2, False)


def test_when_the_affinity_manager_dies_the_request_starts_over_elsewhere_with_a_reset() -> None:
    h = CoreHarness(make_config(scheduler={"policy": "rr"}))
    d1, d2 = _two_llm_cores(h)
    h.partial(M1, d1, {"text": "Par"}, now=0.1)
    h.heartbeat(M1, running=[d1, (b"\x00x", "other", None)], now=0.45)
    h.yield_(M1, d1, affinity=True, now=0.5)
    h.take()
    h.disconnect(M1, now=0.6)
    ds, rs, _ = h.take()
    reset = one(rs)
    assert (reset.to, reset.id, reset.status, reset.msg.reset) == (A, "r1", "partial", True)
    assert reset.body == {"reset": True}
    assert ds == []  # m2 is still busy with r2
    h.reply(M2, d2, now=0.7)
    ds, rs, _ = h.take()
    d = one(ds)
    assert (d.id, d.to, d.msg.resume) == ("r1", M2, False)
    assert [r.id for r in rs] == ["r2"]  # no second reset


def test_a_streamed_request_requeued_after_its_manager_died_gets_a_reset() -> None:
    h = CoreHarness(make_config(scheduler={"policy": "rr"}))
    d1, d2 = _two_llm_cores(h)
    h.partial(M1, d1, {"text": "Par"}, now=0.1)
    h.take()
    h.disconnect(M1, now=0.2)
    ds, rs, _ = h.take()
    assert [(r.id, r.status, r.msg.reset) for r in rs] == [("r1", "partial", True)]
    assert ds == []
    h.reply(M2, d2, now=0.3)
    assert [(d.id, d.to, d.msg.attempt) for d in h.take()[0]] == [("r1", M2, 2)]


@pytest.mark.parametrize("policy", ["las", "rr"])
def test_a_request_that_began_elsewhere_while_the_default_core_restarted_resumes_there(policy: str) -> None:
    """Issue 17 item 6. A request naming no model runs on the default core (m0), which dies; with
    no default registered it is re-run on another core (m1), where it yields with affinity after
    the default's new incarnation has registered. It must resume on m1 (it holds its context), not
    wait for a manager that is both the default and m1: there is none, so it stayed queued for good."""
    h = CoreHarness(make_config(scheduler={"policy": policy, "time_slice_tokens": 8}))
    M0, M0_AGAIN = b"m0", b"m0-again"
    h.ready(M0, "llm", ops={"chat": PREEMPTIBLE}, targets=["gemma"], default=True, name="llm-0", now=0.0)
    h.ready(M1, "llm", ops={"chat": PREEMPTIBLE}, targets=["gpt-a"], name="llm-1", now=0.0)
    h.ready(M2, "llm", ops={"chat": PREEMPTIBLE}, targets=["gpt-b"], name="llm-2", now=0.0)
    h.request(A, "r1", "llm", "chat", now=0.1)
    d = one(h.take()[0])
    assert (d.id, d.to) == ("r1", M0)
    h.partial(M0, d, {"delta": "Par"}, now=0.2)
    h.take()
    # m0 is killed: silent; the others keep beating
    for t in (1.0, 2.0, 3.0):
        h.heartbeat(M1, now=t)
        h.heartbeat(M2, now=t)
    h.tick(now=3.5)
    ds, rs, _ = h.take()
    assert [(r.id, r.msg.reset) for r in rs] == [("r1", True)]
    d = one(ds)
    assert d.id == "r1" and d.to in (M1, M2) and not d.msg.resume  # no default left: any core serves it
    core = d.to
    h.ready(M0_AGAIN, "llm", ops={"chat": PREEMPTIBLE}, targets=["gemma"], default=True, name="llm-0", now=3.6)
    assert h.take()[0] == []
    h.yield_(core, d, affinity=True, tokens=8, now=3.7)
    d = one(h.take()[0])
    assert (d.id, d.to, d.msg.resume) == ("r1", core, True)
    h.reply(core, d, tokens=3, now=3.8)
    assert [r.id for r in h.take()[1]] == ["r1"]
    assert h.core.queued("llm") == 0 and not h.core.pending
    # new requests naming no model still go to the default core only
    h.request(A, "r2", "llm", "chat", now=4.0)
    assert [(d.id, d.to) for d in h.take()[0]] == [("r2", M0_AGAIN)]


# ==================================================================== clients gone
def test_a_client_gone_cancels_its_queued_and_running_work() -> None:
    h = CoreHarness()
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, capacity=1, now=0.0)
    h.request(A, "r1", "echo", "get", now=0.0)
    h.request(A, "r2", "echo", "get", now=0.0)
    h.request(B, "r3", "echo", "get", agent="bob", now=0.0)
    assert [d.id for d in h.take()[0]] == ["r1"]
    pending = dict(h.core.pending)
    h.client_gone(A, now=1.0)
    ds, rs, other = h.take()
    assert rs == []  # nobody to answer
    assert cancels(other) == [(M1, "r1", A)]
    assert ds == []  # r1's handler is still running until m1 reports
    assert set(h.core.pending) == {(B, "r3")} and h.core.queued("echo") == 1
    assert h.core.queued_by_agent("alice") == 0
    assert pending[(A, "r1")].state is State.FAILED and pending[(A, "r2")].state is State.FAILED
    h.heartbeat(M1, running=[], now=1.1)
    assert [d.id for d in h.take()[0]] == ["r3"]


# ======================================================= busy after a restart
def test_ready_with_busy_at_capacity_dispatches_nothing_until_a_heartbeat_reports_work_gone() -> None:
    h = CoreHarness()
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, capacity=2, running=ghosts(2), now=0.0)
    for rid in ("r1", "r2", "r3"):
        h.request(A, rid, "echo", "get")
    assert h.take()[0] == []
    h.heartbeat(M1, running=ghosts(2), now=1.0)
    assert h.take()[0] == []
    h.heartbeat(M1, running=[], now=2.0)
    assert [d.id for d in h.take()[0]] == ["r1", "r2"]
    assert h.core.queued("echo") == 1


def test_ready_with_busy_at_capacity_dispatches_after_a_late_reply_reports_work_gone() -> None:
    h = CoreHarness()
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, capacity=1, running=[(b"\x00gone", "old", None)], now=0.0)
    h.request(A, "r1", "echo", "get")
    assert h.take()[0] == []
    # the reply for work this scheduler never saw (dispatched by its previous incarnation)
    h.manager(M1, messages.Reply("old", "ok", client=b"\x00gone"), {"x": 1}, now=2.0)
    ds, rs, _ = h.take()
    assert [d.id for d in ds] == ["r1"] and rs == []  # and nothing forwarded to anyone


def test_work_reported_busy_and_new_dispatches_add_up() -> None:
    """After a restart the manager reports 1 of its 2 slots busy with old work: exactly one new
    request may go there, not two (the report does not include what is dispatched after it)."""
    h = CoreHarness()
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, capacity=2, running=ghosts(2), now=0.0)
    for rid in ("r1", "r2", "r3"):
        h.request(A, rid, "echo", "get")
    h.heartbeat(M1, running=ghosts(1), now=1.0)
    assert [d.id for d in h.take()[0]] == ["r1"], "the manager got more requests than it has free slots"
    # a report made before r1 arrived there does not free r1's slot: r1 is in flight
    h.heartbeat(M1, running=ghosts(1), now=1.5)
    assert h.take()[0] == []
    h.heartbeat(M1, running=[], now=2.0)  # the old work finished: one more slot
    assert [d.id for d in h.take()[0]] == ["r2"]


# ============================================================ per-target limits
def test_per_target_limit_lets_other_targets_pass() -> None:
    h = CoreHarness()
    h.ready(M1, "tool", ops={"run": PLAIN}, capacity=4, targets=["slow", "fast"], limits={"slow": 1}, now=0.0)
    h.request(A, "s1", "tool", "run", target="slow")
    h.request(A, "s2", "tool", "run", target="slow")
    h.request(A, "f1", "tool", "run", target="fast")
    ds = h.take()[0]
    assert [d.id for d in ds] == ["s1", "f1"]
    assert h.core.registry.get(M1).per_target == {"slow": 1, "fast": 1}
    h.reply(M1, ds[0], now=1.0)
    assert [d.id for d in h.take()[0]] == ["s2"]


# ================================================================ second finals
def test_a_second_final_reply_for_the_same_request_is_ignored() -> None:
    h = CoreHarness()
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, capacity=2, now=0.0)
    h.request(A, "r1", "echo", "get")
    d = one(h.take()[0])
    h.reply(M1, d, body={"n": 1}, now=1.0)
    h.reply(M1, d, body={"n": 2}, now=1.1)
    h.reply(M1, d, status="error", body={"error": {"code": "INTERNAL", "message": "x", "retryable": False}},
            now=1.2)
    rs = h.take()[1]
    assert [(r.id, r.body) for r in rs] == [("r1", {"n": 1})]
    assert h.core.stats["echo"].completed == 1 and h.core.stats["echo"].errors == 0
    assert h.core.registry.get(M1).completed == 1 and h.core.registry.get(M1).busy == 0


def test_replies_and_yields_from_a_manager_not_running_the_request_are_ignored() -> None:
    h = CoreHarness()
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, capacity=1, now=0.0)
    h.ready(M2, "echo", ops={"get": IDEMPOTENT}, capacity=1, now=0.0)
    h.request(A, "r1", "echo", "get", now=0.1)
    d = one(h.take()[0])
    other = M2 if d.to == M1 else M1
    h.partial(other, d, {"forged": True}, now=0.2)
    h.reply(other, d, body={"forged": True}, now=0.3)
    h.yield_(other, d, affinity=True, now=0.4)
    assert h.take() == ([], [], [])
    assert h.core.pending[(A, "r1")].state is State.RUNNING
    h.reply(d.to, d, body={"real": True}, now=0.5)
    assert [(r.id, r.body) for r in h.take()[1]] == [("r1", {"real": True})]


# ============================================================ calls between managers
def _call_setup(h: CoreHarness, *, cap_b: int = 1, deadline: float | None = None) -> Dispatched:
    h.ready(MA, "a", ops={"x": PLAIN}, capacity=2, now=0.0)
    h.ready(MB, "b", ops={"y": PLAIN}, capacity=cap_b, now=0.0)
    h.request(A, "r1", "a", "x", agent="alice", deadline=deadline, now=0.0)
    d = one(h.take()[0])
    assert d.to == MA
    return d


def test_a_call_is_queued_for_the_parents_agent_and_answered_to_the_calling_manager() -> None:
    h = CoreHarness()
    parent = _call_setup(h, deadline=10.0)
    h.call(MA, "c1", "b", "y", parent=parent, body={"q": 1}, deadline=30.0, now=1.0)
    d = one(h.take()[0])
    assert d.to == MB
    m = d.msg
    assert (m.id, m.client, m.agent, m.service, m.op, m.caller) == ("c1", backend_client(MA), "alice", "b", "y", "a")
    assert m.deadline == pytest.approx(9.0)  # bounded by what the parent has left
    assert d.body == {"q": 1}
    req = h.core.pending[(backend_client(MA), "c1")]
    assert req.parent is h.core.pending[(A, "r1")] and req.agent == "alice" and req.caller == "a"
    h.reply(MB, d, body={"answer": 2}, now=2.0)
    r = one(h.take()[1])
    assert (r.to, r.id, r.status, r.body) == (BACKEND_CLIENT + MA, "c1", "ok", {"answer": 2})
    assert h.core.pending[(A, "r1")].children == set()


def test_a_call_cycle_is_refused() -> None:
    h = CoreHarness()
    parent = _call_setup(h)
    h.call(MA, "c1", "b", "y", parent=parent, now=1.0)
    child = one(h.take()[0])
    h.call(MB, "c2", "a", "x", parent=child, now=1.5)
    ds, rs, _ = h.take()
    r = one(rs)
    assert ds == []
    assert (r.to, r.id, r.code) == (BACKEND_CLIENT + MB, "c2", "CALL_CYCLE")
    assert "a.x -> b.y -> a.x" in r.message
    assert h.core.queued("a") == 0


def test_a_call_from_a_handler_to_its_own_service_is_a_cycle() -> None:
    h = CoreHarness()
    parent = _call_setup(h)
    h.call(MA, "c1", "a", "x", parent=parent, now=1.0)
    r = one(h.take()[1])
    assert r.code == "CALL_CYCLE" and "a.x -> a.x" in r.message


def test_a_call_whose_parent_is_not_running_on_the_caller_is_invalid() -> None:
    h = CoreHarness()
    parent = _call_setup(h)
    h.call(MB, "c1", "a", "x", parent=parent, now=1.0)  # r1 runs on ma, not mb
    r = one(h.take()[1])
    assert (r.to, r.code, r.retryable) == (BACKEND_CLIENT + MB, "INVALID_ARGUMENT", False)
    assert "'r1'" in r.message and "mb" in r.message
    assert not any(k[0] == backend_client(MB) for k in h.core.pending)


def test_a_call_when_the_parent_has_no_time_left() -> None:
    h = CoreHarness()
    parent = _call_setup(h, deadline=1.0)
    h.call(MA, "c1", "b", "y", parent=parent, now=1.0)
    r = one(h.take()[1])
    assert r.code == "DEADLINE_EXCEEDED" and "a.x -> b.y" in r.message


def test_a_parent_ending_cancels_its_pending_children() -> None:
    h = CoreHarness()
    parent = _call_setup(h, cap_b=1)
    h.call(MA, "c1", "b", "y", parent=parent, now=1.0)
    h.call(MA, "c2", "b", "y", parent=parent, now=1.0)
    running = one(h.take()[0])
    assert running.id == "c1" and h.core.queued("b") == 1
    h.reply(MA, parent, body={"done": True}, now=2.0)  # the handler gave up on its calls and returned
    ds, rs, other = h.take()
    by_id = {r.id: r for r in rs}
    assert by_id["r1"].to == A and by_id["r1"].status == "ok"
    for cid in ("c1", "c2"):
        assert by_id[cid].to == BACKEND_CLIENT + MA and by_id[cid].code == "CANCELLED"
        assert "a.x" in by_id[cid].message
    assert cancels(other) == [(MB, "c1", BACKEND_CLIENT + MA)]
    assert h.core.queued("b") == 0 and set(h.core.pending) == set()


def test_a_calling_manager_lost_cancels_the_calls_it_made() -> None:
    h = CoreHarness()
    parent = _call_setup(h, cap_b=1)
    h.call(MA, "c1", "b", "y", parent=parent, now=1.0)
    h.call(MA, "c2", "b", "y", parent=parent, now=1.0)
    h.take()
    h.disconnect(MA, now=2.0)
    ds, rs, other = h.take()
    assert [(r.to, r.id, r.code) for r in rs if r.to == A] == [(A, "r1", "MANAGER_DIED")]
    assert cancels(other) == [(MB, "c1", BACKEND_CLIENT + MA)]
    assert h.core.queued("b") == 0 and not h.core.pending


def test_under_las_a_childs_service_is_charged_to_the_originating_agent() -> None:
    h = CoreHarness(make_config(scheduler={"policy": "las"}))
    parent = _call_setup(h)
    h.call(MA, "c1", "b", "y", parent=parent, now=1.0)
    child = one(h.take()[0])
    h.reply(MB, child, tokens=50, now=1.5)
    assert dict(h.core.queues["b"].attained) == {"alice": 50}
    # a child charged by time when it reports no tokens (1 ms = 1 unit)
    h.call(MA, "c2", "b", "y", parent=parent, now=2.0)
    child2 = one(h.take()[0])
    h.reply(MB, child2, now=2.25)
    assert h.core.queues["b"].attained["alice"] == pytest.approx(50 + 250)


# =========================================================== unavailable services
def test_a_service_whose_processes_are_all_fatal_is_unavailable_at_once() -> None:
    states = {"b1": ("FATAL", "crashed 5 times within 5s"), "b2": ("STOPPED", "")}
    h = CoreHarness(expected={"b1": "b", "b2": "b"}, process_state=states.get)
    h.request(A, "r1", "b", "y", now=0.0)
    r = one(h.take()[1])
    assert (r.id, r.code, r.retryable) == ("r1", "UNAVAILABLE", True)
    assert "b1 is FATAL (crashed 5 times within 5s)" in r.message and "b2 is STOPPED" in r.message
    assert h.core.queued("b") == 0
    # while one of them may still come up, the request waits
    states["b2"] = ("STARTING", "")
    h.request(A, "r2", "b", "y", now=0.0)
    assert h.take() == ([], [], []) and h.core.queued("b") == 1


def test_a_registration_whose_process_went_fatal_is_dropped_and_the_call_answered_at_once() -> None:
    """Issue 17 item 4: a manager that dies soon after each start is still registered when the
    supervisor gives up on it (the heartbeat expiry is longer than its life). A call must not be
    sent to that registration and left to its deadline: the supervisor's table says it is gone."""
    states = {"b1": ("RUNNING", "")}
    h = CoreHarness(expected={"b1": "b"}, process_state=states.get)
    h.ready(M1, "b", ops={"y": IDEMPOTENT}, name="b1", now=0.0)
    states["b1"] = ("FATAL", "crashed 4 times within 5.0s of starting; gave up")
    h.request(A, "r1", "b", "y", now=0.3)
    ds, rs, _ = h.take()
    assert ds == [] and h.core.registry.get(M1) is None
    r = one(rs)
    assert (r.id, r.code, r.retryable) == ("r1", "UNAVAILABLE", True)
    assert "b1 is FATAL (crashed 4 times" in r.message


def test_requests_queued_or_running_when_a_service_goes_fatal_are_answered_at_the_next_tick() -> None:
    """Issue 17 item 4, work already there: a running request (its manager's registration still
    looks alive), one queued behind it, and one queued for a service that never registered since
    this scheduler started. Once the supervisor says FATAL, each is answered, none waits out its
    deadline; a service still starting keeps its queue."""
    states = {"b1": ("RUNNING", ""), "c1": ("STARTING", ""), "e1": ("STARTING", "")}
    h = CoreHarness(make_config(scheduler={"max_requeues": 10}),
                    expected={"b1": "b", "c1": "c", "e1": "e"}, process_state=states.get)
    h.ready(M1, "b", ops={"y": IDEMPOTENT, "n": PLAIN}, name="b1", capacity=2, now=0.0)
    h.request(A, "run-idem", "b", "y", deadline=60.0, now=0.1)
    h.request(A, "run-plain", "b", "n", deadline=60.0, now=0.1)
    h.request(A, "queued", "b", "y", deadline=60.0, now=0.1)
    h.request(A, "never-registered", "c", "y", deadline=60.0, now=0.1)
    h.request(A, "still-starting", "e", "y", deadline=60.0, now=0.1)
    assert len(h.take()[0]) == 2
    h.tick(now=0.5)
    assert h.take()[1] == []  # nothing is FATAL yet: all wait
    states["b1"] = ("FATAL", "gave up")
    states["c1"] = ("FATAL", "gave up")
    h.tick(now=1.0)  # well before the heartbeat expiry and every deadline
    by_id = {r.id: r for r in h.take()[1]}
    assert sorted(by_id) == ["never-registered", "queued", "run-idem", "run-plain"]
    assert by_id["run-plain"].code == "MANAGER_DIED"  # it may have run: not safe to say otherwise
    assert "its process is FATAL" in by_id["run-plain"].message
    for rid in ("run-idem", "queued", "never-registered"):
        assert by_id[rid].code == "UNAVAILABLE" and "is FATAL (gave up)" in by_id[rid].message
    assert h.core.queued("b") == h.core.queued("c") == 0 and h.core.queued("e") == 1


def test_a_stale_cached_backoff_does_not_drop_the_new_incarnation() -> None:
    """`exited` confirms a cached BACKOFF with a fresh read of the supervisor's table: the cache may
    predate the restart whose new incarnation is the registered one."""
    from aios.scheduler.supervised import exited
    h = CoreHarness()
    h.ready(M1, "b", ops={"y": IDEMPOTENT}, name="b1")
    mgr = h.core.registry.get(M1)
    table = {"cached": ("BACKOFF", "exited with code 1"), "fresh": ("RUNNING", "")}
    assert exited([mgr], lambda name, fresh=False: table["fresh" if fresh else "cached"]) == []
    table["fresh"] = ("BACKOFF", "exited with code 1")
    assert exited([mgr], lambda name, fresh=False: table["fresh" if fresh else "cached"]) == [(mgr, "BACKOFF")]
    assert exited([mgr], lambda name, fresh=False: None) == []  # not a process the supervisor runs


# ======================================================================= the cache
def _serve(h: CoreHarness, rid: str, body: Any, client: bytes = A) -> None:
    h.request(client, rid, "echo", "get")
    d = one(h.take()[0])
    h.reply(M1, d, body=body)
    assert one(h.take()[1]).id == rid


def test_the_reply_cache_is_bounded_by_count() -> None:
    h = CoreHarness(make_config(kernel={"reply_cache": 2}))
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, now=0.0)
    for rid in ("r1", "r2", "r3"):
        _serve(h, rid, {"v": rid})
    assert list(h.core.reply_cache) == [(A, "r2"), (A, "r3")]
    h.request(A, "r3", "echo", "get")
    ds, rs, _ = h.take()
    assert ds == [] and one(rs).body == {"v": "r3"}
    h.request(A, "r1", "echo", "get")  # evicted: runs again
    assert [d.id for d in h.take()[0]] == ["r1"]


def test_the_reply_cache_is_bounded_by_bytes() -> None:
    limit_mb = 0.004  # 4194 bytes
    h = CoreHarness(make_config(kernel={"reply_cache_mb": limit_mb}))
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, now=0.0)
    big = {"blob": "x" * 1500}
    for rid in ("r1", "r2", "r3", "r4"):
        _serve(h, rid, big)
    limit = int(limit_mb * 1024 * 1024)
    entry = len(pack(big)) + 200
    assert list(h.core.reply_cache) == [(A, "r3"), (A, "r4")]  # 2 entries fit in the limit, 3 do not
    assert h.core.reply_cache_bytes == 2 * entry <= limit
    # a reply larger than the whole budget is not kept
    _serve(h, "huge", {"blob": "y" * 10_000})
    assert h.core.reply_cache_bytes <= limit
    assert (A, "huge") not in h.core.reply_cache


def test_a_zero_reply_cache_keeps_nothing() -> None:
    h = CoreHarness(make_config(kernel={"reply_cache": 0}))
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, now=0.0)
    _serve(h, "r1", {"v": 1})
    assert not h.core.reply_cache and h.core.reply_cache_bytes == 0


# ================================================================ bodies released
def test_request_bodies_are_released_once_done() -> None:
    h = CoreHarness(expected={"echo1": "echo"})
    big = {"blob": "z" * 5000}
    h.request(A, "ok", "echo", "get", body=big, now=0.0)
    h.request(A, "late", "echo", "get", body=big, deadline=1.0, now=0.0)
    h.request(B, "gone", "echo", "get", body=big, agent="bob", now=0.0)
    reqs = dict(h.core.pending)
    assert all(len(r.body_raw) > 5000 for r in reqs.values())
    h.tick(now=1.0)
    assert reqs[(A, "late")].body_raw == b""
    h.client_gone(B, now=1.0)
    assert reqs[(B, "gone")].body_raw == b""
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, now=1.5)
    d = one(h.take()[0])
    assert d.body == big  # released only after the dispatch that needed it
    h.reply(M1, d, now=2.0)
    assert reqs[(A, "ok")].body_raw == b"" and not h.core.pending


# ==================================================================== kernel ops
def test_kernel_ops() -> None:
    h = CoreHarness(expected={"echo1": "echo"})
    h.core.started_at = 1.0
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, capacity=3, now=0.0)
    h.request(A, "p", "kernel", "ping", now=1.0)
    pong = one(h.take()[1])
    assert (pong.to, pong.id, pong.status, pong.body) == (A, "p", "ok", {"pong": True})
    h.request(A, "s", "kernel", "status", now=5.0)
    st = one(h.take()[1])
    assert st.status == "ok"
    body = st.body
    assert body["scheduler"]["policy"] == "fifo" and body["scheduler"]["uptime_s"] == 4.0
    assert body["queues"] == {"echo": 0} and body["pending"] == 0 and body["held"] == 0
    row = one(body["managers"])
    assert (row["name"], row["service"], row["capacity"], row["busy"], row["ops"]) == ("m1", "echo", 3, 0, ["get"])
    assert "echo" in body["services"] and "kernel" not in body["services"]
    h.request(A, "u", "kernel", "reboot", now=5.0)
    u = one(h.take()[1])
    assert u.code == "UNKNOWN_OP" and "'reboot'" in u.message and "ping" in u.message
    assert h.out.shutdowns == 0
    h.request(A, "x", "kernel", "shutdown", now=6.0)
    x = one(h.take()[1])
    assert (x.status, x.body) == ("ok", {"stopping": True}) and h.out.shutdowns == 1
    # kernel calls are not kept as pending work
    assert not h.core.pending


def test_close_answers_everything_pending_and_refuses_new_work() -> None:
    h = CoreHarness(expected={"echo1": "echo"})
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, capacity=1, now=0.0)
    h.request(A, "r1", "echo", "get")
    h.request(A, "r2", "echo", "get")
    h.take()
    h.core.close(1.0)
    ds, rs, other = h.take()
    assert sorted((r.id, r.code) for r in rs) == [("r1", "SHUTTING_DOWN"), ("r2", "SHUTTING_DOWN")]
    assert all(r.retryable for r in rs)
    assert cancels(other) == [(M1, "r1", A)]
    h.request(A, "r3", "echo", "get", now=1.5)
    assert one(h.take()[1]).code == "SHUTTING_DOWN"


def test_callers_with_pending_work_are_probed_once_per_heartbeat_interval() -> None:
    """The probe is how a vanished agent is noticed: sending to it fails, and its work is cancelled."""
    h = CoreHarness()
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, capacity=1, now=0.0)
    h.request(A, "r1", "echo", "get", now=0.0)
    h.request(B, "r2", "echo", "get", agent="bob", now=0.0)
    h.tick(now=0.1)
    assert sorted(c for c, _ in h.out.probes) == sorted([A, B])
    h.tick(now=0.5)
    assert len(h.out.probes) == 2  # not again within the interval (1 s)
    d1 = one(h.take()[0])
    h.reply(M1, d1, now=0.6)  # A has nothing pending any more
    h.tick(now=1.2)
    assert [c for c, _ in h.out.probes[2:]] == [B]
    assert h.out.probes[-1][1] == {"kind": "heartbeat"}
