"""Unit tests of the scheduling policies (no sockets, no processes)."""
from __future__ import annotations

import pytest

from aios.scheduler.options import SchedulerConfig
from aios.scheduler.policies import (
    POLICIES,
    FifoPolicy,
    LeastAttainedServicePolicy,
    Policy,
    RoundRobinPolicy,
    make_policy,
)
from aios.scheduler.request import Job


def req(name: str, agent: str = "a", target: str | None = None) -> Job:
    return Job(id=name, client=b"c-" + agent.encode(), agent=agent, service="llm", op="chat",
                   body_raw=b"\x80", created=0.0, target=target)


def queued_entries(p: Policy) -> int:
    """Entries a policy holds internally (live and dead), to check nothing piles up."""
    if isinstance(p, LeastAttainedServicePolicy):
        return sum(len(h) for agents in p._agents.values() for h in agents.values()) + \
            sum(len(o) for o in p._order.values())
    return sum(len(h) for h in p._heaps.values())  # type: ignore[attr-defined]


def drain(policy: Policy, fits=lambda cls: True) -> list[str]:
    out = []
    while (r := policy.pop(fits)) is not None:
        out.append(r.id)
    return out


def policy(name: str, **cfg) -> Policy:
    return make_policy(SchedulerConfig(policy=name, **cfg))


ALL = sorted(POLICIES)


# ------------------------------------------------------------------ common
def test_registry() -> None:
    assert set(POLICIES) == {"fifo", "rr", "las"}
    assert isinstance(policy("fifo"), FifoPolicy)
    assert isinstance(policy("rr"), RoundRobinPolicy)
    assert isinstance(policy("las"), LeastAttainedServicePolicy)
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        policy("lottery")


@pytest.mark.parametrize("name", ALL)
def test_empty_pop_returns_none(name: str) -> None:
    p = policy(name)
    assert p.pop(lambda cls: True) is None
    assert len(p) == 0 and list(p) == []


@pytest.mark.parametrize("name", ALL)
def test_arrival_order_for_fresh_requests(name: str) -> None:
    p = policy(name)
    rs = [req(f"r{i}", agent="a") for i in range(5)]
    for r in rs:
        p.push(r)
    assert len(p) == 5
    assert [r.id for r in p] == [r.id for r in rs]
    assert drain(p) == [r.id for r in rs]
    assert len(p) == 0


@pytest.mark.parametrize("name", ALL)
def test_pop_with_fits_skips_and_keeps(name: str) -> None:
    p = policy(name)
    a1, b1, a2, b2 = req("a1", target="a"), req("b1", target="b"), req("a2", target="a"), req("b2", target="b")
    for r in (a1, b1, a2, b2):
        p.push(r)
    only_b = lambda cls: cls[0] == "b"  # noqa: E731  (the placement class is (target, affinity))
    assert p.pop(only_b) is b1
    assert len(p) == 3
    assert p.pop(only_b) is b2
    assert p.pop(only_b) is None  # nothing fits: nothing is lost
    assert len(p) == 2
    assert [r.id for r in p] == ["a1", "a2"]
    assert drain(p) == ["a1", "a2"]


@pytest.mark.parametrize("name", ALL)
def test_pop_with_nothing_fitting_changes_nothing(name: str) -> None:
    p = policy(name)
    for i in range(4):
        p.push(req(f"r{i}"))
    for _ in range(3):
        assert p.pop(lambda cls: False) is None
    assert len(p) == 4
    assert drain(p) == ["r0", "r1", "r2", "r3"]


@pytest.mark.parametrize("name", ALL)
def test_fits_is_asked_about_classes_not_requests(name: str) -> None:
    """A saturated target's deep queue is passed over in one question, whatever its depth."""
    p = policy(name)
    for i in range(5000):
        p.push(req(f"slow{i}", agent=f"x{i % 7}", target="slow"))
    fast = req("fast", agent="y", target="fast")
    p.push(fast)
    asked: list[tuple] = []
    got = p.pop(lambda cls: asked.append(cls) or cls[0] == "fast")
    assert got is fast
    assert len(asked) <= 2 and ("slow", None) in asked
    assert len(p) == 5000


@pytest.mark.parametrize("name", ALL)
def test_reaffine_lets_waiting_requests_run_anywhere(name: str) -> None:
    p = policy(name)
    pinned = [req(f"p{i}") for i in range(3)]
    for r in pinned:
        r.affinity = b"dead-manager"
        p.push(r)
    free = req("free")
    p.push(free)
    assert [r.id for r in drain_copy(p, lambda cls: cls[1] is None)] == ["free"]
    moved = p.reaffine(b"dead-manager")
    assert sorted(r.id for r in moved) == ["p0", "p1", "p2"]
    assert all(r.affinity is None for r in moved)
    assert drain(p, lambda cls: cls[1] is None) == ["p0", "p1", "p2", "free"]  # they kept their places


