"""Calls between managers through the real kernel: a handler's `ctx.call` is queued, scheduled and
charged like the agent's own call, on behalf of that agent, within its deadline; a cycle is refused."""
from __future__ import annotations

import threading
import time

import pytest

from aios import sdk
from tests.support.kernel import Kernel
from tests.support.waiting import in_thread, wait_until

pytestmark = pytest.mark.timeout(60)

MANAGERS = [{"name": "alpha", "target": "tests.support.call_managers:Alpha"},
            {"name": "beta", "target": "tests.support.call_managers:Beta"}]


@pytest.fixture(scope="module")
def k(module_kernel_factory) -> Kernel:
    return module_kernel_factory(echo=False, managers=MANAGERS, scheduler={"policy": "las"})


def test_call_is_made_on_behalf_of_the_agent(k: Kernel) -> None:
    with k.client("alice", timeout=10) as c:
        out = c.call("alpha", "relay", text="hello")
    assert out["agent"] == "alice" and out["caller"] is None          # alpha served alice directly
    assert out["beta_saw"]["agent"] == "alice"                         # beta served alice too ...
    assert out["beta_saw"]["caller"] == "alpha"                        # ... for alpha's handler
    assert out["beta_saw"]["text"] == "hello"


def test_a_cycle_that_would_deadlock_is_refused_promptly(k: Kernel) -> None:
    t0 = time.monotonic()
    with k.client("carol", timeout=60) as c:
        with pytest.raises(sdk.KernelError) as info:
            c.call("alpha", "loop", text="round and round")
        assert time.monotonic() - t0 < 30, "a refused cycle must not wait for the 60 s timeout"
        assert info.value.code == "CALL_CYCLE"
        assert "alpha.loop -> beta.bounce -> alpha.relay" in info.value.message
        # alpha's single thread is free again: the kernel did not deadlock
        assert c.call("alpha", "relay", text="after")["beta_saw"]["text"] == "after"


def test_work_done_by_a_call_is_charged_to_the_originating_agent(k: Kernel) -> None:
    with k.client("dave", timeout=10) as c:
        assert c.call("alpha", "work", tokens=5000) == {"burned": 5000, "agent": "dave"}
        attained = c.call("kernel", "status")["policy"]["beta"]["attained"]
    assert attained.get("dave", 0) >= 5000
    assert not any(name.startswith(("alpha", "beta")) for name in attained), attained


def test_a_call_waits_in_its_queue_like_any_request(k: Kernel, gates) -> None:
    """beta (capacity 2) is busy with two agents' sleeps, held at a gate until alpha's call is seen
    queued behind them; after the gate they sleep 0.5 s, so alpha's handler waits at least that."""
    gate = gates.new()
    blockers = []
    for i in range(2):
        def block(i: int = i) -> None:
            with k.client(f"sleeper-{i}", timeout=60) as c:
                c.call("beta", "sleep", seconds=0.5, gate=gate.path)
        t = threading.Thread(target=block)
        t.start()
        blockers.append(t)
    wait_until(lambda: (m := k.manager_info("beta")) is not None and m["busy"] == 2, timeout=30,
               message="beta busy with both sleeps")
    with k.client("erin", timeout=60) as c:
        t, out = in_thread(lambda: c.request("alpha", "relay", {"text": "queued"}))
        wait_until(lambda: k.kernel_status()["queues"]["beta"] == 1, timeout=30, message="alpha's call queued")
        gate.open()
        t.join(60)
    reply = out["result"]
    assert reply.result["beta_saw"]["text"] == "queued"
    assert reply.timing["run_s"] >= 0.5  # alpha's handler waited for beta's queue to drain
    for t in blockers:
        t.join(30)


def test_a_call_is_bounded_by_its_parents_deadline(k: Kernel, gates) -> None:
    """The agent gives alpha 1 s; alpha's call to beta (held at a gate that never opens) inherits that
    deadline: the agent is answered DEADLINE_EXCEEDED and beta's sleep is cancelled, not left running
    (it could not end any other way)."""
    gate = gates.new()
    with k.client("frank", timeout=60) as c:
        t0 = time.monotonic()
        with pytest.raises(sdk.KernelTimeout) as info:
            c.request("alpha", "wait_on_beta", {"seconds": 0, "gate": gate.path}, timeout=1.0)
        elapsed = time.monotonic() - t0
    assert info.value.code == "DEADLINE_EXCEEDED" and elapsed < 30  # the 1 s deadline, not the 60 s timeout
    wait_until(lambda: k.manager_info("beta")["busy"] == 0, timeout=30, message="beta's sleep cancelled")
    assert not gate.is_open
