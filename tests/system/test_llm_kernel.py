"""The `llm` syscalls through the real kernel, on the real default model (Gemma 3 270M).

Kernels here run the llama.cpp core with few tokens at temperature 0. The
exact-resume tests compare a FIFO kernel (never preempts) with round-robin
kernels whose 4-token (or 3-token) slices interleave generations on one model
context, so every resume is a real restore of saved state.  Those kernels run
one generation at a time (`max_batch = 1`, the exact mode) with the prefix
cache on; a batched core (`max_batch` > 1) is tested at the end.
"""
from __future__ import annotations

import threading
from typing import Any

import psutil
import pytest

from aios import sdk
from tests.support.kernel import KernelFactory
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

CORE = {"name": "llm-0", "backend": "llamacpp", "max_batch": 1}
#: a shared system prompt of about 260 tokens, so that prompts have a cacheable common prefix
SYSTEM = "\n".join(
    f"Tool {name}: use it when the task needs {name.replace('_', ' ')}; it takes a query and returns results."
    for name in ["search_web", "read_file", "write_file", "send_email", "calendar_lookup", "run_python",
                 "fetch_url", "summarize_text", "translate_text", "get_weather", "stock_quote", "list_files"] * 2)
LONG_PROMPT = "Write a long story about a dragon who lives in a library."
OTHER_PROMPT = "Describe the ocean in many sentences."


def chat_args(prompt: str, max_tokens: int, system: str | None = None, **extra: Any) -> dict[str, Any]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, **extra}


@pytest.fixture(scope="module")
def fifo(module_kernel_factory: KernelFactory) -> Any:
    return module_kernel_factory(echo=False, llm=[CORE], scheduler={"policy": "fifo"})


@pytest.fixture(scope="module")
def rr(module_kernel_factory: KernelFactory) -> Any:
    return module_kernel_factory(echo=False, llm=[CORE], scheduler={"policy": "rr", "time_slice_tokens": 4})


@pytest.fixture(scope="module")
def reference(fifo: Any) -> dict[str, str]:
    """Uninterrupted outputs of the prompts the preemption tests use."""
    c = fifo.client("reference")
    out = {}
    for prompt in (LONG_PROMPT, OTHER_PROMPT):
        out[prompt] = c.request("llm", "chat", chat_args(prompt, 40, stop=[], ignore_eos=True)).result[
            "message"]["content"]
    assert all(len(v) > 20 for v in out.values()), out
    return out


def run_concurrently(k: Any, prompts: list[str], max_tokens: int, **extra: Any) -> dict[str, sdk.CallResult]:
    """Each prompt from its own agent, all at once; replies by prompt."""
    replies: dict[str, sdk.CallResult] = {}
    errors: list[BaseException] = []

    def one(i: int, prompt: str) -> None:
        try:
            c = k.client(f"agent-{i}")
            replies[prompt] = c.request("llm", "chat", chat_args(prompt, max_tokens, **extra))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    return replies


def test_chat_returns_real_text_with_usage(fifo: Any) -> None:
    reply = fifo.client("qa").chat("What is the capital of France?", max_tokens=16)
    result = reply.result
    assert "Paris" in result["message"]["content"]
    assert result["message"]["role"] == "assistant"
    assert result["usage"]["prompt_tokens"] > 5
    assert 0 < result["usage"]["completion_tokens"] <= 16
    assert result["model"]
    assert reply.timing["turnaround_s"] >= reply.timing["run_s"] > 0


def test_streamed_tokens_add_up_to_the_answer(fifo: Any) -> None:
    pieces: list[str] = []
    reply = fifo.client("streamer").chat("What is the capital of France?", max_tokens=16, on_token=pieces.append)
    assert len(pieces) >= 2
    assert "".join(pieces).strip() == reply.result["message"]["content"].strip()


