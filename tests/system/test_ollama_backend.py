"""Tests of OllamaBackend against a FAKE Ollama server.

FAKE: no real Ollama server can run here; this stands in for Ollama's documented HTTP API only.
(`/api/chat` and `/api/generate` streaming NDJSON, `/api/tags`; errors as {"error": ...}.)

The fake "model" is a deterministic script: it answers known questions with fixed
text, one word per streamed chunk, and continues a prefilled answer from where it
stops, the way a real model at temperature 0 on a deterministic server would. So
these tests check what the backend *sends* (model, options, format, prefill,
replay) and how it *parses* replies, not the quality of any model.
"""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from aios.managers.llm.backends.ollama_backend import OllamaBackend
from aios.managers.llm.types import BackendError, ChatArgs
from tests.support.llm_driver import q, run
from tests.support.network import free_port

pytestmark = pytest.mark.timeout(30)

MODEL = "fake-gemma:270m"
ANSWERS = {
    "What is the capital of France?": "The capital of France is Paris. It lies on the Seine, and it is big.",
    "Say something.": "Certainly. Not JSON at all.",
}
JSON_ANSWERS = {"What is the capital of France?": '{"capital": "Paris", "country": "France"}'}
TOOL_CALL = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_CALL_TOKENS = 7


def words(text: str) -> list[str]:
    """The fake tokenizer: a word with its leading whitespace is one token."""
    return re.findall(r"\s*\S+|\s+", text)


