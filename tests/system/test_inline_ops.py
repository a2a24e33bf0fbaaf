"""Inline ops (`@op(..., inline=True)`): run on the manager's socket thread, batched, answered after
`end_batch` when deferred. Through the real process tree with the echo manager's test ops."""
from __future__ import annotations

import time

import pytest

from aios import sdk
from tests.support.waiting import in_thread, wait_until

pytestmark = pytest.mark.timeout(120)


def test_inline_ops_run_on_the_socket_thread_and_pool_ops_do_not(kernel) -> None:
    k = kernel()
    with k.client("alice") as c:
        assert c.call("echo", "hold", seconds=0)["thread"] == "MainThread"
        assert c.call("echo", "where", text="x")["thread"] != "MainThread"
        done = c.call("echo", "tally")
        assert done["ran_on"] == "MainThread" and done["thread"] == "MainThread"  # end_batch too
        assert done["size"] == 1
        # the op's own test of its arguments sends this one to the pool: a batch of its own, closed there
        pooled = c.call("echo", "tally", inline=False)
        assert pooled["ran_on"] != "MainThread" and pooled["thread"] == pooled["ran_on"] and pooled["size"] == 1


def test_requests_arriving_together_form_one_batch_closed_before_any_reply(kernel, gates) -> None:
    """While an inline op holds the socket thread, tallies queue; they are read as one batch, and each
    is answered only after end_batch saw every token of that batch (a reply names its batch and size).
    The hold waits at a gate until the scheduler has handed the manager all six tallies, so they are
    queued behind it on any machine (a timed hold once ended before a busy machine had sent them)."""
    k = kernel(capacity=16)
    gate = gates.new()
    holder, held = in_thread(lambda: k.client("holder").call("echo", "hold", seconds=0, gate=gate.path))
    wait_until(lambda: (k.busy("echo") or 0) >= 1, timeout=30, message="hold running")
    clients = [k.client(f"agent-{i}") for i in range(6)]
    try:
        calls = [in_thread(lambda c=c: c.call("echo", "tally")) for c in clients]
        wait_until(lambda: k.busy("echo") == 7, timeout=30, message="all six tallies handed to the held manager")
        gate.open()
        for t, _ in calls:
            t.join(60)
        holder.join(60)
        replies = [out["result"] for _, out in calls]
    finally:
        for c in clients:
            c.close()
    assert held["result"]["thread"] == "MainThread"
    by_batch: dict[int, list[dict]] = {}
    for r in replies:
        by_batch.setdefault(r["batch"], []).append(r)
    for batch, members in by_batch.items():  # end_batch got exactly its batch's tokens
        assert all(m["size"] == len(members) for m in members), (batch, members)
    # all six were queued behind the hold: they are read as one batch (two if the last frames were
    # still on their way between the scheduler's socket and the manager's when the hold returned)
    assert len(by_batch) <= 2 and max(len(m) for m in by_batch.values()) >= 3, by_batch


def test_a_deferred_failure_answers_only_its_request(kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing and a good tally in one batch (made one by the batch-hold test hook, not by timing):
    the failure answers only its own request, and the good one is answered from the same batch."""
    monkeypatch.setenv("AIOS_TEST_HOOKS", "1")
    k = kernel(capacity=8)
    a, b = k.client("a"), k.client("b")
    try:
        assert a.call("echo", "test_hold_batch", n=2) == {"holding": 2}
        bad = in_thread(lambda: a.call("echo", "tally", fail=True))
        good = in_thread(lambda: b.call("echo", "tally"))
        for t, _ in (bad, good):
            t.join(60)
        assert isinstance(bad[1].get("error"), sdk.NotFound)
        assert "asked to fail" in str(bad[1]["error"])
        assert good[1]["result"]["size"] == 2  # the same batch as the failure
        assert b.call("echo", "echo", text="still serving")["text"] == "still serving"
    finally:
        a.close()
        b.close()


def test_an_inline_op_cannot_call_another_service(kernel) -> None:
    """It would wait for a reply on the socket its own thread reads: refused with a clear error,
    and the manager goes on serving."""
    k = kernel()
    with k.client("alice", timeout=60) as c:
        t0 = time.monotonic()
        with pytest.raises(sdk.KernelError, match="inline op: it cannot call echo.echo"):
            c.call("echo", "inline_call", text="x")
        assert time.monotonic() - t0 < 30  # refused, not left to wait out the 60 s timeout
        assert c.call("echo", "echo", text="after")["text"] == "after"


def test_pool_threads_bound_the_pool_not_the_requests_in_hand(kernel, gates) -> None:
    """A manager may hold more requests than it has pool threads (its common ops run inline): the
    scheduler hands it all six, and they run two at a time on its two threads. The sleeps wait at a
    gate until the test has seen all six handed over."""
    k = kernel(echo=False, managers=[{"name": "echo", "target": "tests.support.echo_manager:SmallPoolEchoManager"}])
    gate = gates.new()
    clients = [k.client(f"agent-{i}") for i in range(6)]
    try:
        calls = [in_thread(lambda c=c: c.call("echo", "sleep", seconds=0.05, gate=gate.path)) for c in clients]
        wait_until(lambda: k.busy("echo") == 6, timeout=30, message="all six requests handed to the manager")
        gate.open()
        for t, _ in calls:
            t.join(60)
    finally:
        for c in clients:
            c.close()
    threads = {out["result"]["thread"] for _, out in calls}
    assert len(threads) == 2 and "MainThread" not in threads, threads


def test_housekeeping_runs_after_batches_and_when_idle_and_cannot_stop_the_loop(kernel) -> None:
    """Housekeeping runs once after every batch and when the socket was quiet for a poll interval.

    The batches are `tally` calls made one after the other: a tally is answered only when its
    batch closes, so the next call cannot reach the manager before that batch (and its
    housekeeping) is over: three tallies are three batches. (`hold`, an inline op answered at once,
    gave no such guarantee: on a busy machine the next call arrived while the manager was still
    reading, joined the same batch, and `after_batch` rose by one instead of three.)"""
    k = kernel()
    with k.client("alice") as c:
        start = c.call("echo", "upkeep")
        for _ in range(3):
            c.call("echo", "tally")
        after = c.call("echo", "upkeep")
        assert after["after_batch"] >= start["after_batch"] + 3  # each tally was a batch of its own
        # quiet for longer than the manager's poll interval (0.25 s) between looks: it housekeeps idle
        wait_until(lambda: c.call("echo", "upkeep")["idle"] > after["idle"], timeout=30, interval=1.0,
                   message="housekeeping on an idle socket")
        c.call("echo", "upkeep", fail=True)  # from now on housekeeping raises after every batch
        assert c.call("echo", "echo", text="still served")["text"] == "still served"
        assert c.call("echo", "upkeep", fail=False)["after_batch"] > after["after_batch"]
    wait_until(lambda: "housekeeping failed" in k.log("echo"), timeout=30, message="the failure logged")