def test_exact_resume_with_four_token_slices(rr: Any, reference: dict[str, str]) -> None:
    replies = run_concurrently(rr, [LONG_PROMPT, OTHER_PROMPT], 40, stop=[], ignore_eos=True)
    for prompt, reply in replies.items():
        assert reply.result["usage"]["completion_tokens"] == 40
        assert reply.timing["preemptions"] >= 5, reply.timing
        assert reply.result["message"]["content"] == reference[prompt]
    info = rr.client("probe").call("llm", "info")
    assert info["context"]["snapshots"] == 0, "snapshots must be dropped when their requests complete"


def test_exact_resume_when_snapshots_spill_to_disk(module_kernel_factory: KernelFactory,
                                                   reference: dict[str, str]) -> None:
    k = module_kernel_factory(echo=False, llm=[CORE], scheduler={"policy": "rr", "time_slice_tokens": 4},
                              context={"ram_budget_mb": 0.0})
    replies = run_concurrently(k, [LONG_PROMPT, OTHER_PROMPT], 40, stop=[], ignore_eos=True)
    for prompt, reply in replies.items():
        assert reply.result["message"]["content"] == reference[prompt]
    ctx = k.client("probe").call("llm", "info")["context"]
    assert ctx["spills"] > 0 and ctx["ram_bytes"] == 0 and ctx["snapshots"] == 0
    assert ctx["peak_ram_bytes"] <= ctx["ram_budget_bytes"]


def _finish_order(k: Any) -> list[str]:
    """Submit a long request, then (once it runs) a short one; return the order they finish in."""
    order: list[str] = []
    lock = threading.Lock()

    def call(agent: str, args: dict[str, Any]) -> None:
        k.client(agent).request("llm", "chat", args)
        with lock:
            order.append(agent)

    long_t = threading.Thread(target=call, args=("long", chat_args(LONG_PROMPT, 160, stop=[], ignore_eos=True)))
    long_t.start()
    wait_until(lambda: (k.manager_info("llm-0") or {}).get("busy") == 1, timeout=30, interval=0.01,
               message="the long request to start")
    short_t = threading.Thread(target=call, args=("short", chat_args("Name a color.", 6, stop=[], ignore_eos=True)))
    short_t.start()
    long_t.join(240)
    short_t.join(240)
    return order


def test_round_robin_lets_a_later_short_request_finish_first(rr: Any) -> None:
    assert _finish_order(rr) == ["short", "long"]


def test_fifo_runs_the_earlier_long_request_first(fifo: Any) -> None:
    assert _finish_order(fifo) == ["long", "short"]


def test_json_output_follows_the_schema(fifo: Any) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    reply = fifo.client("json").chat("What is the capital of France? Answer in JSON.", op="json",
                                     json_schema=schema, max_tokens=32)
    parsed = reply.result["parsed"]
    assert isinstance(parsed, dict) and isinstance(parsed["city"], str)


def test_tool_call_output_names_a_given_tool(fifo: Any) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    reply = fifo.client("tools").chat("What is the weather in Paris?", op="tools", tools=tools, max_tokens=48)
    calls = reply.result["tool_calls"]
    assert reply.result["finish_reason"] == "tool_calls"
    assert calls and calls[0]["function"]["name"] == "get_weather"
    import json
    assert isinstance(json.loads(calls[0]["function"]["arguments"])["city"], str)


@pytest.mark.parametrize("args, code", [
    ({"messages": []}, "INVALID_ARGUMENT"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "no-such-model"}, "UNKNOWN_TARGET"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 30000}, "INVALID_ARGUMENT"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "INVALID_ARGUMENT"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "INVALID_ARGUMENT"),
])
def test_bad_chat_requests_get_clear_errors(fifo: Any, args: dict[str, Any], code: str) -> None:
    c = fifo.client("bad")
    with pytest.raises(sdk.InvalidArgument) as err:
        c.request("llm", "chat", args, target=args.get("model"))
    assert err.value.code == code
    assert err.value.message
    assert "Paris" in c.chat("What is the capital of France?", max_tokens=12).result["message"]["content"]


def test_malformed_tool_schema_is_rejected(fifo: Any) -> None:
    bad_tools = [{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}]
    with pytest.raises(sdk.InvalidArgument) as err:
        fifo.client("bad-tools").chat("hi", op="tools", tools=bad_tools)
    assert err.value.code == "INVALID_ARGUMENT" and "object" in err.value.message


