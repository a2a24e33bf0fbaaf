"""The embedded llama.cpp backend against the real Gemma 3 270M model.

Small max_tokens and temperature 0 (except the seeded-sampling resume test), one
model load for the whole module. The pure streaming helpers are tested without the
model in tests/unit/test_llamacpp_backend.py.
"""
from __future__ import annotations

import json
import pickle
from typing import Callable

import jsonschema
import pytest

from aios.managers.llm.backends.llamacpp import LlamaCppBackend
from aios.managers.llm.types import BackendError, ChatArgs, ChatMessage, ChatResult, Generation
from tests.support.llm_driver import TOOLS

pytestmark = pytest.mark.model

LONG_PROMPT = (
    "Write a long story about a dragon who learns to cook. Describe every dish she makes, "
    "every mistake, and every friend she meets, in great detail."
)


def user(text: str, **kw: object) -> ChatArgs:
    return ChatArgs(messages=[ChatMessage(role="user", content=text)], **kw)

# --------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def backend() -> LlamaCppBackend:
    """Exact mode (max_batch = 1): outputs must not depend on preemption at all."""
    b = LlamaCppBackend(n_ctx=2048, max_batch=1)
    yield b
    b.close()


def run(b: LlamaCppBackend, args: ChatArgs, slice_: int | None = None) -> tuple[ChatResult, list[str], list[int]]:
    gen = b.start(args)
    pieces: list[str] = []
    while not gen.done:
        b.advance(gen, slice_, pieces.append)
    tokens = list(gen.tokens)  # type: ignore[attr-defined]
    return b.finish(gen), pieces, tokens


def test_plain_chat(backend: LlamaCppBackend) -> None:
    res, pieces, _ = run(backend, user("What is the capital of France?", max_tokens=24))
    assert "Paris" in res.message.content
    assert res.message.role == "assistant" and res.model == "gemma3-270m"
    assert res.usage.prompt_tokens > 10 and 0 < res.usage.completion_tokens <= 24
    assert res.finish_reason == "stop"
    assert "".join(pieces) == res.message.content


def _interleaved(b: LlamaCppBackend, args: ChatArgs, other: ChatArgs, slice_: int) -> tuple[str, list[int], int]:
    """Run `args` in slices, running `other` (also sliced) in between.

    The switches rotate through the ways a generation gets paused: explicit
    suspend and a pickled copy resumed (a snapshot spilled to disk), explicit
    suspend, auto-suspend by the backend when `other` runs, and suspend followed
    by resuming the same generation at once (no other work in between).
    """
    gen: Generation = b.start(args)
    oth: Generation = b.start(other)
    pieces: list[str] = []
    switches = 0
    while not gen.done:
        b.advance(gen, slice_, pieces.append)
        switches += 1
        if gen.done:
            break
        way = switches % 4
        if way != 2:
            b.suspend(gen)
            assert gen.snapshot_bytes() > 0
        if way == 0:
            gen = pickle.loads(pickle.dumps(gen))
        if way == 3:
            continue
        if oth.done:
            b.finish(oth)
            oth = b.start(other)
        b.advance(oth, 3, lambda s: None)
        b.suspend(oth)
    b.drop(oth)
    tokens = list(gen.tokens)  # type: ignore[attr-defined]
    res = b.finish(gen)
    assert "".join(pieces) == res.message.content
    return res.message.content, tokens, switches


@pytest.fixture(scope="module")
def greedy_ref(backend: LlamaCppBackend) -> tuple[ChatResult, list[int]]:
    """The uninterrupted greedy run of LONG_PROMPT, shared by the resume tests."""
    res, _, tokens = run(backend, user(LONG_PROMPT, max_tokens=48, stop=[]))
    return res, tokens


def test_exact_resume_greedy(backend: LlamaCppBackend, greedy_ref: tuple[ChatResult, list[int]]) -> None:
    ref, ref_tokens = greedy_ref
    assert ref.usage.completion_tokens == 48 and ref.finish_reason == "length"
    args = user(LONG_PROMPT, max_tokens=48, stop=[])
    text, tokens, switches = _interleaved(backend, args, user("List five fruits.", max_tokens=20), 4)
    assert switches >= 12
    assert tokens == ref_tokens
    assert text == ref.message.content
    assert backend.timings["snapshot_bytes"] > 0


