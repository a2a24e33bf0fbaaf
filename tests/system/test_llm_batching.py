"""Batched decoding and the prefix cache of the llama.cpp backend, on the real Gemma 3 270M.

The radix-tree prefix cache and the settings checks are tested without the model
in tests/unit/test_llm_batching.py. Here, the backend: exact mode (max_batch = 1)
must give the same tokens with or without cached prefixes and however often a
generation is preempted, also past Gemma's 512-token sliding window; batched mode
(max_batch > 1) must run generations together, free sequences on release, and
keep within its budgets. Nothing here asserts on speed (that is
`aios bench llm --concurrency / --agents-steps`).
"""
from __future__ import annotations

import pickle
import threading
from typing import Any

import pytest

from aios.managers.llm.backends.llamacpp import LlamaCppBackend
from aios.managers.llm.types import BackendError, ChatArgs, ChatMessage, ChatResult, Generation
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

#: a shared system prompt of about 260 tokens (tool descriptions, like many agents share)
SYSTEM = "\n".join(
    f"Tool {name}: use it when the task needs {name.replace('_', ' ')}; it takes a query and returns results."
    for name in ["search_web", "read_file", "write_file", "send_email", "calendar_lookup", "run_python",
                 "fetch_url", "summarize_text", "translate_text", "get_weather", "stock_quote", "list_files"] * 2)
STORY = ("Write a long story about a dragon who learns to cook. Describe every dish she makes, "
         "every mistake, and every friend she meets, in great detail. ")


def chat(user: str, system: str | None = None, **kw: Any) -> ChatArgs:
    msgs = ([ChatMessage(role="system", content=system)] if system else []) + [ChatMessage(role="user", content=user)]
    return ChatArgs(messages=msgs, **{"max_tokens": 16, "stop": [], "ignore_eos": True, **kw})


def run(b: LlamaCppBackend, args: ChatArgs, slice_: int | None = None) -> tuple[ChatResult, list[str], str]:
    """Result, digests of every step's logits (when the backend records them, else the tokens), streamed text."""
    gen = b.start(args)
    pieces: list[str] = []
    while not gen.done:
        b.advance(gen, slice_, pieces.append)
        if slice_ is not None and not gen.done:
            b.suspend(gen)
    trace = list(gen.logit_digests) or [str(t) for t in gen.tokens]  # type: ignore[attr-defined]
    return b.finish(gen), trace, "".join(pieces)


# --------------------------------------------------------------------------- exact mode


@pytest.fixture(scope="module")
def exact() -> LlamaCppBackend:
    """max_batch = 1, recording a digest of each step's logits: exactness means bit-identical logits."""
    b = LlamaCppBackend(n_ctx=2048, max_batch=1)
    b._engine.record_logits = True
    yield b
    b.close()


def _interleaved(b: LlamaCppBackend, args: ChatArgs, other: ChatArgs, slice_: int) -> tuple[list[str], str, int]:
    """Run `args` in slices with one token of `other` in between, its snapshot pickled now and then."""
    gen: Generation = b.start(args)
    oth: Generation = b.start(other)
    pieces: list[str] = []
    n = 0
    while not gen.done:
        b.advance(gen, slice_, pieces.append)
        n += 1
        if gen.done:
            break
        b.suspend(gen)
        if n % 3 == 0:
            gen = pickle.loads(pickle.dumps(gen))  # as if spilled to disk
        if oth.done:
            b.finish(oth)
            oth = b.start(other)
        b.advance(oth, 1, lambda s: None)
        b.suspend(oth)
    b.drop(oth)
    trace = list(gen.logit_digests)  # type: ignore[attr-defined]
    return trace, b.finish(gen).message.content, n


@pytest.mark.parametrize("repeats", [18, 20])
def test_exact_resume_past_the_sliding_window(exact: LlamaCppBackend, repeats: int) -> None:
    """Gemma 3's sliding-window layers keep 512 positions in a saved state; a restored longer
    sequence must still continue with bit-identical logits.  (Measured: without the filler that
    puts restored cells where the uninterrupted run had them, these two prompt lengths, 587 and
    649 tokens, give different logits after a resume.)"""
    args = chat(STORY * repeats, max_tokens=30)
    exact.prefix_cache.clear()
    ref, ref_trace, _ = run(exact, args)
    assert ref.usage.prompt_tokens > 580
    exact.prefix_cache.clear()  # the interleaved run computes its prompt too
    trace, text, switches = _interleaved(exact, args, chat("List five fruits.", max_tokens=40), 2)
    assert switches >= 14 and len(ref_trace) == 30
    assert trace == ref_trace and text == ref.message.content