def test_killing_a_core_mid_generation_retries_on_the_restarted_core(
        module_kernel_factory: KernelFactory, reference: dict[str, str]) -> None:
    k = module_kernel_factory(echo=False, llm=[CORE], scheduler={"policy": "fifo"})
    old_pid = k.pid("llm-0")
    streamed: list[Any] = []
    result: dict[str, Any] = {}

    def call() -> None:
        result["reply"] = k.client("victim", timeout=120).request(
            "llm", "chat", chat_args(LONG_PROMPT, 40, stop=[], ignore_eos=True, stream=True),
            on_partial=streamed.append)

    t = threading.Thread(target=call)
    t.start()
    wait_until(lambda: len(streamed) >= 3, timeout=60, interval=0.01, message="tokens to stream")
    psutil.Process(old_pid).kill()
    t.join(180)
    reply = result["reply"]
    assert reply.result["message"]["content"] == reference[LONG_PROMPT]
    assert {"reset": True} in streamed, "the agent must be told the stream restarted"
    after_reset = streamed[len(streamed) - streamed[::-1].index({"reset": True}):]
    assert "".join(p["delta"] for p in after_reset) == reply.result["message"]["content"]
    assert k.wait_running("llm-0", other_than=old_pid) != old_pid
    assert k.processes()["llm-0"]["restarts"] == 1


def test_snapshot_dropped_when_its_agent_disconnects(rr: Any) -> None:
    victim = rr.client("leaver")
    streamed: list[Any] = []
    done: dict[str, Any] = {}

    def leaver() -> None:
        try:
            victim.request("llm", "chat", chat_args(LONG_PROMPT, 200, stop=[], ignore_eos=True, stream=True),
                           on_partial=lambda b: (streamed.append(b), len(streamed) == 6 and victim.close()),
                           timeout=20)
        except Exception as exc:  # noqa: BLE001 - its socket closes under it
            done["error"] = exc

    other = threading.Thread(target=lambda: done.setdefault("other", rr.client("stayer").request(
        "llm", "chat", chat_args(OTHER_PROMPT, 60, stop=[], ignore_eos=True))))
    t = threading.Thread(target=leaver)
    t.start()
    other.start()
    other.join(240)
    t.join(60)
    assert done["other"].result["usage"]["completion_tokens"] == 60
    probe = rr.client("probe")
    wait_until(lambda: probe.call("llm", "info")["context"]["snapshots"] == 0, timeout=30,
               message="the disconnected agent's snapshot to be dropped")
    status = probe.call("kernel", "status")
    assert status["queues"]["llm"] == 0 and status["pending"] == 0


# --------------------------------------------------------------- prefix cache and batching
SHARED_PROMPTS = ["What is the capital of France?", "Name three colors.", "Describe a cat."]


@pytest.fixture(scope="module")
def rr3(module_kernel_factory: KernelFactory) -> Any:
    return module_kernel_factory(echo=False, llm=[CORE], scheduler={"policy": "rr", "time_slice_tokens": 3})


def test_prefix_cache_keeps_outputs_identical_under_fifo_and_rr(fifo: Any, rr3: Any) -> None:
    """max_batch = 1 with the prefix cache on: concurrent prompts sharing a system prompt give the
    same tokens under FIFO and under round robin with 3-token slices, and reuse cached prefixes."""
    out = {}
    for name, k in (("fifo", fifo), ("rr", rr3)):
        replies = run_concurrently(k, SHARED_PROMPTS, 24, system=SYSTEM, stop=[], ignore_eos=True)
        out[name] = {p: r.result["message"]["content"] for p, r in replies.items()}
        usage = [r.result["usage"] for r in replies.values()]
        assert all(u["completion_tokens"] == 24 for u in usage)
        assert sum(u["cached_prompt_tokens"] for u in usage) >= 192, usage  # the shared prefix was reused
        if name == "rr":
            assert all(r.timing["preemptions"] >= 3 for r in replies.values())
        info = k.client("probe").call("llm", "info")
        cache = info["context"]["prefix_cache"]
        assert cache["hits"] >= 1 and cache["bytes"] <= cache["budget_bytes"]
        assert info["context"]["reserved_bytes"] == cache["budget_bytes"]
    assert out["fifo"] == out["rr"]