def test_exact_resume_sampled(backend: LlamaCppBackend, greedy_ref: tuple[ChatResult, list[int]]) -> None:
    args = user(LONG_PROMPT, max_tokens=32, stop=[], temperature=0.8, seed=1234)
    ref, _, ref_tokens = run(backend, args)
    assert ref_tokens != greedy_ref[1][: len(ref_tokens)]  # it really sampled
    other = user("Name a color.", max_tokens=8, temperature=0.8, seed=7)
    text, tokens, _ = _interleaved(backend, args, other, 4)
    assert tokens == ref_tokens and text == ref.message.content  # same seed, same draws, any interruptions


ALL_OPTIONS = dict(temperature=0.9, seed=99, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.3,
                   frequency_penalty=0.4, presence_penalty=0.2)


def test_exact_resume_with_every_sampling_option(backend: LlamaCppBackend) -> None:
    args = user(LONG_PROMPT, max_tokens=32, stop=[], **ALL_OPTIONS)
    ref, _, ref_tokens = run(backend, args)
    plain, _, plain_tokens = run(backend, user(LONG_PROMPT, max_tokens=32, stop=[], temperature=0.9, seed=99))
    assert ref_tokens != plain_tokens  # the options changed the draws
    other = user("Name a color.", max_tokens=8, **ALL_OPTIONS)
    text, tokens, _ = _interleaved(backend, args, other, 4)
    assert tokens == ref_tokens and text == ref.message.content


def test_top_k_one_samples_the_greedy_answer(backend: LlamaCppBackend,
                                             greedy_ref: tuple[ChatResult, list[int]]) -> None:
    _, _, tokens = run(backend, user(LONG_PROMPT, max_tokens=48, stop=[], temperature=1.5, seed=5, top_k=1))
    assert tokens == greedy_ref[1]


def test_repeat_penalty_reduces_repetition(backend: LlamaCppBackend) -> None:
    # Greedy, this prompt loops on one token (measured: 39 of 40 tokens the same, 2 distinct)
    prompt = "Say hello hello hello hello hello hello hello hello"
    _, _, plain = run(backend, user(prompt, max_tokens=40, stop=[], ignore_eos=True))
    _, _, penalized = run(backend, user(prompt, max_tokens=40, stop=[], ignore_eos=True, repeat_penalty=1.5))
    assert len(set(plain)) <= 4
    assert len(set(penalized)) >= 4 * len(set(plain))


NOTES = ["My cat sleeps on the sofa all afternoon.", "The stock market fell sharply on Tuesday.",
         "Paris is the capital of France.", "I need to buy milk and eggs at the grocery store.",
         "The rocket launched into orbit carrying a satellite."]


def test_embeddings_rank_by_meaning(backend: LlamaCppBackend) -> None:
    import numpy as np

    notes = np.array(backend.embed(NOTES))
    assert notes.shape == (5, 640)
    assert np.allclose(np.linalg.norm(notes, axis=1), 1.0, atol=1e-5)
    assert backend.embed(NOTES[:1])[0] == notes[0].tolist()  # deterministic
    # paraphrases sharing no word with their note
    queries = {"finance and shares": 1, "french city": 2, "shopping list": 3, "space travel": 4}
    best = (np.array(backend.embed(list(queries))) @ notes.T).argmax(axis=1)
    assert best.tolist() == list(queries.values())


