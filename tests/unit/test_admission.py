"""Unit tests of the admission step (no sockets): decisions, holds released by poll(), QueueQuota, Chain.

`Gate` below is a small Admission written the way a real one would be (an
access check waiting for a person's confirmation): it holds requests for
some ops and reports the verdicts the test gives it on the next poll().
"""
from __future__ import annotations

from typing import Any

import pytest

from aios.protocol import ErrorCode
from aios.scheduler.admission import (
    ALLOW,
    Admission,
    AdmitAll,
    Chain,
    Decision,
    QueueQuota,
    deny,
    hold,
    load_admission,
)
from aios.scheduler.admission import make_admission
from aios.scheduler.request import Job, State
from tests.support.core_harness import IDEMPOTENT, CoreHarness, make_config

A = b"\x00agent-a"
B = b"\x00agent-b"
M1 = b"m1"


class Gate(Admission):
    """Holds requests for `held_ops` until the test decides; denies `denied_agents` at once."""

    name = "gate"

    def __init__(self, held_ops: list[str] | tuple[str, ...] = ("confirm",),
                 denied_agents: list[str] | tuple[str, ...] = ()) -> None:
        self.held_ops = set(held_ops)
        self.denied_agents = set(denied_agents)
        self.waiting: dict[str, Job] = {}
        self.verdicts: list[tuple[Job, Decision]] = []
        self.forgotten: list[str] = []
        self.seen: list[str] = []

    def admit(self, req: Job, view: Any) -> Decision:
        self.seen.append(req.id)
        if req.agent in self.denied_agents:
            return deny(ErrorCode.DENIED, f"agent {req.agent!r} may not call {req.service}.{req.op}")
        if req.op in self.held_ops:
            self.waiting[req.id] = req
            return hold(f"waiting for a person to confirm {req.service}.{req.op}")
        return ALLOW

    def decide(self, rid: str, decision: Decision) -> None:
        self.verdicts.append((self.waiting.pop(rid), decision))

    def poll(self, now: float) -> list[tuple[Job, Decision]]:
        out, self.verdicts = self.verdicts, []
        return out

    def forget(self, req: Job) -> None:
        self.forgotten.append(req.id)
        self.waiting.pop(req.id, None)


class Fixed(Admission):
    """Always the same decision; records that it was asked (for Chain order)."""

    def __init__(self, label: str, decision: Decision, log: list[str]) -> None:
        self.label, self.decision, self.log = label, decision, log
        self.polled: list[tuple[Job, Decision]] = []
        self.forgotten: list[Job] = []

    def admit(self, req: Job, view: Any) -> Decision:
        self.log.append(self.label)
        return self.decision

    def poll(self, now: float) -> list[tuple[Job, Decision]]:
        return list(self.polled)

    def forget(self, req: Job) -> None:
        self.forgotten.append(req)


def gated(**gate_kw: Any) -> tuple[CoreHarness, Gate]:
    gate = Gate(**gate_kw)
    h = CoreHarness(expected={"echo1": "echo"}, admission=gate)
    h.ready(M1, "echo", ops={"get": IDEMPOTENT, "confirm": IDEMPOTENT}, capacity=4, now=0.0)
    return h, gate


def nothing_happened(h: CoreHarness) -> bool:
    """No dispatch, no reply, nothing but heartbeats to managers since the last look."""
    ds, rs, other = h.take()
    return ds == [] and rs == [] and all(s.header["kind"] == "heartbeat" for s in other)


def _req(rid: str = "r", agent: str = "alice") -> Job:
    return Job(id=rid, client=A, agent=agent, service="echo", op="get", body_raw=b"", created=0.0)


# ---------------------------------------------------------------- decisions
def test_decisions() -> None:
    assert ALLOW.allowed and ALLOW.verdict == "allow" and ALLOW.code is None
    d = deny(ErrorCode.DENIED, "no")
    assert (d.verdict, d.code, d.message, d.allowed) == ("deny", ErrorCode.DENIED, "no", False)
    hd = hold("wait")
    assert (hd.verdict, hd.code, hd.message, hd.allowed) == ("hold", None, "wait", False)
    assert AdmitAll().admit(_req(), CoreHarness().core) is ALLOW
    assert AdmitAll().poll(1.0) == []


def test_allowed_requests_are_queued_and_dispatched() -> None:
    h, gate = gated()
    h.request(A, "r1", "echo", "get")
    (d,), rs, _ = h.take()
    assert d.id == "r1" and rs == [] and gate.seen == ["r1"]