@pytest.fixture(scope="module")
def batched(module_kernel_factory: KernelFactory) -> Any:
    core = {"name": "llm-0", "backend": "llamacpp", "n_ctx": 1024,
            "max_batch": 4, "prefix_cache_mb": 1.5}
    return module_kernel_factory(echo=False, llm=[core], scheduler={"policy": "rr", "time_slice_tokens": 8},
                                 context={"ram_budget_mb": 3.0})


def test_batched_core_runs_requests_together(batched: Any) -> None:
    assert batched.manager_info("llm-0")["capacity"] == 4
    prompts = [f"Describe animal number {i}." for i in range(4)]
    replies = run_concurrently(batched, prompts, 24, stop=[], ignore_eos=True)
    assert all(r.result["usage"]["completion_tokens"] == 24 for r in replies.values())
    info = batched.client("probe").call("llm", "info")
    assert info["capacity"] == 4 and info["batching"]["max_batch"] == 4
    assert info["batching"]["decoded_tokens"] > info["batching"]["decode_calls"]  # several per decode call
    wait_until(lambda: batched.client("probe").call("llm", "info")["batching"]["resident"] == 0, timeout=30,
               message="finished generations to free their sequences")


def test_cancel_and_disconnect_free_sequences_within_tiny_budgets(batched: Any) -> None:
    """A request cut by its deadline and an agent that disconnects mid-stream free their sequences and
    snapshots; the context store's RAM budget (3 MB, 1.5 MB of it the prefix cache) is never exceeded."""
    leaver = batched.client("leaver")
    streamed: list[Any] = []
    errors: dict[str, Any] = {}

    def leave() -> None:
        try:
            leaver.request("llm", "chat", chat_args(LONG_PROMPT, 300, system=SYSTEM, stop=[], ignore_eos=True,
                                                    stream=True),
                           on_partial=lambda b: (streamed.append(b), len(streamed) == 10 and leaver.close()),
                           timeout=60)
        except Exception as exc:  # noqa: BLE001 - its socket closes under it
            errors["leaver"] = exc

    def late() -> None:
        try:
            batched.client("late").request("llm", "chat", chat_args(OTHER_PROMPT, 400, stop=[], ignore_eos=True),
                                           timeout=2.0)
        except Exception as exc:  # noqa: BLE001
            errors["late"] = exc

    stayer: dict[str, Any] = {}
    threads = [threading.Thread(target=leave), threading.Thread(target=late),
               threading.Thread(target=lambda: stayer.setdefault("reply", batched.client("stayer").request(
                   "llm", "chat", chat_args("Name three colors.", 40, system=SYSTEM, stop=[], ignore_eos=True))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert stayer["reply"].result["usage"]["completion_tokens"] == 40
    assert isinstance(errors.get("late"), sdk.KernelTimeout), errors
    probe = batched.client("probe")

    last: dict[str, Any] = {}

    def freed() -> bool:
        last.update(probe.call("llm", "info"))
        return last["batching"]["resident"] == 0 and last["batching"]["running"] == 0 \
            and last["context"]["snapshots"] == 0
    wait_until(freed, timeout=30, message=lambda: f"generations to free their sequences: {last}")
    ctx = probe.call("llm", "info")["context"]
    assert ctx["reserved_bytes"] == int(1.5 * 1024 * 1024)
    assert ctx["ram_budget_bytes"] + ctx["reserved_bytes"] == 3 * 1024 * 1024
    assert ctx["peak_ram_bytes"] <= ctx["ram_budget_bytes"]
    cache = ctx["prefix_cache"]
    assert cache["peak_bytes"] <= cache["budget_bytes"] and cache["bytes"] <= cache["budget_bytes"]
    assert ctx["spills"] > 0  # 8-token slices of long prompts outgrow 1.5 MB of snapshot RAM
