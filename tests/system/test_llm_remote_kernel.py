"""The kernel with an `openai` core, against a REAL OpenAI-compatible server.

The server is llama-cpp-python's own `llama_cpp.server` serving the default
Gemma file (the `llama_server` fixture). One kernel runs two cores: the local
llama.cpp core (default) and an `openai` core named "remote-gemma"; requests
reach the core of the model they name.
"""
from __future__ import annotations

from typing import Any

import pytest

from aios.managers.llm.backends.openai_backend import OpenAIBackend
from aios.managers.llm.types import ChatArgs
from tests.support.kernel import KernelFactory
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.model, pytest.mark.timeout(180)]

PROMPT = "Why is the sky blue?"
REMOTE = {"repeat_penalty": 1.0}  # see test_openai_backend: llama.cpp's penalty is not resume-safe


@pytest.fixture(scope="module")
def two_cores(module_kernel_factory: KernelFactory, llama_server: str) -> Any:
    cores = [
        {"name": "llm-0", "backend": "llamacpp"},
        {"name": "llm-remote", "backend": "openai", "base_url": llama_server, "model": "remote-gemma",
         "mode": "completion", "options": {"extra_body": REMOTE}},
    ]
    return module_kernel_factory(echo=False, llm=cores, scheduler={"policy": "rr", "time_slice_tokens": 4})


def test_requests_reach_the_core_of_the_model_they_name(two_cores: Any) -> None:
    c = two_cores.client("router")
    remote = c.chat("What is the capital of France?", model="remote-gemma", max_tokens=16).result
    local = c.chat("What is the capital of France?", max_tokens=16).result
    assert remote["model"] == "remote-gemma"
    assert local["model"] != "remote-gemma"
    assert "Paris" in remote["message"]["content"] and "Paris" in local["message"]["content"]
    assert remote["usage"]["completion_tokens"] > 0


def test_remote_generation_preempted_every_four_tokens_resumes_exactly(two_cores: Any, llama_server: str) -> None:
    direct = OpenAIBackend(base_url=llama_server, model="remote-gemma", mode="completion", extra_body=REMOTE)
    gen = direct.start(ChatArgs(messages=[{"role": "user", "content": PROMPT}], max_tokens=24))
    direct.advance(gen, None, lambda s: None)
    expected = direct.finish(gen).message.content
    assert len(expected) > 10
    reply = two_cores.client("remote").chat(PROMPT, model="remote-gemma", max_tokens=24)
    assert reply.timing["preemptions"] >= 2
    assert reply.result["message"]["content"] == expected


def test_unknown_model_is_refused_by_the_scheduler(two_cores: Any) -> None:
    from aios import sdk
    with pytest.raises(sdk.InvalidArgument) as err:
        two_cores.client("lost").chat("hi", model="gpt-17")
    assert err.value.code == "UNKNOWN_TARGET" and "remote-gemma" in err.value.message


def test_a_request_naming_no_model_waits_for_the_default_core(two_cores: Any) -> None:
    import threading
    long_reply: dict[str, Any] = {}
    t = threading.Thread(target=lambda: long_reply.setdefault("r", two_cores.client("long").chat(
        "Write an essay about the history of painting.", max_tokens=48, stop=[], ignore_eos=True)))
    t.start()
    wait_until(lambda: (two_cores.manager_info("llm-0") or {}).get("busy") == 1, timeout=30, interval=0.01,
               message="the default core to be busy")
    assert (two_cores.manager_info("llm-remote") or {}).get("busy") == 0
    short = two_cores.client("short").chat("What is the capital of France?", max_tokens=8).result
    t.join(120)
    assert short["model"] == long_reply["r"].result["model"] != "remote-gemma"


def test_a_remote_core_keeps_at_most_max_inflight_requests_open_and_resumes_from_text(
        kernel: KernelFactory, llama_server: str) -> None:
    """Eight agents at once against a core with max_inflight = 4, rr slices of 4 tokens: the server
    (the real llama_cpp.server, behind a proxy that counts open requests) never sees more than four,
    does see four (the core uses its concurrency), and every preempted generation, resumed from its
    text, ends exactly as an uninterrupted run does."""
    import threading

    from tests.support.counting_proxy import CountingProxy

    # questions the base model answers at length (measured: 40-80 characters in 16 tokens)
    prompts = ["Why is the sky blue?", "Why is the sea salty?", "Why do leaves fall?", "Why is snow white?",
               "Why do cats purr?", "Why is grass green?", "Why does ice float?", "Tell me about rivers."]
    direct = OpenAIBackend(base_url=llama_server, model="remote-gemma", mode="completion", extra_body=REMOTE)
    expected = {}
    for p in prompts:
        gen = direct.start(ChatArgs(messages=[{"role": "user", "content": p}], max_tokens=16, stop=[]))
        direct.advance(gen, None, lambda s: None)
        expected[p] = direct.finish(gen).message.content
    with CountingProxy(llama_server) as proxy:
        core = {"name": "llm-remote", "backend": "openai", "base_url": proxy.url, "model": "remote-gemma",
                "mode": "completion", "max_inflight": 4, "options": {"extra_body": REMOTE}}
        k = kernel(echo=False, llm=[core], scheduler={"policy": "rr", "time_slice_tokens": 4})
        assert (k.manager_info("llm-remote") or {}).get("capacity") == 4
        replies: dict[str, Any] = {}

        def agent(i: int, prompt: str) -> None:
            with k.client(f"a{i}", timeout=120) as c:
                replies[prompt] = c.chat(prompt, max_tokens=16, stop=[])

        threads = [threading.Thread(target=agent, args=(i, p)) for i, p in enumerate(prompts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
    assert len(replies) == len(prompts)
    assert proxy.max_open == 4, f"{proxy.max_open} requests were open at once (max_inflight = 4)"
    assert all(len(r.result["message"]["content"]) > 20 for r in replies.values()), {p: r.result["message"]["content"] for p, r in replies.items()}
    assert sum(r.timing["preemptions"] for r in replies.values()) >= len(prompts)
    assert {p: r.result["message"]["content"] for p, r in replies.items()} == expected