def test_a_denied_request_is_answered_and_never_queued() -> None:
    h, gate = gated(denied_agents=["mallory"])
    h.request(A, "r1", "echo", "get", agent="mallory")
    ds, rs, _ = h.take()
    assert ds == []
    (r,) = rs
    assert (r.id, r.code, r.retryable) == ("r1", "DENIED", False)
    assert r.message == "agent 'mallory' may not call echo.get"
    assert not h.core.pending and h.core.queued("echo") == 0
    # a denied id is not remembered: asking again asks the step again
    h.request(A, "r1", "echo", "get", agent="mallory")
    assert h.take()[1][0].code == "DENIED" and gate.seen == ["r1", "r1"]


# ----------------------------------------------------------------------- holds
def test_a_held_request_is_queued_when_poll_allows_it() -> None:
    h, gate = gated()
    h.request(A, "r1", "echo", "confirm", now=0.0)
    assert h.take() == ([], [], [])  # a free manager, but the request is held
    req = h.core.pending[(A, "r1")]
    assert req.state is State.HELD and h.core.held == {(A, "r1"): req}
    assert h.core.queued("echo") == 0 and h.core.queued_by_agent("alice") == 0
    h.request(A, "s", "kernel", "status", now=0.5)
    assert h.take()[1][0].body["held"] == 1
    h.request(A, "r1", "echo", "confirm", now=0.6)  # a re-sent id while held: ignored
    assert h.take() == ([], [], []) and gate.seen == ["r1"]
    h.tick(now=1.0)
    assert nothing_happened(h)  # no verdict yet
    gate.decide("r1", ALLOW)
    h.tick(now=2.0)
    (d,), rs, _ = h.take()
    assert d.id == "r1" and rs == [] and not h.core.held
    h.reply(M1, d, now=3.0)
    (r,) = h.take()[1]
    assert r.status == "ok" and r.msg.timing["first_wait_s"] == 2.0


def test_a_held_request_is_answered_when_poll_denies_it() -> None:
    h, gate = gated()
    h.request(A, "r1", "echo", "confirm", now=0.0)
    gate.decide("r1", deny(ErrorCode.DENIED, "the person said no"))
    h.tick(now=1.0)
    ds, rs, _ = h.take()
    assert ds == []
    (r,) = rs
    assert (r.id, r.code, r.message) == ("r1", "DENIED", "the person said no")
    assert not h.core.pending and not h.core.held
    assert h.core.stats["echo"].errors == 1


def test_a_held_request_whose_deadline_passes_is_answered_and_forgotten() -> None:
    h, gate = gated()
    h.request(A, "r1", "echo", "confirm", deadline=2.0, now=0.0)
    req = h.core.pending[(A, "r1")]
    h.tick(now=1.9)
    assert nothing_happened(h)
    h.tick(now=2.0)
    ds, rs, _ = h.take()
    assert ds == []
    (r,) = rs
    assert (r.id, r.code) == ("r1", "DEADLINE_EXCEEDED") and "held for admission" in r.message
    assert gate.forgotten == ["r1"]  # the step may drop its prompt to the person
    assert not h.core.held and req.body_raw == b""
    # a verdict that comes anyway is ignored
    gate.verdicts.append((req, ALLOW))
    h.tick(now=3.0)
    assert nothing_happened(h)


def test_a_held_request_allowed_after_its_deadline_is_not_dispatched() -> None:
    """The verdict and the deadline are both due at one tick: the request's time is up, so it is
    answered DEADLINE_EXCEEDED and the manager never sees it."""
    h, gate = gated()
    h.request(A, "r1", "echo", "confirm", deadline=1.0, now=0.0)
    gate.decide("r1", ALLOW)
    h.tick(now=1.5)
    ds, rs, _ = h.take()
    assert [d.id for d in ds] == [], "dispatched a request whose deadline had passed"
    assert [(r.id, r.code) for r in rs] == [("r1", "DEADLINE_EXCEEDED")]


def test_a_held_request_of_a_client_gone_is_forgotten_quietly() -> None:
    h, gate = gated()
    h.request(A, "r1", "echo", "confirm", now=0.0)
    h.request(B, "r2", "echo", "confirm", agent="bob", now=0.0)
    h.client_gone(A, now=1.0)
    assert h.take() == ([], [], []) and gate.forgotten == ["r1"]
    assert set(h.core.held) == {(B, "r2")}