def test_prefix_cache_reuse_gives_the_same_tokens(exact: LlamaCppBackend) -> None:
    cache = exact.prefix_cache
    assert cache is not None
    cache.clear()
    first, _, _ = run(exact, chat("What is the capital of France?", SYSTEM))
    assert first.usage.cached_prompt_tokens == 0 and len(cache) >= 1
    hits = cache.stats()["hits"]
    warm, warm_trace, warm_text = run(exact, chat("Name three colors.", SYSTEM), slice_=3)
    assert cache.stats()["hits"] == hits + 1
    assert warm.usage.cached_prompt_tokens >= 192  # most of the shared system prompt
    assert warm.usage.cached_prompt_tokens % cache.chunk == 0
    assert warm.usage.cached_prompt_tokens < warm.usage.prompt_tokens
    cache.clear()
    cold, cold_trace, _ = run(exact, chat("Name three colors.", SYSTEM))
    assert cold.usage.cached_prompt_tokens == 0
    assert warm_trace == cold_trace and warm.message.content == cold.message.content == warm_text


def test_long_conversation_reuses_its_previous_step(exact: LlamaCppBackend) -> None:
    """An agent's next step extends its previous prompt: past the window only whole entries serve,
    and the step's output is the same as without the cache."""
    exact.prefix_cache.clear()
    msgs = [ChatMessage(role="system", content=SYSTEM + "\n" + STORY * 8), ChatMessage(role="user", content="Begin.")]
    step1 = ChatArgs(messages=msgs, max_tokens=8, stop=[], ignore_eos=True)
    r1, _, _ = run(exact, step1)
    assert r1.usage.prompt_tokens > 512
    step2 = ChatArgs(messages=msgs + [ChatMessage(role="assistant", content=r1.message.content),
                                      ChatMessage(role="user", content="Go on.")],
                     max_tokens=8, stop=[], ignore_eos=True)
    warm, warm_trace, _ = run(exact, step2, slice_=3)
    assert warm.usage.cached_prompt_tokens > 512
    exact.prefix_cache.clear()
    cold, cold_trace, _ = run(exact, step2)
    assert warm_trace == cold_trace


# --------------------------------------------------------------------------- batched mode


@pytest.fixture(scope="module")
def batched() -> LlamaCppBackend:
    b = LlamaCppBackend(n_ctx=1024, max_batch=4, prefix_cache_mb=3)
    yield b
    b.close()


def test_batched_generations_decode_together(batched: LlamaCppBackend) -> None:
    assert batched.max_concurrency == 4
    before = batched.stats()
    results: dict[int, tuple[ChatResult, list[str], str]] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = run(batched, chat(f"Describe animal number {i} in detail.", max_tokens=24), slice_=8)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for res, trace, streamed in results.values():
        assert res.usage.completion_tokens == len(trace) == 24 and res.finish_reason == "length"
        assert streamed == res.message.content
    after = batched.stats()
    tokens_decoded = after["decoded_tokens"] - before["decoded_tokens"]
    calls = after["decode_calls"] - before["decode_calls"]
    assert tokens_decoded > calls  # some decode calls advanced several generations at once
    wait_until(lambda: batched.stats()["resident"] == 0, timeout=30, message="sequences to be freed")


def test_release_frees_a_running_generations_sequence(batched: LlamaCppBackend) -> None:
    gen = batched.start(chat(STORY, max_tokens=500))
    errors: list[BaseException] = []
    got: list[str] = []

    def advance() -> None:
        try:
            batched.advance(gen, None, got.append)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=advance)
    t.start()
    wait_until(lambda: len(got) >= 3, timeout=60, interval=0.01, message="tokens to stream")
    assert batched.stats()["resident"] == 1
    batched.drop(gen)  # what the core does when the request is cancelled
    t.join(30)
    assert isinstance(errors[0], BackendError) and errors[0].code == "CANCELLED"
    wait_until(lambda: batched.stats()["resident"] == 0 and batched.stats()["running"] == 0, timeout=30,
               message="the sequence to be freed")
    res, _, _ = run(batched, chat("Say hello.", max_tokens=4))  # the engine keeps serving
    assert res.usage.completion_tokens == 4


def test_tiny_prefix_cache_budget_is_never_exceeded(batched: LlamaCppBackend) -> None:
    cache = batched.prefix_cache
    assert cache is not None and cache.budget_bytes == 3 * 1024 * 1024
    for i in range(4):  # entries of 64-192 tokens at ~18 KB a token: at most one or two fit
        run(batched, chat(f"Question {i}: what is {i} plus {i}?", SYSTEM[: 200 * (i + 1)], max_tokens=2))
        assert cache.bytes <= cache.budget_bytes
    s = cache.stats()
    assert s["inserts"] >= 1 and s["peak_bytes"] <= s["budget_bytes"]
    assert s["evictions"] + s["refused"] >= 1
