"""Calls in flight across a scheduler restart run once (issue 17, item 5), through the real process tree.

When the scheduler is killed (`kill -9`) and the supervisor restarts it, the
managers keep running what they were given and re-announce it (READY lists
it); the SDK re-sends its idempotent calls under the same request id from the
same routing id. The new scheduler adopts those executions instead of
dispatching copies: the caller gets the one answer of the one run, and a
stream goes on without being generated twice or reset. Only where the run
died too (its manager was killed as well) is it run again, after a `reset`.
"""
from __future__ import annotations

import os
import re
import signal
import time
from typing import Any

import pytest

from tests.support.waiting import in_thread, wait_until

pytestmark = pytest.mark.timeout(120)

SIM_CORE = {"name": "llm-0", "backend": "sim", "sim_seconds_per_token": 0.01}


def _words(text: str) -> list[int]:
    """The numbers of the simulated backend's words (" w0 w1 ...") in the order shown."""
    return [int(n) for n in re.findall(r"\bw(\d+)\b", text)]


def _stream(k: Any, agent: str, max_tokens: int) -> tuple[dict[str, Any], Any]:
    """A streamed chat in a thread: (what its token callback saw, the thread's outcome)."""
    from aios.sdk.services import chat_args, token_sink
    record: dict[str, Any] = {"tokens": [], "resets": 0}
    sink = token_sink(record["tokens"].append)

    def on_partial(body: Any) -> None:
        record["resets"] += bool(isinstance(body, dict) and body.get("reset"))
        sink(body)

    def chat() -> Any:
        with k.client(agent, timeout=90) as c:
            reply = c.request("llm", "chat", chat_args("count", None, True, {"max_tokens": max_tokens}),
                              idempotent=True, on_partial=on_partial)
            return reply.result["message"]["content"]

    return record, in_thread(chat)


def test_an_idempotent_call_running_when_the_scheduler_dies_runs_once_and_answers_once(kernel) -> None:
    """A 4 s idempotent sleep is running on the echo manager when the scheduler is killed. The SDK
    re-sends it to the new scheduler, which finds it in the manager's READY and binds the re-send to
    it: the answer is that run's (it started before the kill), and no second copy ever starts."""
    k = kernel(kernel={"heartbeat_interval_s": 0.5})
    c = k.client("adoptee", timeout=60)
    auditor = k.client("auditor", timeout=30)
    t, out = in_thread(lambda: c.call("echo", "sleep", seconds=4, tag="once"))
    wait_until(lambda: auditor.call("echo", "sleeps", tag="once")["started"] == 1, timeout=10,
               message="the sleep started on the manager")
    old = k.pid("scheduler")
    killed_at = time.monotonic()
    os.kill(old, signal.SIGKILL)
    t.join(60)
    assert "error" not in out, out
    result = out["result"]
    assert result["tag"] == "once" and result["attempt"] == 1
    assert result["started"] < killed_at, "the answer came from a run started after the restart"
    assert auditor.call("echo", "sleeps", tag="once")["started"] == 1, "the sleep ran twice"
    status = k.kernel_status()
    assert status["services"]["echo"]["adopted"] == 1
    assert k.busy("echo") == 0  # nothing left counted as running


def test_a_stream_running_when_the_scheduler_dies_is_not_generated_twice(kernel) -> None:
    """A 300-token streamed chat on the simulated core; the scheduler is killed mid-stream. The
    stream carries on from the same generation: no reset, no word shown twice, and the answer is
    the one generation's 300 words."""
    k = kernel(echo=False, llm=[SIM_CORE], kernel={"heartbeat_interval_s": 0.5})
    record, (t, out) = _stream(k, "streamer", 300)
    wait_until(lambda: len(record["tokens"]) >= 30, timeout=20, message="the stream under way")
    old = k.pid("scheduler")
    os.kill(old, signal.SIGKILL)
    t.join(90)
    assert "error" not in out, out
    assert _words(out["result"]) == list(range(300))
    shown = _words("".join(record["tokens"]))
    assert record["resets"] == 0, "the stream was reset although nothing was repeated"
    assert len(shown) == len(set(shown)), f"{len(shown) - len(set(shown))} words were shown twice"
    assert shown == sorted(shown) and shown[-1] == 299
    assert k.kernel_status()["services"]["llm"]["adopted"] == 1


def test_a_stream_whose_core_died_with_the_scheduler_is_run_again_after_a_reset(kernel) -> None:
    """The scheduler and the LLM core are both killed mid-stream: nothing is left to adopt, so the
    new scheduler runs the re-sent call again, and tells the caller first (a reset), so that the
    token callback never shows a word twice."""
    k = kernel(echo=False, llm=[SIM_CORE], kernel={"heartbeat_interval_s": 0.5},
               supervisor={"backoff_initial_s": 0.05})
    record, (t, out) = _stream(k, "streamer", 200)
    wait_until(lambda: len(record["tokens"]) >= 30, timeout=20, message="the stream under way")
    core, old = k.pid("llm-0"), k.pid("scheduler")
    os.kill(core, signal.SIGKILL)
    os.kill(old, signal.SIGKILL)
    t.join(90)
    assert "error" not in out, out
    assert _words(out["result"]) == list(range(200))
    shown = "".join(record["tokens"])
    assert record["resets"] == 1, "the re-run stream was not marked"
    assert _words(shown) == list(range(200)), "the token callback showed text twice or lost some"
    assert k.kernel_status()["services"]["llm"]["adopted"] == 0


def test_a_caller_claiming_a_managers_address_on_the_frontend_is_refused(kernel) -> None:
    """Callers choose their routing ids now (the SDK sets a random one, so that a re-sent call comes
    from the same address). An id starting with the scheduler's prefix for calls between managers
    ("@") would have its replies routed to a manager: such frames are dropped and counted."""
    import zmq

    from aios import messages
    from aios.protocol import Codec
    k = kernel()
    config = k.run_dir.load_config()
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.setsockopt(zmq.IDENTITY, b"@echo")
    rogue.connect(k.run_dir.frontend_endpoint(config))
    try:
        codec = Codec(k.run_dir.load_key())
        header = messages.Request(id="r1", service="kernel", op="ping", agent="rogue").to_header()
        rogue.send_multipart(codec.encode(header, {}))
        wait_until(lambda: k.kernel_status()["scheduler"]["rejected_frames"] >= 1, timeout=10,
                   message="the frame counted as rejected")
        assert rogue.poll(300) == 0
        assert "routing id" in k.log("scheduler")
    finally:
        rogue.close(0)
        ctx.term()