# ------------------------------------------------------------------ QueueQuota
def test_queue_quota_refuses_an_agents_flood_and_admits_again_when_it_drains() -> None:
    h = CoreHarness(make_config(scheduler={"max_queued_per_agent": 2}), expected={"echo1": "echo"})
    assert isinstance(h.core.admission, Chain)
    h.request(A, "a1", "echo", "get")
    h.request(A, "a2", "echo", "get")
    h.request(A, "a3", "echo", "get")
    (r,) = h.take()[1]
    assert (r.id, r.code, r.retryable) == ("a3", "OVERLOADED", True)
    assert "'alice'" in r.message and "2 requests queued" in r.message
    assert "limit 2" in r.message and "[scheduler] max_queued_per_agent" in r.message
    # another agent is not held back by alice's flood
    h.request(B, "b1", "echo", "get", agent="bob")
    assert h.take()[1] == [] and h.core.queued_by_agent("bob") == 1
    # once alice's requests run (running ones do not count), she is admitted again
    h.ready(M1, "echo", ops={"get": IDEMPOTENT}, capacity=3, now=1.0)
    assert [d.id for d in h.take()[0]] == ["a1", "a2", "b1"]
    assert h.core.queued_by_agent("alice") == 0
    h.request(A, "a3", "echo", "get", now=1.5)
    h.request(A, "a4", "echo", "get", now=1.5)
    assert h.take()[1] == [] and h.core.queued_by_agent("alice") == 2


def test_queue_quota_reads_the_view() -> None:
    h = CoreHarness(make_config(scheduler={"max_queued_per_agent": 0}), expected={"echo1": "echo"})
    q = QueueQuota(1)
    assert q.admit(_req(), h.core) is ALLOW
    h.request(A, "a1", "echo", "get")
    d = q.admit(_req("a2"), h.core)
    assert d.verdict == "deny" and d.code is ErrorCode.OVERLOADED and d.code.retryable
    assert q.admit(_req("b1", agent="bob"), h.core) is ALLOW


# ----------------------------------------------------------------------- Chain
def test_chain_asks_in_order_and_the_first_that_does_not_allow_decides() -> None:
    log: list[str] = []
    view = CoreHarness().core
    first = Fixed("first", ALLOW, log)
    second = Fixed("second", deny(ErrorCode.DENIED, "second says no"), log)
    third = Fixed("third", deny(ErrorCode.QUOTA_EXCEEDED, "third says no"), log)
    d = Chain([first, second, third]).admit(_req(), view)
    assert (d.code, d.message) == (ErrorCode.DENIED, "second says no") and log == ["first", "second"]
    log.clear()
    held = Fixed("held", hold("ask a person"), log)
    assert Chain([first, held, third]).admit(_req(), view).verdict == "hold" and log == ["first", "held"]
    log.clear()
    assert Chain([first, Fixed("also", ALLOW, log)]).admit(_req(), view) is ALLOW and log == ["first", "also"]
    assert Chain([]).admit(_req(), view) is ALLOW


def test_chain_polls_every_step_in_order_and_forgets_in_all() -> None:
    log: list[str] = []
    s1, s2 = Fixed("s1", ALLOW, log), Fixed("s2", ALLOW, log)
    r1, r2, r3 = _req("r1"), _req("r2"), _req("r3")
    s1.polled = [(r1, ALLOW)]
    s2.polled = [(r2, deny(ErrorCode.DENIED, "x")), (r3, ALLOW)]
    chain = Chain([s1, s2])
    assert [(r.id, d.verdict) for r, d in chain.poll(0.0)] == [("r1", "allow"), ("r2", "deny"), ("r3", "allow")]
    chain.forget(r1)
    assert s1.forgotten == [r1] and s2.forgotten == [r1]


# ------------------------------------------------------------------- configuration
def test_make_admission_from_config() -> None:
    assert isinstance(make_admission(make_config(scheduler={"max_queued_per_agent": 0})), AdmitAll)
    default = make_admission(make_config())
    assert isinstance(default, Chain) and [type(s) for s in default.steps] == [QueueQuota]
    assert default.steps[0].limit == 1000
    cfg = make_config(scheduler={"max_queued_per_agent": 5, "admission": "tests.unit.test_admission:Gate",
                                 "admission_options": {"held_ops": ["write"], "denied_agents": ["eve"]}})
    chain = make_admission(cfg)
    assert isinstance(chain, Chain) and [type(s) for s in chain.steps] == [QueueQuota, Gate]
    gate = chain.steps[1]
    assert isinstance(gate, Gate) and gate.held_ops == {"write"} and gate.denied_agents == {"eve"}


@pytest.mark.parametrize("target,why", [
    ("no.such.module:Gate", "cannot load admission step"),
    ("tests.unit.test_admission:NoSuchClass", "cannot load admission step"),
    ("aios.scheduler.admission:Decision", "is not an aios.scheduler.admission.Admission subclass"),
    ("aios.scheduler.admission:ALLOW", "is not an aios.scheduler.admission.Admission subclass"),
])
def test_load_admission_errors_name_the_target(target: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as info:
        load_admission(target, {})
    assert repr(target) in str(info.value)
