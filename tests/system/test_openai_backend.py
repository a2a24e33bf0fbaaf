"""Tests of OpenAIBackend against a REAL OpenAI-compatible server: llama_cpp.server serving the
default Gemma 3 270M GGUF (a base model, so answers are short and odd, but real).

The server (the `llama_server` fixture, tests/support/llama_server.py) is started once for the
module with settings that make it deterministic enough for exact resume; each request adds
``repeat_penalty: 1.0`` (llama.cpp's penalty sampler remembers only tokens it sampled itself).
See the openai_backend module docstring.
"""
from __future__ import annotations

import json

import pytest

from aios.managers.llm.backends.openai_backend import OpenAIBackend
from aios.managers.llm.types import BackendError, ChatArgs
from tests.support.llm_driver import q, run
from tests.support.network import free_port

pytestmark = pytest.mark.timeout(60)

DETERMINISTIC = {"repeat_penalty": 1.0}


@pytest.mark.model
def test_chat_answers_paris_with_usage(llama_server: str) -> None:
    b = OpenAIBackend(llama_server, "gemma-3-270m", stop=["###"], extra_body=DETERMINISTIC)
    res, pieces, _ = run(b, q(max_tokens=24))
    assert "Paris" in res.message.content
    assert res.message.role == "assistant"
    assert res.finish_reason == "stop"  # at the "###" that starts the model's next section
    assert res.usage.prompt_tokens > 0 and 0 < res.usage.completion_tokens <= 24
    assert "".join(pieces) == res.message.content
    assert res.model == "gemma-3-270m"


@pytest.mark.model
def test_completion_mode_answers_and_streams(llama_server: str) -> None:
    b = OpenAIBackend(llama_server, "gemma", name="remote-gemma", mode="completion", extra_body=DETERMINISTIC)
    res, pieces, _ = run(b, q(max_tokens=24))
    assert "Paris" in res.message.content
    assert len(pieces) > 3 and "".join(pieces) == res.message.content
    assert "###" not in res.message.content  # the alpaca layout's stop sequence
    assert res.model == "remote-gemma"


@pytest.mark.model
def test_length_limit(llama_server: str) -> None:
    b = OpenAIBackend(llama_server, "gemma", mode="completion", extra_body=DETERMINISTIC)
    res, _, _ = run(b, q("Who was Napoleon?", max_tokens=5))
    assert res.finish_reason == "length"
    assert res.usage.completion_tokens == 5


@pytest.mark.model
@pytest.mark.parametrize("prompt", ["Why is the sky blue?", "Who was Napoleon?"])
def test_completion_mode_resume_equals_uninterrupted(llama_server: str, prompt: str) -> None:
    b = OpenAIBackend(llama_server, "gemma", mode="completion", extra_body=DETERMINISTIC)
    whole, _, one = run(b, q(prompt, max_tokens=32))
    sliced, pieces, slices = run(b, q(prompt, max_tokens=32), slice_tokens=4)
    assert one == 1 and slices >= 4
    assert len(whole.message.content) > 40
    assert sliced.message.content == whole.message.content
    assert "".join(pieces) == whole.message.content
    assert sliced.usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.model
def test_chat_mode_replay_resume_equals_uninterrupted(llama_server: str) -> None:
    b = OpenAIBackend(llama_server, "gemma", chat_resume="replay", extra_body=DETERMINISTIC)
    whole, _, _ = run(b, q("Why is the sky blue?", max_tokens=12))
    sliced, pieces, slices = run(b, q("Why is the sky blue?", max_tokens=12), slice_tokens=4)
    assert slices == 3
    assert sliced.message.content == whole.message.content == "".join(pieces)


@pytest.mark.model
def test_json_schema_response_format(llama_server: str) -> None:
    # llama_cpp.server rejects {"type": "json_schema"} (HTTP 500, pydantic literal error) but accepts
    # {"type": "json_object", "schema": ...}; the backend negotiates down to that.
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
    b = OpenAIBackend(llama_server, "gemma", extra_body=DETERMINISTIC)
    args = q("Give the capital of France as JSON.", max_tokens=40, json_schema=schema)
    res, _, _ = run(b, args)
    assert isinstance(res.parsed, dict) and isinstance(res.parsed.get("capital"), str)
    assert json.loads(res.message.content) == res.parsed
    sliced, _, slices = run(b, args, slice_tokens=3)  # resumed by replay: grammar cannot be prefilled
    assert slices > 1 and sliced.parsed == res.parsed


@pytest.mark.model
def test_forced_tool_call_is_mapped(llama_server: str) -> None:
    # The alpaca chat format has no native tool calling; llama_cpp.server produces a call when the
    # tool is forced, which exercises the streamed tool_calls parsing.
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}
    b = OpenAIBackend(llama_server, "gemma", extra_body={**DETERMINISTIC, "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}})
    args = ChatArgs(messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[tool], max_tokens=40)
    res, _, _ = run(b, args)
    assert res.finish_reason == "tool_calls"
    (call,) = res.tool_calls
    assert call.function["name"] == "get_weather" and call.id
    assert isinstance(json.loads(call.function["arguments"])["city"], str)
    sliced, _, slices = run(b, args, slice_tokens=5)
    assert slices > 1 and json.loads(sliced.tool_calls[0].function["arguments"]) == json.loads(call.function["arguments"])


def test_connection_refused_is_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    b = OpenAIBackend(url, "gemma")
    gen = b.start(q(max_tokens=4))
    with pytest.raises(BackendError) as ei:
        b.advance(gen, None, lambda s: None)
    assert ei.value.code == "UNAVAILABLE"
    assert url in ei.value.message
    assert not gen.done


@pytest.mark.model
def test_wrong_endpoint_404_is_invalid_argument(llama_server: str) -> None:
    b = OpenAIBackend(llama_server.removesuffix("/v1"), "gemma")  # no /v1: the server answers 404
    gen = b.start(q(max_tokens=4))
    with pytest.raises(BackendError) as ei:
        b.advance(gen, None, lambda s: None)
    assert ei.value.code == "INVALID_ARGUMENT" and "404" in ei.value.message


@pytest.mark.model
def test_prompt_too_long_is_a_backend_error(llama_server: str) -> None:
    # Quirk: llama_cpp.server answers a streamed request whose prompt exceeds n_ctx with
    # HTTP 200 and an empty event stream (the ValueError only reaches its log), so the backend
    # cannot see a 400; it reports a non-retryable BACKEND_ERROR instead of looping on retries.
    b = OpenAIBackend(llama_server, "gemma", mode="completion")
    gen = b.start(q("hello " * 2500, max_tokens=4))  # more than the server's 2048-token context
    with pytest.raises(BackendError) as ei:
        b.advance(gen, None, lambda s: None)
    assert ei.value.code == "BACKEND_ERROR" and "streamed nothing" in ei.value.message