def drain_copy(p: Policy, fits) -> list[Job]:
    """Pop what fits, then put it back (the order check of one class without emptying the rest)."""
    out = []
    while (r := p.pop(fits)) is not None:
        out.append(r)
    for r in out:
        p.push(r)
    return out


@pytest.mark.parametrize("name", ALL)
def test_remove(name: str) -> None:
    p = policy(name)
    rs = [req(f"r{i}") for i in range(4)]
    for r in rs:
        p.push(r)
    assert p.remove(rs[1]) is True
    assert p.remove(rs[1]) is False  # already gone
    assert len(p) == 3
    assert [r.id for r in p] == ["r0", "r2", "r3"]
    assert drain(p) == ["r0", "r2", "r3"]
    assert p.remove(rs[0]) is False  # popped requests are not queued


@pytest.mark.parametrize("name", ALL)
def test_remove_then_pop_never_returns_removed(name: str) -> None:
    p = policy(name)
    rs = [req(f"r{i}", agent="ab"[i % 2]) for i in range(10)]
    for r in rs:
        p.push(r)
    for r in rs[::3]:
        p.remove(r)
    got = drain(p)
    assert sorted(got) == sorted(r.id for r in rs if r not in rs[::3])


@pytest.mark.parametrize("name", ALL)
def test_removed_requests_do_not_pile_up(name: str) -> None:
    """A service with no manager never pops; its expired requests must not leak in the heap."""
    p = policy(name)
    for i in range(2000):
        r = req(f"r{i}")
        p.push(r)
        assert p.remove(r)
    assert len(p) == 0
    assert queued_entries(p) < 200


@pytest.mark.parametrize("name", ALL)
def test_requeued_request_is_popped_again(name: str) -> None:
    p = policy(name)
    r = req("r")
    p.push(r)
    assert p.pop(lambda cls: True) is r
    p.requeue(r)
    assert len(p) == 1
    assert p.pop(lambda cls: True) is r
    assert p.pop(lambda cls: True) is None


# -------------------------------------------------------------------- fifo
def test_fifo_requeue_keeps_its_place() -> None:
    p = policy("fifo")
    r1, r2, r3 = req("r1"), req("r2"), req("r3")
    for r in (r1, r2, r3):
        p.push(r)
    assert p.pop(lambda cls: True) is r1
    p.push(r4 := req("r4"))
    p.requeue(r1)  # its manager died: it goes back to the head, not the tail
    assert drain(p) == ["r1", "r2", "r3", "r4"]
    assert r4.arrival > r1.arrival


def test_fifo_runs_to_completion() -> None:
    assert policy("fifo").slice_tokens(req("r")) is None


def test_fifo_ignores_agents() -> None:
    p = policy("fifo")
    for name, agent in (("a1", "a"), ("a2", "a"), ("b1", "b"), ("a3", "a")):
        p.push(req(name, agent))
    p.charge(req("x", "a"), 10.0, 10_000)
    assert drain(p) == ["a1", "a2", "b1", "a3"]


# ---------------------------------------------------------------------- rr
def test_rr_requeue_goes_to_tail() -> None:
    p = policy("rr", time_slice_tokens=7)
    r1, r2, r3 = req("r1"), req("r2"), req("r3")
    for r in (r1, r2, r3):
        p.push(r)
    assert p.slice_tokens(r1) == 7
    assert p.pop(lambda cls: True) is r1
    p.requeue(r1)  # slice used up
    assert [r.id for r in p] == ["r2", "r3", "r1"]
    assert p.pop(lambda cls: True) is r2
    p.push(r4 := req("r4"))
    p.requeue(r2)
    assert drain(p) == ["r3", "r1", "r4", "r2"]
    assert r4 is not None


def test_rr_cycles_through_requests() -> None:
    p = policy("rr")
    rs = [req(f"r{i}") for i in range(3)]
    for r in rs:
        p.push(r)
    order = []
    for _ in range(9):  # three slices each
        r = p.pop(lambda cls: True)
        order.append(r.id)
        p.requeue(r)
    assert order == ["r0", "r1", "r2"] * 3


# --------------------------------------------------------------------- las
def test_las_picks_least_attained_agent() -> None:
    p = policy("las", time_slice_tokens=16)
    assert p.slice_tokens(req("r")) == 16
    p.charge(req("x", "heavy"), 1.0, 500)
    p.charge(req("x", "light"), 1.0, 20)
    h1 = req("h1", "heavy")
    l1 = req("l1", "light")
    n1 = req("n1", "new")
    for r in (h1, l1, n1):
        p.push(r)
    assert drain(p) == ["n1", "l1", "h1"]


