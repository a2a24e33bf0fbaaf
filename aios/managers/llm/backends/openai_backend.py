"""LLM core backend for any OpenAI-compatible HTTP server (OpenAI, vLLM, llama.cpp, LM Studio...).

Why remote generations are suspended as *text*: the server owns the model state
and will not hand us its KV cache, so a suspended remote generation holds only
the completion text produced so far (plus accumulated tool-call fragments and
token counts). Everything in `RemoteGeneration` is plain Python data, so the
context manager can keep it in RAM or pickle it to disk.

How a suspended generation is resumed depends on what the server can do:

* ``mode="completion"`` (``/v1/completions``): the backend renders the chat
  messages into one prompt itself (`render_prompt`, default the Alpaca layout
  that ``llama_cpp.server --chat_format alpaca`` uses) and resumes by sending
  *the same prompt text + the partial completion*. The server sees exactly the
  text it would have seen had it never stopped, so at temperature 0 on a
  deterministic server the resumed output equals the uninterrupted output
  (up to the server re-tokenizing the boundary; tests check this end to end).
  This is the exact mode and the one to use for base models.
  "Deterministic server" is a real condition. For llama_cpp.server it takes
  two settings, both measured here: run it with ``--n_batch 1`` (otherwise the
  prefilled text is evaluated as a batch, whose float results differ in the
  last bits from token-by-token decoding, and greedy decoding of a small
  model flips on near-ties), and send ``extra_body={"repeat_penalty": 1.0}``
  (its default 1.1 penalty remembers only the tokens *it* sampled, so after a
  prefill it penalizes differently). With both, resumed == uninterrupted.
* ``mode="chat"`` (``/v1/chat/completions``): the server owns the chat template.
  Resume appends a final ``assistant`` message holding the partial text
  ("assistant prefill"). Servers whose template leaves a trailing assistant
  turn open (vLLM with ``continue_final_message``, Anthropic-style APIs, Ollama)
  continue it; OpenAI itself and llama_cpp.server's ``alpaca`` format close the
  turn, so the continuation is only approximate. Pass ``chat_resume="replay"``
  to trade compute for exactness (see below).
* Constrained output (``json_schema`` through ``response_format`` or a grammar,
  native ``tools``) cannot be prefilled: the server's grammar would restart at
  the prefill boundary and the concatenation would be invalid. Such
  generations are resumed by *replay*: re-issue the identical request with
  ``max_tokens = tokens so far + slice`` and skip the already-delivered prefix.
  At temperature 0 on a deterministic server that is exact; it costs
  re-generating the prefix each slice (quadratic in slices), which is the
  price of slicing a constrained generation on a server with no state API.

Why slices are bounded with the server's ``max_tokens`` instead of counting
deltas and closing the stream: the server then stops after exactly the
granted number of tokens and we never lose tokens the server already produced
but we discarded. The stream is still closed in every exit path.

Token accounting: ``stream_options={"include_usage": True}`` is sent; servers
that report usage in the final chunk (OpenAI, vLLM) give exact counts. Servers
that ignore it (llama_cpp.server 0.3.x does) are counted as one token per
content delta, except that a slice ending with finish_reason ``length`` is
known to have produced exactly the requested ``max_tokens``. Prompt tokens are
then estimated (characters / 4) and `RemoteGeneration.usage_exact` is False.
A server that rejects ``stream_options`` is retried once without it.

Stop sequences are enforced on both sides: the server gets up to
``max_server_stops`` of them (OpenAI allows 4), and the backend checks the whole
accumulated text, which also catches a stop sequence straddling a slice
boundary (the server cannot see it: half of it is in the prompt). Text that
could be the start of a stop sequence is held back from ``on_text`` until it
is known not to be one, so streamed pieces always concatenate to the final
text.

The remote-agnostic machinery (`RemoteBackend`, `RemoteGeneration`) lives in
`remote.py`, shared with the Ollama backend; prompt layouts and parsers are
`prompting.py`'s, shared with the embedded core.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterator, Literal, Sequence

import openai

from ..options import DEFAULT_MAX_INFLIGHT
from ..types import SAMPLING_DEFAULTS, BackendError
from .prompting import PromptRenderer
from .remote import RemoteBackend, RemoteGeneration, StreamEvent, ToolDelta, http_status_error

log = logging.getLogger("aios.llm.openai")


# --------------------------------------------------------------------------- OpenAI-compatible


#: response_format flavours, tried in order until the server accepts one
JSON_STRATEGIES = ("json_schema", "json_object_schema", "json_object")


def _mentions(exc: openai.APIStatusError, word: str) -> bool:
    try:
        body = json.dumps(exc.body) if exc.body is not None else ""
    except (TypeError, ValueError):
        body = str(exc.body)
    return word in body or word in str(exc)


class OpenAIBackend(RemoteBackend):
    """An OpenAI-compatible server as one LLM core (see the module docstring for resume semantics).

    ``mode="completion"`` is exact on resume and right for base models (the Gemma default);
    ``mode="chat"`` uses the server's chat template, native tools and response_format.
    `extra_body` is merged into every request (server-specific knobs: llama.cpp ``grammar``,
    vLLM options, a forced ``tool_choice``); `prefill_extra_body` only into resumed chat
    requests (e.g. vLLM ``{"continue_final_message": True, "add_generation_prompt": False}``).
    ``completion_json="grammar"`` constrains completion-mode JSON with a GBNF grammar built from
    the schema (llama.cpp servers only); the default describes the schema in the prompt.
    """

    log = log
    sampling = frozenset(SAMPLING_DEFAULTS)

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        name: str | None = None,
        timeout: float = 120.0,
        *,
        mode: Literal["chat", "completion"] = "chat",
        prompt_format: str | PromptRenderer = "alpaca",
        stop: Sequence[str] = (),
        chat_resume: Literal["prefill", "replay"] = "prefill",
        completion_json: Literal["prompt", "grammar"] = "prompt",
        extra_body: dict[str, Any] | None = None,
        prefill_extra_body: dict[str, Any] | None = None,
        max_server_stops: int = 4,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_retries: int = 0,
        embedding_model: str | None = None,
    ) -> None:
        super().__init__(mode=mode, prompt_format=prompt_format, stop=stop, chat_resume=chat_resume,
                         max_server_stops=max_server_stops,
                         max_inflight=max_inflight)
        if completion_json not in ("prompt", "grammar"):
            raise ValueError(f"completion_json must be 'prompt' or 'grammar', not {completion_json!r}")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url
        self.model = model
        self.models = [name or model]
        self.completion_json = completion_json
        self.embedding_model = embedding_model
        self.extra_body = dict(extra_body or {})
        self.prefill_extra_body = dict(prefill_extra_body or {})
        # A local server needs no key, but the client insists on one.
        api_key = os.environ.get(api_key_env) or "not-needed"
        # Retries are the kernel's decision (UNAVAILABLE is retryable), so the client does none by default.
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self._stream_usage = True
        self._json_strategy_hint = 0
        self._grammar_cache: dict[str, str] = {}

    def close(self) -> None:
        self.client.close()

    def _check_url(self) -> str:
        return self.base_url + "/models"

    embeddings = True

    def embed(self, texts: list[str]) -> list[list[float]]:
        """The server's /v1/embeddings (the `embedding_model` option, default the chat model)."""
        try:
            resp = self.client.embeddings.create(model=self.embedding_model or self.model, input=texts)
        except Exception as exc:  # noqa: BLE001 - mapped like every other server error
            raise self._map_error(exc) from None
        return [list(d.embedding) for d in sorted(resp.data, key=lambda d: d.index)]

    # ---- protocol specifics
    def _server_constrained(self, gen: RemoteGeneration) -> bool:
        a = gen.args
        if self.mode == "chat":
            return a.json_schema is not None or bool(a.tools)
        return a.json_schema is not None and self.completion_json == "grammar"

    def _response_format(self, gen: RemoteGeneration) -> dict[str, Any] | None:
        schema = gen.args.json_schema
        if schema is None:
            return None
        kind = JSON_STRATEGIES[gen.json_strategy]
        if kind == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
        if kind == "json_object_schema":  # llama-cpp-python / Anyscale flavour
            return {"type": "json_object", "schema": schema}
        return {"type": "json_object"}

    def _chat_messages(self, gen: RemoteGeneration) -> list[dict[str, Any]]:
        # Plain json_object mode needs the schema (and the word JSON) in the prompt.
        note = gen.args.json_schema is not None and JSON_STRATEGIES[gen.json_strategy] == "json_object"
        out: list[dict[str, Any]] = []
        for m in self._prompt_messages(gen, json_note=note, tools_note=False):
            d: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.name is not None and m.role != "tool":
                d["name"] = m.name
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if m.tool_calls:
                d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
                d["content"] = m.content or None
            out.append(d)
        return out

    def _grammar(self, schema: dict[str, Any]) -> str:
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammar_cache:
            from llama_cpp.llama_grammar import json_schema_to_gbnf  # only needed for this llama.cpp knob

            self._grammar_cache[key] = json_schema_to_gbnf(key)
        return self._grammar_cache[key]

    def _open(self, gen: RemoteGeneration, n_tokens: int, prefill: bool) -> tuple[Iterator[StreamEvent], Callable[[], None]]:
        args = gen.args
        common: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "max_tokens": n_tokens,
            "temperature": args.temperature,
            "seed": args.seed,
        }
        stops = self._server_stops(gen)
        if stops:
            common["stop"] = stops
        for key in args.sampling_set() & {"top_p", "frequency_penalty", "presence_penalty"}:
            common[key] = getattr(args, key)
        extra = dict(self.extra_body)
        # not in OpenAI's API, but understood by vLLM and llama.cpp servers (OpenAI itself refuses
        # them with HTTP 400, which reaches the agent as INVALID_ARGUMENT naming the parameter)
        for key in args.sampling_set() & {"top_k", "min_p", "repeat_penalty"}:
            extra[key] = getattr(args, key)
        if gen.requests == 0 and args.json_schema is not None:
            gen.json_strategy = self._json_strategy_hint
        while True:
            kw = dict(common)
            if self._stream_usage:
                kw["stream_options"] = {"include_usage": True}
            if self.mode == "chat":
                msgs = self._chat_messages(gen)
                body = dict(extra)
                if prefill:
                    msgs.append({"role": "assistant", "content": gen.text})
                    body.update(self.prefill_extra_body)
                kw["messages"] = msgs
                if args.tools:
                    kw["tools"] = [t.model_dump() for t in args.tools]
                rf = self._response_format(gen)
                if rf is not None:
                    kw["response_format"] = rf
            else:
                grammar = args.json_schema is not None and self.completion_json == "grammar"
                prompt, _ = self._render(gen, json_note=args.json_schema is not None)
                kw["prompt"] = prompt + gen.text if prefill else prompt
                body = dict(extra)
                if grammar:
                    body["grammar"] = self._grammar(args.json_schema or {})
                rf = None
            try:
                if self.mode == "chat":
                    stream = self.client.chat.completions.create(**kw, extra_body=body or None)
                else:
                    stream = self.client.completions.create(**kw, extra_body=body or None)
            except openai.APIStatusError as e:
                # Capability negotiation, only before any token exists (so no output is lost).
                if self._stream_usage and e.status_code in (400, 422, 500) and _mentions(e, "stream_options"):
                    self.log.info("%s rejects stream_options; counting streamed deltas instead", self.url)
                    self._stream_usage = False
                    continue
                if (rf is not None and e.status_code in (400, 422, 500) and _mentions(e, "response_format")
                        and gen.json_strategy + 1 < len(JSON_STRATEGIES)):
                    gen.json_strategy += 1
                    self._json_strategy_hint = gen.json_strategy
                    self.log.info("%s rejects that response_format; trying %s", self.url, JSON_STRATEGIES[gen.json_strategy])
                    continue
                raise
            break
        events = self._chat_events(stream) if self.mode == "chat" else self._completion_events(stream)
        return events, stream.close

    @staticmethod
    def _usage_event(ev: StreamEvent, chunk: Any) -> None:
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            ev.prompt_tokens = getattr(usage, "prompt_tokens", None)
            ev.completion_tokens = getattr(usage, "completion_tokens", None)
            details = getattr(usage, "prompt_tokens_details", None)  # servers with a prefix cache
            cached = getattr(details, "cached_tokens", None) if details is not None else None
            if isinstance(cached, int):
                ev.cached_prompt_tokens = cached

    def _chat_events(self, stream: Any) -> Iterator[StreamEvent]:
        for chunk in stream:
            ev = StreamEvent()
            self._usage_event(ev, chunk)
            choices = getattr(chunk, "choices", None) or []
            if choices:
                ch = choices[0]
                delta = getattr(ch, "delta", None)
                if delta is not None:
                    ev.text = getattr(delta, "content", None) or ""
                    for tc in getattr(delta, "tool_calls", None) or []:
                        fn = getattr(tc, "function", None)
                        ev.tool_calls.append(ToolDelta(
                            index=getattr(tc, "index", None), id=getattr(tc, "id", None),
                            name=getattr(fn, "name", None) if fn else None,
                            arguments=getattr(fn, "arguments", None) if fn else None))
                ev.finish = getattr(ch, "finish_reason", None)
            yield ev

    def _completion_events(self, stream: Any) -> Iterator[StreamEvent]:
        for chunk in stream:
            ev = StreamEvent()
            self._usage_event(ev, chunk)
            choices = getattr(chunk, "choices", None) or []
            if choices:
                ev.text = getattr(choices[0], "text", None) or ""
                ev.finish = getattr(choices[0], "finish_reason", None)
            yield ev

    def _map_error(self, exc: BaseException) -> BackendError:
        where = f"{self.url} (model {self.model!r})"
        if isinstance(exc, openai.APITimeoutError):
            return BackendError("UNAVAILABLE", f"timed out waiting for {where}")
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            return BackendError("UNAVAILABLE", f"cannot reach the OpenAI-compatible server at {where}: {cause}")
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            detail = _error_detail(exc)
            if status == 404:
                return BackendError("INVALID_ARGUMENT", f"model or endpoint not found at {where} (HTTP 404): {detail}")
            return http_status_error(status, where, detail)
        if isinstance(exc, openai.APIError):
            return BackendError("UNAVAILABLE", f"{where} reported an error: {exc}")
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            return BackendError("UNAVAILABLE", f"cannot reach {where}: {exc}")
        self.log.exception("unexpected error talking to %s", where)
        return BackendError("BACKEND_ERROR", f"unexpected error from {where}: {type(exc).__name__}: {exc}")


def _error_detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        msg = body.get("message") or body.get("detail") or body.get("error")
        if isinstance(msg, dict):
            msg = msg.get("message", msg)
        if msg:
            return str(msg)[:500]
    return str(exc)[:500]