class FakeOllama(ThreadingHTTPServer):
    """FAKE: no real Ollama server can run here; this stands in for Ollama's documented HTTP API only.

    Records every request body in `requests`. `fail_next` makes the next request fail:
    an HTTP status (int) or "midstream" (an {"error": ...} line after one chunk).
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.fail_next: int | str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [b for p, b in self.requests if p == path]


class _Handler(BaseHTTPRequestHandler):
    server: FakeOllama

    def log_message(self, *a: Any) -> None:  # keep pytest output clean
        pass

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/api/tags":
            self._json(200, {"models": [{"name": MODEL, "model": MODEL, "size": 1}]})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        self.server.requests.append((self.path, body))
        if self.path not in ("/api/chat", "/api/generate"):
            return self._json(404, {"error": "not found"})
        fail, self.server.fail_next = self.server.fail_next, None
        if isinstance(fail, int):
            return self._json(fail, {"error": f"injected failure {fail}"})
        if body.get("model") != MODEL:
            return self._json(404, {"error": f"model '{body.get('model')}' not found"})
        if self.path == "/api/chat":
            question, partial, prompt_len = self._chat_input(body)
        else:
            question, partial, prompt_len = self._generate_input(body)
        fmt = body.get("format")
        opts = body.get("options") or {}
        limit = int(opts.get("num_predict", -1))
        stops = opts.get("stop") or []
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        key = "message" if self.path == "/api/chat" else "response"

        def chunk(text: str, **extra: Any) -> None:
            part: dict[str, Any] = {"model": MODEL, "created_at": "2024-01-01T00:00:00Z", "done": False}
            part[key] = {"role": "assistant", "content": text} if key == "message" else text
            part.update(extra)
            try:
                self.wfile.write((json.dumps(part) + "\n").encode())
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading (a stop sequence it found itself): as a server would

        if body.get("tools") and self.path == "/api/chat":
            n = min(TOOL_CALL_TOKENS, limit) if limit >= 0 else TOOL_CALL_TOKENS
            if n == TOOL_CALL_TOKENS:
                part = {"model": MODEL, "done": False,
                        "message": {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]}}
                self.wfile.write((json.dumps(part) + "\n").encode())
            return chunk("", done=True, done_reason="stop" if n == TOOL_CALL_TOKENS else "length",
                         prompt_eval_count=prompt_len, eval_count=n)

        answer = JSON_ANSWERS.get(question, "") if fmt is not None else ""
        answer = answer or ANSWERS.get(question, "I do not know.")
        rest = answer[len(partial):] if answer.startswith(partial) else " (lost the thread)"
        out, n, reason = "", 0, "stop"
        for tok in words(rest):
            if 0 <= limit <= n:
                reason = "length"
                break
            if fail == "midstream" and n == 1:
                self.wfile.write(b'{"error": "model runner has unexpectedly stopped"}\n')
                return
            cut = min((i for s in stops if (i := (out + tok).find(s)) != -1), default=-1)
            if cut != -1:
                if cut > len(out):
                    chunk((out + tok)[len(out):cut])
                n += 1
                break
            out += tok
            n += 1
            chunk(tok)
        chunk("", done=True, done_reason=reason, prompt_eval_count=prompt_len, eval_count=n)

    @staticmethod
    def _chat_input(body: dict[str, Any]) -> tuple[str, str, int]:
        msgs = body["messages"]
        partial = msgs[-1]["content"] if msgs[-1]["role"] == "assistant" else ""
        question = next(m["content"] for m in reversed(msgs) if m["role"] == "user")
        return question, partial, sum(len(words(m["content"])) for m in msgs)

    @staticmethod
    def _generate_input(body: dict[str, Any]) -> tuple[str, str, int]:
        prompt = body["prompt"]
        m = list(re.finditer(r"### Instruction: (.*?)\n\n", prompt))[-1]
        return m.group(1), prompt[m.end():], len(words(prompt))


@pytest.fixture()
def fake() -> Iterator[FakeOllama]:
    srv = FakeOllama()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_fake_lists_model(fake: FakeOllama) -> None:
    import ollama

    assert [m.model for m in ollama.Client(host=fake.url).list().models] == [MODEL]


def test_chat_request_body_and_streamed_reply(fake: FakeOllama) -> None:
    b = OllamaBackend(fake.url, MODEL, name="gemma-remote")
    assert b.models == ["gemma-remote"]
    res, pieces, slices = run(b, q(max_tokens=64, stop=["Seine"], seed=7))
    assert slices == 1
    assert res.message.content == "The capital of France is Paris. It lies on the "
    assert "".join(pieces) == res.message.content and len(pieces) > 3
    assert res.finish_reason == "stop"
    assert res.usage.completion_tokens == 11 and res.usage.prompt_tokens == 6  # the stop token counts
    assert res.model == "gemma-remote"
    (body,) = fake.bodies("/api/chat")
    assert body["model"] == MODEL
    assert body["stream"] is True
    assert body["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
    assert body["options"]["temperature"] == 0.0
    assert body["options"]["num_predict"] == 64
    assert body["options"]["stop"] == ["Seine"]
    assert body["options"]["seed"] == 7
    assert body.get("format") in (None, "")
    assert not body.get("tools")


def test_length_limit(fake: FakeOllama) -> None:
    res, _, _ = run(OllamaBackend(fake.url, MODEL), q(max_tokens=3))
    assert res.message.content == "The capital of"
    assert res.finish_reason == "length" and res.usage.completion_tokens == 3


def test_chat_resume_by_assistant_prefill_equals_uninterrupted(fake: FakeOllama) -> None:
    b = OllamaBackend(fake.url, MODEL)
    whole, _, _ = run(b, q(max_tokens=40))
    fake.requests.clear()
    sliced, pieces, slices = run(b, q(max_tokens=40), slice_tokens=3)
    assert sliced.message.content == whole.message.content
    assert "".join(pieces) == whole.message.content
    assert sliced.usage.completion_tokens == whole.usage.completion_tokens == 15
    assert sliced.usage.prompt_tokens == whole.usage.prompt_tokens  # the first request's, not the prefilled ones
    bodies = fake.bodies("/api/chat")
    assert len(bodies) == slices == 5
    assert all(bd["options"]["num_predict"] == 3 for bd in bodies[:-1])
    assert bodies[0]["messages"][-1]["role"] == "user"
    # every later request continues the text so far as a trailing assistant message
    assert bodies[1]["messages"][-1] == {"role": "assistant", "content": "The capital of"}
    assert bodies[2]["messages"][-1] == {"role": "assistant", "content": "The capital of France is Paris."}


def test_generate_mode_raw_prompt_prefill(fake: FakeOllama) -> None:
    b = OllamaBackend(fake.url, MODEL, mode="generate")
    whole, _, _ = run(b, q(max_tokens=40))
    fake.requests.clear()
    sliced, pieces, _ = run(b, q(max_tokens=40), slice_tokens=4)
    assert sliced.message.content == whole.message.content == ANSWERS["What is the capital of France?"]
    assert "".join(pieces) == whole.message.content
    bodies = fake.bodies("/api/generate")
    assert all(bd["raw"] is True and bd["model"] == MODEL for bd in bodies)
    base = "\n\n### Instruction: What is the capital of France?\n\n"
    assert bodies[0]["prompt"] == base
    assert bodies[1]["prompt"] == base + "The capital of France"
    assert bodies[2]["prompt"] == base + "The capital of France is Paris. It lies"
    assert "###" in bodies[0]["options"]["stop"]  # the prompt layout's own stop sequence


def test_stop_sequence_across_a_slice_boundary(fake: FakeOllama) -> None:
    # "Paris. It" straddles the 6-token boundary: the server sees only " It" after the prefill
    # and cannot match it; the backend matches it over the whole text.
    b = OllamaBackend(fake.url, MODEL)
    res, pieces, _ = run(b, q(max_tokens=40, stop=["Paris. It"]), slice_tokens=6)
    assert res.message.content == "The capital of France is "
    assert "".join(pieces) == res.message.content
    assert res.finish_reason == "stop"


def test_json_format_and_replay_resume(fake: FakeOllama) -> None:
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
    b = OllamaBackend(fake.url, MODEL)
    whole, _, _ = run(b, q(max_tokens=40, json_schema=schema))
    assert whole.parsed == {"capital": "Paris", "country": "France"}
    body = fake.bodies("/api/chat")[0]
    assert body["format"] == schema
    assert "JSON" in body["messages"][0]["content"] and body["messages"][0]["role"] == "system"
    fake.requests.clear()
    sliced, pieces, _ = run(b, q(max_tokens=40, json_schema=schema), slice_tokens=1)
    assert sliced.parsed == whole.parsed and sliced.message.content == whole.message.content
    assert "".join(pieces) == whole.message.content
    bodies = fake.bodies("/api/chat")
    # constrained output is resumed by replaying the same request for more tokens, never by prefill
    assert [bd["options"]["num_predict"] for bd in bodies] == [1, 2, 3, 4]
    assert all(bd["messages"][-1]["role"] == "user" for bd in bodies)


def test_invalid_json_is_a_backend_error(fake: FakeOllama) -> None:
    b = OllamaBackend(fake.url, MODEL)
    gen = b.start(q("Say something.", json_schema={"type": "object"}))
    b.advance(gen, None, lambda s: None)
    with pytest.raises(BackendError) as ei:
        b.finish(gen)
    assert ei.value.code == "BACKEND_ERROR" and "not valid JSON" in ei.value.message


def test_tools_are_sent_and_calls_mapped(fake: FakeOllama) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}
    b = OllamaBackend(fake.url, MODEL)
    res, _, _ = run(b, ChatArgs(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[tool]))
    assert res.finish_reason == "tool_calls"
    assert len(res.tool_calls) == 1
    call = res.tool_calls[0]
    assert call.function["name"] == "get_weather"
    assert json.loads(call.function["arguments"]) == {"city": "Paris"}
    assert call.id
    body = fake.bodies("/api/chat")[0]
    assert body["tools"][0]["function"]["name"] == "get_weather"
    # sliced: replayed until the call fits
    fake.requests.clear()
    res2, _, _ = run(b, ChatArgs(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[tool]), 3)
    assert res2.tool_calls[0].function == call.function
    assert [bd["options"]["num_predict"] for bd in fake.bodies("/api/chat")] == [3, 6, 9]


def test_tool_result_messages_carry_tool_name(fake: FakeOllama) -> None:
    b = OllamaBackend(fake.url, MODEL)
    args = ChatArgs(messages=[{"role": "user", "content": "What is the capital of France?"},
                              {"role": "tool", "content": "sunny", "name": "get_weather"}], max_tokens=2)
    run(b, args)
    msgs = fake.bodies("/api/chat")[0]["messages"]
    assert msgs[1] == {"role": "tool", "content": "sunny", "tool_name": "get_weather"}




def test_connection_refused_is_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    b = OllamaBackend(url, MODEL)
    gen = b.start(q(max_tokens=4))
    with pytest.raises(BackendError) as ei:
        b.advance(gen, None, lambda s: None)
    assert ei.value.code == "UNAVAILABLE"
    assert url in ei.value.message
    assert not gen.done


def test_unknown_model_is_invalid_argument(fake: FakeOllama) -> None:
    b = OllamaBackend(fake.url, "no-such-model")
    gen = b.start(q(max_tokens=4))
    with pytest.raises(BackendError) as ei:
        b.advance(gen, None, lambda s: None)
    assert ei.value.code == "INVALID_ARGUMENT"
    assert "not found" in ei.value.message and "no-such-model" in ei.value.message


def test_http_errors_map_to_codes(fake: FakeOllama) -> None:
    b = OllamaBackend(fake.url, MODEL)
    for status, code in [(500, "UNAVAILABLE"), (503, "UNAVAILABLE"), (400, "INVALID_ARGUMENT"), (429, "OVERLOADED")]:
        fake.fail_next = status
        gen = b.start(q(max_tokens=4))
        with pytest.raises(BackendError) as ei:
            b.advance(gen, None, lambda s: None)
        assert ei.value.code == code, status


def test_error_mid_stream_keeps_partial_text_and_resumes(fake: FakeOllama) -> None:
    b = OllamaBackend(fake.url, MODEL)
    gen = b.start(q(max_tokens=40))
    pieces: list[str] = []
    fake.fail_next = "midstream"
    with pytest.raises(BackendError) as ei:
        b.advance(gen, None, pieces.append)
    assert ei.value.code == "UNAVAILABLE" and "unexpectedly stopped" in ei.value.message
    assert gen.text == "The" and not gen.done
    b.advance(gen, None, pieces.append)  # the core retries: continues from the saved text
    res = b.finish(gen)
    assert res.message.content == "".join(pieces) == ANSWERS["What is the capital of France?"]


def test_generation_pickles_while_suspended(fake: FakeOllama) -> None:
    import pickle

    b = OllamaBackend(fake.url, MODEL)
    gen = b.start(q(max_tokens=40))
    b.advance(gen, 5, lambda s: None)
    b.suspend(gen)
    assert 0 < gen.snapshot_bytes() < 4096
    gen2 = pickle.loads(pickle.dumps(gen))
    pieces: list[str] = []
    b.advance(gen2, None, pieces.append)
    assert gen2.text == ANSWERS["What is the capital of France?"]