def test_long_texts_are_embedded_whole(backend: LlamaCppBackend) -> None:
    """A text longer than one window is the token-weighted mean of its windows, not its first window."""
    import numpy as np

    from aios.managers.llm.backends.llamacpp_embed import WINDOW

    long = " ".join(NOTES * 24)
    tokens = backend.tokenize(long)
    assert WINDOW < len(tokens) < 2 * WINDOW
    vec = np.array(backend.embed([long])[0])
    assert abs(np.linalg.norm(vec) - 1.0) < 1e-5
    embedder = backend._embedder
    assert embedder is not None
    first, second = (np.array(backend._engine.call(embedder._pass, part))
                     for part in (tokens[:WINDOW], tokens[WINDOW:]))
    expected = first * WINDOW + second * (len(tokens) - WINDOW)
    assert np.allclose(vec, expected / np.linalg.norm(expected), atol=1e-5)
    alone = first / np.linalg.norm(first)
    assert not np.allclose(vec, alone, atol=1e-3)  # the second window changed the vector


def test_embedding_between_steps_does_not_disturb_a_generation(
        backend: LlamaCppBackend, greedy_ref: tuple[ChatResult, list[int]]) -> None:
    gen = backend.start(user(LONG_PROMPT, max_tokens=48, stop=[]))
    while not gen.done:
        backend.advance(gen, 8, lambda s: None)
        backend.embed(["an interruption", NOTES[0]])
    assert list(gen.tokens) == greedy_ref[1]  # type: ignore[attr-defined]
    backend.finish(gen)


def test_stop_sequences_never_leak(backend: LlamaCppBackend) -> None:
    base, _, _ = run(backend, user(LONG_PROMPT, max_tokens=40))
    text = base.message.content
    assert "###" not in text
    # pick a stop string from the middle of the known output: it spans token boundaries
    k = text.index(" ", len(text) // 2)
    stop = text[k:k + 7]
    res, pieces, _ = run(backend, user(LONG_PROMPT, max_tokens=40, stop=[stop]), slice_=1)
    assert res.finish_reason == "stop"
    assert res.message.content == text[:text.index(stop)].rstrip()  # cut at its first occurrence
    assert "".join(pieces) == res.message.content
    assert all(stop not in p for p in pieces) and stop not in res.message.content


def test_json_schema_output(backend: LlamaCppBackend) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    res, _, _ = run(backend, user("In which city is the Eiffel Tower?", max_tokens=40, json_schema=schema))
    assert res.finish_reason == "stop"
    data = json.loads(res.message.content)
    assert res.parsed == data
    assert isinstance(data, dict) and isinstance(data["city"], str)
    jsonschema.validate(data, schema)


def test_json_exact_resume(backend: LlamaCppBackend) -> None:
    """The grammar's C state is rebuilt from the tokens on resume; output must not change."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "hobbies": {"type": "array", "items": {"type": "string"}}},
              "required": ["name", "age", "hobbies"]}
    args = user("Describe a person as JSON.", max_tokens=40, json_schema=schema)
    ref, _, ref_tokens = run(backend, args)
    text, tokens, _ = _interleaved(backend, args, user("Say hi.", max_tokens=6), 2)
    assert tokens == ref_tokens and text == ref.message.content


def test_tool_call_output(backend: LlamaCppBackend) -> None:
    res, _, _ = run(backend, user("What is 2 plus 3?", max_tokens=40, tools=TOOLS))
    assert res.finish_reason == "tool_calls" and res.message.content == ""
    assert len(res.tool_calls) == 1
    fn = res.tool_calls[0].function
    assert fn["name"] in {"get_weather", "add"}
    args = json.loads(fn["arguments"])
    assert isinstance(args, dict)
    if fn["name"] == "add":
        assert isinstance(args["a"], (int, float)) and isinstance(args["b"], (int, float))
    else:
        assert isinstance(args["city"], str)


@pytest.mark.parametrize(
    "make",
    [
        lambda: user("Hello", max_tokens=2047),
        lambda: user("word " * 3000, max_tokens=8),
    ],
    ids=["max_tokens", "prompt"],
)
def test_invalid_requests(backend: LlamaCppBackend, make: Callable[[], ChatArgs]) -> None:
    with pytest.raises(BackendError) as ei:
        backend.start(make())
    assert ei.value.code == "INVALID_ARGUMENT"
    assert ei.value.message
    if "max_tokens" in ei.value.message:
        assert "2047" in ei.value.message and "2048" in ei.value.message
