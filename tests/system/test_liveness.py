"""A kernel that cannot answer says so at once (issue 17, items 3, 4 and 6).

- A FATAL scheduler is the kernel being down: the supervisor stops the tree (or keeps restarting
  the scheduler, if configured), `aios status` says why, and clients get KernelUnavailable or
  UNAVAILABLE, never a timeout.
- A service whose processes are all FATAL is answered UNAVAILABLE at once, including calls already
  queued or running when it went FATAL, however it got there.
- A request that began on another LLM core while the default core restarted is never stranded in
  the queue.

Every bound below is a deadline for a failing test, never a speed check: the calls' own timeouts are
far longer, and what is checked is that the call ended with the right error before them.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest

from aios import sdk
from tests.support.waiting import in_thread, wait_until

pytestmark = pytest.mark.timeout(120)

FADING = {"name": "fading", "target": "tests.support.crash_managers:FadingManager", "capacity": 2}


# --------------------------------------------------------------- item 3: a FATAL scheduler
def _kill_scheduler(k: Any) -> int:
    old = k.pid("scheduler")
    os.kill(old, signal.SIGKILL)
    return old


def test_a_fatal_scheduler_stops_the_kernel_and_clients_and_status_say_why(kernel) -> None:
    """The scheduler is killed until the supervisor gives up on it. By default the whole kernel is
    then stopped: a call in flight (safe to repeat, so it would wait for the scheduler) ends with
    KernelUnavailable or UNAVAILABLE, not at its timeout; `aios status` says the kernel is not
    running and why; a new client is refused at once, with the reason."""
    k = kernel(supervisor={"fast_crash_s": 60.0, "max_fast_crashes": 2, "backoff_initial_s": 0.05,
                           "backoff_max_s": 0.1})
    c = k.client("survivor", timeout=60)
    for _ in range(2):
        k.wait_running("scheduler", other_than=_kill_scheduler(k), timeout=30)
    t, out = in_thread(lambda: c.request("echo", "sleep", {"seconds": 30}, idempotent=True))
    wait_until(lambda: k.busy("echo") == 1, timeout=20, message="the call running")
    _kill_scheduler(k)  # the third fast crash: more than max_fast_crashes (2)
    t.join(45)
    assert not t.is_alive(), "the call waited out its 60 s timeout"
    err = out.get("error")
    assert isinstance(err, sdk.AIOSError) and err.code == "UNAVAILABLE" and err.retryable, out
    assert out["elapsed"] < 45
    assert "scheduler is FATAL" in err.message or "no kernel running" in err.message, err
    wait_until(lambda: k.run_dir.supervisor_pid() is None, timeout=30,
               message="the supervisor to stop the kernel")

    st = k.status()  # `aios status --json`
    assert st["running"] is False and st["processes"] == []
    assert "the scheduler is FATAL" in st["message"] and "crashed 3 times" in st["message"]
    assert 'on_scheduler_fatal = "stop"' in st["message"]
    human = k.aios("status")
    assert human.returncode == 1 and "no kernel running" in human.stdout and "scheduler is FATAL" in human.stdout
    t0 = time.monotonic()
    with pytest.raises(sdk.KernelUnavailable) as gone:
        c.call("kernel", "ping")
    assert time.monotonic() - t0 < 30
    assert "no kernel running" in gone.value.message and "the scheduler is FATAL" in gone.value.message
    with pytest.raises(sdk.KernelUnavailable):
        sdk.connect(k.run_dir, agent="late")
    c.close()


def test_on_scheduler_fatal_restart_keeps_the_kernel_up(kernel) -> None:
    """With `on_scheduler_fatal = "restart"` the scheduler is restarted past its fast-crash limit,
    never FATAL, and the kernel answers again each time."""
    k = kernel(supervisor={"fast_crash_s": 60.0, "max_fast_crashes": 1, "backoff_initial_s": 0.05,
                           "backoff_max_s": 0.1, "on_scheduler_fatal": "restart"})
    for _ in range(3):
        k.wait_running("scheduler", other_than=_kill_scheduler(k), timeout=30)
    row = k.processes()["scheduler"]
    assert row["state"] == "RUNNING" and row["restarts"] == 3 and row["fast_crashes"] == 3
    assert k.supervisor_pid is not None
    with k.client("after", timeout=30) as c:
        assert c.call("echo", "echo", text="still here")["text"] == "still here"


def test_a_call_while_the_scheduler_waits_past_its_deadline_to_restart_is_unavailable_at_once(kernel) -> None:
    """The scheduler is down and the supervisor restarts it only in 20 s: a call with a 5 s
    timeout is answered UNAVAILABLE at once, saying when it comes back, not at its timeout."""
    k = kernel(supervisor={"backoff_initial_s": 20.0, "backoff_max_s": 20.0})
    c = k.client("waiting", timeout=30)
    assert c.call("kernel", "ping") == {"pong": True}
    _kill_scheduler(k)
    wait_until(lambda: k.state("scheduler") == "BACKOFF", timeout=20, message="the scheduler in BACKOFF")
    t0 = time.monotonic()
    with pytest.raises(sdk.KernelError) as info:
        c.request("echo", "echo", {"text": "x"}, timeout=5.0, idempotent=True)
    assert time.monotonic() - t0 < 5.0, "answered before the call's own timeout"
    assert info.value.code == "UNAVAILABLE" and info.value.retryable
    assert "scheduler is down" in info.value.message and "after this call's deadline" in info.value.message

    async def async_call() -> Any:
        async with sdk.connect_async(k.run_dir, agent="waiting-async", timeout=30) as ac:
            return await ac.request("echo", "echo", {"text": "x"}, timeout=5.0, idempotent=True)

    t0 = time.monotonic()
    with pytest.raises(sdk.KernelError) as info:
        asyncio.run(async_call())
    assert time.monotonic() - t0 < 5.0 and info.value.code == "UNAVAILABLE"  # the asyncio client too
    st = k.status()
    assert st["running"] is True and "the scheduler is BACKOFF" in st["message"]
    c.close()


# ------------------------------------------------------------- item 4: a service that went FATAL
def test_calls_to_a_service_that_went_fatal_dying_after_each_start_are_answered_at_once(kernel) -> None:
    """The manager comes up once; after `crash`, each restart says READY and dies about 0.3 s later,
    well inside the heartbeat expiry, until the supervisor gives up (FATAL). A call that was running
    at the crash is re-queued from incarnation to incarnation and must be answered when the service
    goes FATAL; a call made after that must be answered at once, not sent to the last incarnation's
    stale registration and left to its deadline ("still queued" after 60 s)."""
    k = kernel(managers=[FADING], scheduler={"max_requeues": 20},
               supervisor={"fast_crash_s": 30.0, "max_fast_crashes": 3, "backoff_initial_s": 0.05,
                           "backoff_max_s": 0.2})
    first = k.pid("fading")
    holder = k.client("holder", timeout=60)
    t, held = in_thread(lambda: holder.request("fading", "hold", {"seconds": 600}, idempotent=True))
    wait_until(lambda: (m := k.manager_info("fading")) is not None and m["busy"] == 1, timeout=20,
               message="the held call running")
    with k.client("crasher", timeout=60) as c:
        with pytest.raises(sdk.KernelError) as died:
            c.call("fading", "crash")
        assert died.value.code == "MANAGER_DIED"
    wait_until(lambda: k.state("fading") == "FATAL", timeout=60,
               message=lambda: f"fading FATAL: {k.processes().get('fading')}")
    assert k.processes()["fading"]["restarts"] == 3 and k.pid("fading") is None and first is not None
    t.join(30)
    assert not t.is_alive(), "the call queued when the service went FATAL was left to its 60 s deadline"
    err = held.get("error")
    assert isinstance(err, sdk.KernelError) and err.code == "UNAVAILABLE" and err.retryable, held
    assert "fading is FATAL" in err.message and "gave up" in err.message

    with k.client("late", timeout=60) as c:
        t0 = time.monotonic()
        with pytest.raises(sdk.KernelError) as info:
            c.request("fading", "ping", timeout=60.0, idempotent=True)
        assert time.monotonic() - t0 < 30, "answered at once, not at the call's 60 s deadline"
    assert info.value.code == "UNAVAILABLE" and "fading is FATAL" in info.value.message
    assert k.kernel_status()["queues"]["fading"] == 0
    assert k.state("scheduler") == "RUNNING"


# --------------------------------------------------- item 6: several LLM cores under las, one restarts
def test_a_stream_that_moved_to_another_core_while_the_default_restarted_is_never_stranded(kernel) -> None:
    """Three (labelled SIMULATED) cores under `las`, llm-0 the default. A streamed chat naming no
    model runs on llm-0, which is killed with SIGKILL: the chat starts over (a reset) on another
    core, since no default core is registered. When llm-0 is back, the chat's next time slice must
    resume where its saved context is; before the fix, the default rule and the affinity rule
    together left it queued for good while every core sat idle."""
    cores = [{"name": f"llm-{i}", "backend": "sim", "model": f"sim-{i}", "sim_seconds_per_token": 0.005,
              "n_ctx": 32768} for i in range(3)]
    k = kernel(echo=False, llm=cores, scheduler={"policy": "las", "time_slice_tokens": 8},
               kernel={"heartbeat_interval_s": 0.25}, supervisor={"backoff_initial_s": 0.05})
    record: dict[str, Any] = {"pieces": [], "resets": 0, "stop": False}

    class Stop(Exception):
        """Raised from the token callback to end the (deliberately endless) chat."""

    def on_partial(body: Any) -> None:
        if record["stop"]:
            raise Stop()
        if body.get("reset"):
            record["resets"] += 1
        elif body.get("delta"):
            record["pieces"].append(body["delta"])

    def chat() -> Any:
        from aios.sdk.services import chat_args
        with k.client("streamer", timeout=60) as c:  # 20,000 tokens: it runs until stopped
            return c.request("llm", "chat", chat_args("count", None, True, {"max_tokens": 20000}),
                             idempotent=True, on_partial=on_partial)

    t, out = in_thread(chat)
    try:
        wait_until(lambda: len(record["pieces"]) >= 20, timeout=30, message=lambda: f"the stream under way: {out}")
        assert k.manager_info("llm-0")["busy"] == 1, "the chat runs on the default core"
        old = k.pid("llm-0")
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: record["resets"] == 1, timeout=30, message="the chat restarted elsewhere")
        new = k.wait_running("llm-0", other_than=old, timeout=30)
        wait_until(lambda: (m := k.manager_info("llm-0")) is not None and m["pid"] == new, timeout=30,
                   message="llm-0 registered again")
        # the chat now runs on llm-1 or llm-2, yielding every 8 tokens; it must keep going
        seen = len(record["pieces"])
        wait_until(lambda: len(record["pieces"]) >= seen + 64, timeout=30,
                   message=lambda: f"the stream to go on after llm-0 came back (stuck at {len(record['pieces'])} "
                                   f"pieces; queues {k.kernel_status()['queues']})")
        busy = {m["name"]: m["busy"] for m in k.kernel_status()["managers"]}
        assert busy["llm-0"] == 0 and busy["llm-1"] + busy["llm-2"] <= 1, busy
    finally:
        record["stop"] = True  # ends the chat at its next piece (or at its deadline if stranded)
        t.join(90)
    assert isinstance(out.get("error"), Stop), out
    assert record["resets"] == 1
    # the abandoned chat is cancelled once its agent is gone: nothing queued or running is left
    wait_until(lambda: (ks := k.kernel_status())["queues"]["llm"] == 0
               and all(m["busy"] == 0 for m in ks["managers"]), timeout=30,
               message=lambda: f"the chat cancelled: {k.kernel_status()['queues']}")