def test_las_ties_broken_by_arrival() -> None:
    p = policy("las")
    for name, agent in (("x1", "x"), ("y1", "y"), ("x2", "x"), ("z1", "z")):
        p.push(req(name, agent))
    assert drain(p) == ["x1", "y1", "x2", "z1"]


def test_las_reevaluates_queued_requests_after_charges() -> None:
    p = policy("las")
    a1, a2, b1 = req("a1", "a"), req("a2", "a"), req("b1", "b")
    for r in (a1, a2, b1):
        p.push(r)
    assert p.pop(lambda cls: True) is a1
    p.charge(a1, 0.5, 40)  # a1 ran 40 tokens: agent a now has more service than b
    assert p.pop(lambda cls: True) is b1  # a2 was queued with share 0, must not win on a stale key
    assert p.pop(lambda cls: True) is a2


def test_las_preempted_request_yields_to_other_agent() -> None:
    p = policy("las", time_slice_tokens=8)
    long_, short = req("long", "writer"), req("short", "chatter")
    p.push(long_)
    assert p.pop(lambda cls: True) is long_
    p.push(short)
    p.charge(long_, 0.2, 8)
    p.requeue(long_)
    assert p.pop(lambda cls: True) is short
    p.charge(short, 0.01, 2)
    assert p.pop(lambda cls: True) is long_  # it was still queued behind the short call
    assert p.pop(lambda cls: True) is None


def test_las_honours_weights() -> None:
    p = policy("las", weights={"gold": 4.0})
    p.charge(req("x", "gold"), 1.0, 100)    # share 100 / 4 = 25
    p.charge(req("x", "plain"), 1.0, 50)    # share 50 / 1 = 50
    pl, gd = req("p1", "plain"), req("g1", "gold")
    p.push(pl)
    p.push(gd)
    assert drain(p) == ["g1", "p1"]
    # without the weight, gold (100) would come after plain (50)
    q = policy("las")
    q.charge(req("x", "gold"), 1.0, 100)
    q.charge(req("x", "plain"), 1.0, 50)
    q.push(req("p1", "plain"))
    q.push(req("g1", "gold"))
    assert drain(q) == ["p1", "g1"]


def test_las_weighted_shares_over_many_slices() -> None:
    """With weights 3:1 and equal slices, the heavy-weight agent gets ~3x the slices."""
    p = policy("las", weights={"big": 3.0})
    reqs = {"big": req("B", "big"), "small": req("S", "small")}
    for r in reqs.values():
        p.push(r)
    runs = {"big": 0, "small": 0}
    for _ in range(400):
        r = p.pop(lambda cls: True)
        runs[r.agent] += 1
        p.charge(r, 0.0, 10)
        p.requeue(r)
    assert runs["big"] + runs["small"] == 400
    assert 2.8 <= runs["big"] / runs["small"] <= 3.2


def test_las_charges_time_when_no_tokens() -> None:
    p = policy("las")
    p.charge(req("x", "a"), 0.5, 0)   # 500 units
    p.charge(req("x", "b"), 0.0, 100)  # 100 units
    p.push(req("a1", "a"))
    p.push(req("b1", "b"))
    assert drain(p) == ["b1", "a1"]


def test_las_fits_and_remove() -> None:
    p = policy("las")
    p.charge(req("x", "a"), 0.0, 5)
    a1, b1, b2 = req("a1", "a", "t1"), req("b1", "b", "t2"), req("b2", "b", "t2")
    for r in (a1, b1, b2):
        p.push(r)
    assert p.pop(lambda cls: cls[0] == "t1") is a1  # b's are skipped but stay queued
    assert p.remove(b1)
    assert drain(p) == ["b2"]


def test_las_charges_do_not_reorder_a_flood() -> None:
    """10,000 queued requests of one agent: charging agents costs O(log n), not a re-sort of the flood."""
    p = policy("las")
    for i in range(10_000):
        p.push(req(f"f{i}", "flooder"))
    others = [req(f"o{i}", f"other{i}") for i in range(20)]
    for r in others:
        p.push(r)
    before = queued_entries(p)
    for i in range(200):
        p.charge(req("x", "flooder"), 0.0, 1)
        p.charge(req("x", f"other{i % 20}"), 0.0, 1)
    assert queued_entries(p) - before <= 2 * 200 + 64  # at most one new entry per charge
    # the other agents (less service) all come before the flooder's next request
    got = [p.pop(lambda cls: True).agent for _ in range(21)]
    assert sorted(got[:20]) == sorted(r.agent for r in others) and got[20] == "flooder"
