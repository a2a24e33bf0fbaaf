"""Reliability of the kernel under faults, through the real process tree.

Each test here reproduces a defect found by an adversarial run against the
kernel (scheduler restarts losing capacity or calls, poison requests,
impersonation, predictable paths, unbounded memory, dead agents' work,
floods, restarted streams, stale pid files) and checks the fixed behaviour.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest

from aios import sdk
from tests.conftest import Kernel, wait_until

pytestmark = pytest.mark.timeout(120)


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            out["error"] = exc
        out["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _busy(k: Kernel, name: str) -> int | None:
    info = k.manager_info(name)
    return info["busy"] if info else None


# ------------------------------------------------------- 1. capacity after a scheduler restart
def test_capacity_is_not_lost_after_a_scheduler_restart(kernel) -> None:
    """Two 3 s sleeps fill echo's two slots; the scheduler is killed. The manager re-registers
    while still running them: they hold its slots until they finish, then both slots are usable
    again. The SDK re-sends the (idempotent) calls, and they complete."""
    k = kernel(capacity=2, kernel={"heartbeat_interval_s": 0.5})
    calls = [_in_thread(lambda i=i: k.client(f"sleeper-{i}", timeout=60).call("echo", "sleep", seconds=3,
                                                                               tag=f"t{i}"))
             for i in range(2)]
    wait_until(lambda: _busy(k, "echo") == 2, timeout=10, message="both sleeps running")
    old = k.pid("scheduler")
    os.kill(old, signal.SIGKILL)
    k.wait_running("scheduler", other_than=old)
    for t, out in calls:
        t.join(40)
        assert "error" not in out, out
    assert sorted(out["result"]["tag"] for _, out in calls) == ["t0", "t1"]
    # the capacity the kernel believes in matches what runs: nothing left busy
    wait_until(lambda: _busy(k, "echo") == 0, timeout=3, message="echo idle after the restart")
    # and both slots are usable at once again
    more = [_in_thread(lambda i=i: k.client(f"after-{i}", timeout=30).call("echo", "sleep", seconds=1))
            for i in range(2)]
    wait_until(lambda: _busy(k, "echo") == 2, timeout=5, message="two new sleeps running side by side")
    for t, out in more:
        t.join(20)
        assert "error" not in out, out


# ------------------------------------------------------- 2. calls in flight when the scheduler dies
def test_a_non_idempotent_call_in_flight_gets_a_prompt_retryable_error(kernel) -> None:
    k = kernel(kernel={"heartbeat_interval_s": 0.5})
    c = k.client("once", timeout=60)
    t, out = _in_thread(lambda: c.call("echo", "sleep_once", seconds=3))
    wait_until(lambda: _busy(k, "echo") == 1, timeout=10, message="sleep_once running")
    old = k.pid("scheduler")
    os.kill(old, signal.SIGKILL)
    t.join(30)
    err = out.get("error")
    assert isinstance(err, sdk.KernelError), out
    assert err.code == "UNAVAILABLE" and err.retryable
    assert "may or may not have taken effect" in err.message
    assert out["elapsed"] < 5, "answered promptly, not at the 60 s timeout"
    k.wait_running("scheduler", other_than=old)
    assert c.call("echo", "echo", text="after")["text"] == "after"  # the same client carries on


def test_an_op_the_manager_declares_idempotent_is_resent_and_completes(kernel) -> None:
    """echo.sleep is declared idempotent by its manager (not by the SDK's built-in list): the SDK
    learns that from the kernel and re-sends it after the scheduler dies."""
    k = kernel(kernel={"heartbeat_interval_s": 0.5})
    c = k.client("resender", timeout=60)
    t, out = _in_thread(lambda: c.call("echo", "sleep", seconds=1, tag="again"))
    wait_until(lambda: _busy(k, "echo") == 1, timeout=10, message="sleep running")
    old = k.pid("scheduler")
    os.kill(old, signal.SIGKILL)
    t.join(40)
    assert out.get("result", {}).get("tag") == "again", out
    assert out["elapsed"] < 15
