"""LLM core backend for an Ollama server, through the official `ollama` client.

Ollama, like any remote server, keeps the model state to itself, so a
suspended generation holds only its text so far (`RemoteGeneration`, shared
with the OpenAI backend). Resuming is a text prefill, in one of two ways:

* ``mode="chat"`` (default, ``/api/chat``): resend the conversation with a final
  ``assistant`` message holding the partial text. Ollama's chat templates
  render the last message without closing the turn when it is the assistant's
  (``{{ if not $last }}<end_of_turn>{{ end }}`` and similar), so the model
  continues that very message. This keeps Ollama's own template, tools and
  ``format`` handling, which is why it is the default.
* ``mode="generate"`` (``/api/generate`` with ``raw=true``): the backend renders
  the prompt itself (`render_prompt`, Alpaca by default) and resumes with the
  same prompt + the partial text. Nothing is left to a template, so this is
  the exact choice for base models; tools are then described in the prompt.

We do not use ``/api/generate``'s ``context`` token array: Ollama treats an
empty prompt as a model-load request, the field is deprecated, and the array
grows with the conversation.

Constrained output (``format`` = the JSON schema, native ``tools`` in chat
mode) cannot be prefilled, because the server's grammar restarts at the
prefill; such generations are resumed by replaying the identical request with
``num_predict = tokens so far + slice`` and skipping what was already delivered
(exact at temperature 0 on a deterministic server, at the cost of
regenerating the prefix).

Slices are bounded with ``options.num_predict``; tokens are counted from
``eval_count`` in the final chunk (exact), prompt tokens from the first
request's ``prompt_eval_count``.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterator, Literal, Sequence

import httpx
import ollama
import pydantic

from ..options import DEFAULT_MAX_INFLIGHT
from ..types import SAMPLING_DEFAULTS, BackendError
from .prompting import PromptRenderer
from .remote import RemoteBackend, RemoteGeneration, StreamEvent, ToolDelta, http_status_error

log = logging.getLogger("aios.llm.ollama")

DEFAULT_HOST = "http://127.0.0.1:11434"


def _arguments(raw: Any) -> dict[str, Any]:
    """Ollama wants a tool call's arguments as an object; OpenAI-shaped history carries JSON text."""
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw or "{}")
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class OllamaBackend(RemoteBackend):
    """One Ollama model as an LLM core.

    `model` is required (it follows `host` only to keep the documented argument order).
    `options` are extra Ollama model options sent with every request (e.g. ``num_ctx``);
    the request's temperature, seed, stop and the slice's ``num_predict`` override them.
    """

    log = log
    sampling = frozenset(SAMPLING_DEFAULTS)

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        model: str = "",
        name: str | None = None,
        *,
        timeout: float = 120.0,
        mode: Literal["chat", "generate"] = "chat",
        prompt_format: str | PromptRenderer = "alpaca",
        stop: Sequence[str] = (),
        chat_resume: Literal["prefill", "replay"] = "prefill",
        options: dict[str, Any] | None = None,
        keep_alive: float | str | None = None,
        max_server_stops: int = 16,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        embedding_model: str | None = None,
    ) -> None:
        if not model:
            raise ValueError("OllamaBackend needs a model name")
        if mode not in ("chat", "generate"):
            raise ValueError(f"mode must be 'chat' or 'generate', not {mode!r}")
        super().__init__(mode="chat" if mode == "chat" else "completion", prompt_format=prompt_format, stop=stop,
                         chat_resume=chat_resume, max_server_stops=max_server_stops,
                         max_inflight=max_inflight)
        self.host = host.rstrip("/")
        self.url = self.host
        self.model = model
        self.models = [name or model]
        self.options = dict(options or {})
        self.keep_alive = keep_alive
        self.embedding_model = embedding_model
        self.client = ollama.Client(host=self.host, timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def _check_url(self) -> str:
        return self.host + "/api/version"

    embeddings = True

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Ollama's embed API (the `embedding_model` option, default the chat model)."""
        try:
            resp = self.client.embed(model=self.embedding_model or self.model, input=texts)
        except Exception as exc:  # noqa: BLE001
            raise self._map_error(exc) from None
        return [list(v) for v in resp.embeddings]

    def _server_constrained(self, gen: RemoteGeneration) -> bool:
        a = gen.args
        return a.json_schema is not None or (self.mode == "chat" and bool(a.tools))

    def _options(self, gen: RemoteGeneration, n_tokens: int) -> dict[str, Any]:
        opts = dict(self.options)
        opts.update(temperature=gen.args.temperature, num_predict=n_tokens, seed=gen.args.seed)
        for key in gen.args.sampling_set():  # Ollama's option names are the same
            opts[key] = getattr(gen.args, key)
        stops = self._server_stops(gen)
        if stops:
            opts["stop"] = stops
        return opts

    def _chat_messages(self, gen: RemoteGeneration) -> list[dict[str, Any]]:
        # The schema also goes into the prompt: Ollama's docs advise grounding `format` that way.
        out: list[dict[str, Any]] = []
        for m in self._prompt_messages(gen, json_note=True, tools_note=False):
            d: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.role == "tool" and m.name:
                d["tool_name"] = m.name
            if m.tool_calls:
                d["tool_calls"] = [{"function": {"name": c.function.get("name", ""),
                                                 "arguments": _arguments(c.function.get("arguments"))}}
                                   for c in m.tool_calls]
            out.append(d)
        return out

    def _open(self, gen: RemoteGeneration, n_tokens: int, prefill: bool) -> tuple[Iterator[StreamEvent], Callable[[], None]]:
        args = gen.args
        fmt = args.json_schema
        options = self._options(gen, n_tokens)
        if self.mode == "chat":
            msgs = self._chat_messages(gen)
            if prefill:
                msgs.append({"role": "assistant", "content": gen.text})
            tools = [t.model_dump() for t in args.tools] if args.tools else None
            stream = self.client.chat(model=self.model, messages=msgs, tools=tools, stream=True, format=fmt,
                                      options=options, keep_alive=self.keep_alive)
            return self._chat_events(stream), stream.close
        prompt, _ = self._render(gen, json_note=fmt is not None)
        stream = self.client.generate(model=self.model, prompt=prompt + gen.text if prefill else prompt, raw=True,
                                      stream=True, format=fmt, options=options, keep_alive=self.keep_alive)
        return self._generate_events(stream), stream.close

    @staticmethod
    def _final(ev: StreamEvent, part: Any) -> None:
        if getattr(part, "done", False):
            ev.finish = getattr(part, "done_reason", None) or "stop"
            ev.prompt_tokens = getattr(part, "prompt_eval_count", None)
            ev.completion_tokens = getattr(part, "eval_count", None)

    def _chat_events(self, stream: Iterator[Any]) -> Iterator[StreamEvent]:
        for part in stream:
            ev = StreamEvent()
            msg = getattr(part, "message", None)
            if msg is not None:
                ev.text = getattr(msg, "content", None) or ""
                for call in getattr(msg, "tool_calls", None) or []:
                    fn = call.function
                    arguments = fn.arguments if isinstance(fn.arguments, str) else json.dumps(dict(fn.arguments))
                    ev.tool_calls.append(ToolDelta(id=getattr(call, "id", None), name=fn.name, arguments=arguments,
                                                   complete=True))
            self._final(ev, part)
            yield ev

    def _generate_events(self, stream: Iterator[Any]) -> Iterator[StreamEvent]:
        for part in stream:
            ev = StreamEvent(text=getattr(part, "response", None) or "")
            self._final(ev, part)
            yield ev

    def _map_error(self, exc: BaseException) -> BackendError:
        where = f"Ollama at {self.host} (model {self.model!r})"
        if isinstance(exc, ollama.ResponseError):
            status = exc.status_code
            if status == 404:
                return BackendError("INVALID_ARGUMENT", f"model not found on {where} (HTTP 404): {exc.error}; "
                                    f"pull it with `ollama pull {self.model}`")
            if status < 0:  # an {"error": ...} line inside a stream, e.g. the model runner died
                return BackendError("UNAVAILABLE", f"{where} reported an error while streaming: {exc.error}")
            return http_status_error(status, where, str(exc.error))
        if isinstance(exc, httpx.TimeoutException):
            return BackendError("UNAVAILABLE", f"timed out waiting for {where}")
        if isinstance(exc, (ConnectionError, httpx.TransportError)):
            return BackendError("UNAVAILABLE", f"cannot reach {where}: {exc}")
        if isinstance(exc, httpx.HTTPError):
            return BackendError("UNAVAILABLE", f"HTTP error talking to {where}: {exc}")
        if isinstance(exc, (json.JSONDecodeError, pydantic.ValidationError)):
            return BackendError("BACKEND_ERROR", f"{where} sent a reply we cannot decode: {exc}")
        if isinstance(exc, OSError):
            return BackendError("UNAVAILABLE", f"cannot reach {where}: {exc}")
        self.log.exception("unexpected error talking to %s", where)
        return BackendError("BACKEND_ERROR", f"unexpected error from {where}: {type(exc).__name__}: {exc}")
