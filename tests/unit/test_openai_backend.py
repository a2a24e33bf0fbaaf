"""OpenAIBackend without a server: error mapping, the API key, parsing of usage chunks and JSON
output. Against a real llama_cpp.server it is tested in tests/system/test_openai_backend.py."""
from __future__ import annotations

import pytest

from aios.managers.llm.backends.openai_backend import OpenAIBackend
from aios.managers.llm.types import BackendError
from tests.support.llm_driver import q


def test_invalid_json_output_is_a_backend_error() -> None:
    b = OpenAIBackend("http://127.0.0.1:9/v1", "gemma")
    gen = b.start(q(json_schema={"type": "object"}))
    gen.text, gen.finish_reason = "The capital is Paris.", "stop"  # type: ignore[attr-defined]
    with pytest.raises(BackendError) as ei:
        b.finish(gen)
    assert ei.value.code == "BACKEND_ERROR" and "not valid JSON" in ei.value.message


def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOS_TEST_KEY", "sk-test")
    assert OpenAIBackend("http://127.0.0.1:9/v1", "m", api_key_env="AIOS_TEST_KEY").client.api_key == "sk-test"
    monkeypatch.delenv("AIOS_TEST_KEY")
    assert OpenAIBackend("http://127.0.0.1:9/v1", "m", api_key_env="AIOS_TEST_KEY").client.api_key == "not-needed"


@pytest.mark.parametrize("status,code", [(400, "INVALID_ARGUMENT"), (404, "INVALID_ARGUMENT"), (422, "INVALID_ARGUMENT"),
                                         (401, "BACKEND_ERROR"), (429, "OVERLOADED"), (500, "UNAVAILABLE"),
                                         (503, "UNAVAILABLE")])
def test_http_status_mapping(status: int, code: str) -> None:
    # Statuses llama_cpp.server never sends for a streamed request, checked on the mapping itself.

    try:
        import httpx2 as httpx  # what openai>=3 is built on
    except ImportError:  # pragma: no cover - older openai
        import httpx  # type: ignore[no-redef]
    url = "http://127.0.0.1:9/v1"
    req = httpx.Request("POST", url + "/chat/completions")
    resp = httpx.Response(status, request=req, json={"error": {"message": "the server says no"}})
    backend = OpenAIBackend(url, "m")
    exc = backend.client._make_status_error_from_response(resp)
    err = backend._map_error(exc)
    assert err.code == code
    assert url in err.message and "the server says no" in err.message


def test_cached_prompt_tokens_are_read_from_the_usage_chunk() -> None:
    """Servers with a prefix cache (vLLM, OpenAI) report prompt_tokens_details.cached_tokens in the final
    usage chunk; llama_cpp.server does not, so this parses a chunk built with openai's own types."""
    from openai.types.chat import ChatCompletionChunk

    from aios.managers.llm.backends.remote import StreamEvent

    chunk = ChatCompletionChunk.model_validate({
        "id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
        "usage": {"prompt_tokens": 120, "completion_tokens": 7, "total_tokens": 127,
                  "prompt_tokens_details": {"cached_tokens": 96}}})
    ev = StreamEvent()
    OpenAIBackend._usage_event(ev, chunk)
    assert (ev.prompt_tokens, ev.completion_tokens, ev.cached_prompt_tokens) == (120, 7, 96)
    plain = ChatCompletionChunk.model_validate({
        "id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m", "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})
    ev = StreamEvent()
    OpenAIBackend._usage_event(ev, plain)
    assert ev.cached_prompt_tokens is None
