"""What every remote LLM backend shares: generations that live on a server, resumed from their text.

Why remote generations are suspended as *text*: the server owns the model state
and will not hand us its KV cache, so a suspended remote generation holds only
the completion text produced so far (plus accumulated tool-call fragments and
token counts). Everything in `RemoteGeneration` is plain Python data, so the
context manager can keep it in RAM or pickle it to disk.

`RemoteBackend` holds the slice/suspend/resume logic; a subclass only speaks
its protocol (`_open` a streaming request and decode its events, `_map_error`,
`_server_constrained`). How a suspended generation is resumed (prefill of the
text so far, or replay of the identical request) and how tokens are counted is
described in `openai_backend`'s docstring, which is the reference subclass;
the Ollama backend is the other.
"""
from __future__ import annotations

import abc
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

from ..types import Backend, BackendError, ChatArgs, ChatMessage, ChatResult, FinishReason, Generation, ToolCall, Usage
from .prompting import (
    PROMPT_FORMATS,
    PromptRenderer,
    find_stop,
    held_suffix,
    json_instruction,
    parse_json_output,
    parse_tool_calls,
    render_prompt,
    tools_preamble,
    with_system_note,
)

log = logging.getLogger("aios.llm.remote")


# --------------------------------------------------------------------------- generation state


def http_status_error(status: int, where: str, detail: str) -> BackendError:
    """The error code an HTTP status deserves (404 is left to each backend: its advice differs)."""
    if status in (401, 403):
        return BackendError("BACKEND_ERROR", f"{where} refused our credentials (HTTP {status}): {detail}")
    if status == 429:
        return BackendError("OVERLOADED", f"{where} is rate limiting (HTTP 429): {detail}")
    if status in (408, 409) or status >= 500:
        return BackendError("UNAVAILABLE", f"{where} failed (HTTP {status}): {detail}")
    if 400 <= status < 500:
        return BackendError("INVALID_ARGUMENT", f"{where} rejected the request (HTTP {status}): {detail}")
    return BackendError("UNAVAILABLE", f"{where} answered HTTP {status}: {detail}")


class RemoteGeneration(Generation):
    """A generation on a remote server: its resumable state is the text so far.

    `emitted` is how much of `text` has been passed to `on_text` (text that may be
    the start of a stop sequence is held back). `tool_calls` holds accumulated
    native tool calls as {"id", "name", "arguments"} dicts. `json_strategy`
    remembers which response_format flavour the server accepted, so that a
    replay sends the identical request.
    """

    def __init__(self, args: ChatArgs, prompt_estimate: int) -> None:
        self.args = args
        self.text = ""
        self.usage = Usage()
        self.finish_reason: FinishReason | None = None
        self.emitted = 0
        self.tool_calls: list[dict[str, Any]] = []
        self.requests = 0
        self.suspended = False
        self.usage_exact = True
        self.prompt_estimate = prompt_estimate
        self.json_strategy = 0

    def snapshot_bytes(self) -> int:
        calls = sum(len(c.get("arguments") or "") + len(c.get("name") or "") + 64 for c in self.tool_calls)
        return len(self.text.encode("utf-8")) + calls + 512


@dataclass
class ToolDelta:
    """A piece of a native tool call: OpenAI streams fragments by index, Ollama whole calls."""

    index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str | None = None
    complete: bool = False


@dataclass
class StreamEvent:
    """One decoded chunk of a server stream, in backend-neutral form."""

    text: str = ""
    tool_calls: list[ToolDelta] = field(default_factory=list)
    finish: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: prompt tokens the server took from its own prefix cache (OpenAI's prompt_tokens_details.cached_tokens)
    cached_prompt_tokens: int | None = None


@dataclass
class _Slice:
    """One `advance`: the request it sends (`n_request` tokens, fresh, prefill or replay) and what
    the stream brought back so far; each phase of `RemoteBackend.advance` reads and fills it."""

    n_request: int
    replay: bool
    prefill: bool
    stops: list[str]
    old_text: str  # the generation's text before this slice (a replay checks it reproduces it)
    text: str  # the text so far: the generation's (prefill, fresh) or only this stream's (replay)
    calls: list[dict[str, Any]]
    chunks: int = 0  # stream events that carried a token (text, or tool-call arguments)
    events_seen: int = 0
    finish: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    client_stop: bool = False  # one of our stop strings ended the text
    diverged: bool = False
    failure: BackendError | None = None


def _has_truncated_call(calls: Sequence[dict[str, Any]]) -> bool:
    for c in calls:
        try:
            json.loads(c.get("arguments") or "{}")
        except json.JSONDecodeError:
            return True
    return False


def merge_tool_delta(acc: list[dict[str, Any]], d: ToolDelta) -> None:
    if d.complete:
        acc.append({"id": d.id, "name": d.name or "", "arguments": d.arguments or "{}"})
        return
    idx = d.index if d.index is not None else max(len(acc) - 1, 0)
    while len(acc) <= idx:
        acc.append({"id": None, "name": "", "arguments": ""})
    entry = acc[idx]
    if d.id:
        entry["id"] = d.id
    if d.name:
        entry["name"] = d.name
    if d.arguments:
        entry["arguments"] += d.arguments


# --------------------------------------------------------------------------- shared remote backend


class RemoteBackend(Backend):
    """Slice/suspend/resume logic shared by remote backends; subclasses only speak their protocol.

    Subclasses implement `_open` (start one streaming request and return decoded
    events plus a closer), `_map_error` and `_server_constrained`.
    """

    log: logging.Logger = log
    #: where the server is, for error messages
    url: str = ""

    def __init__(
        self,
        *,
        mode: Literal["chat", "completion"],
        prompt_format: str | PromptRenderer,
        stop: Sequence[str],
        chat_resume: Literal["prefill", "replay"],
        max_server_stops: int,
        max_inflight: int,
    ) -> None:
        if isinstance(max_inflight, bool) or not isinstance(max_inflight, int) or not 1 <= max_inflight <= 1024:
            raise ValueError(f"llm option max_inflight must be an integer from 1 to 1024, not {max_inflight!r}")
        #: requests open on the server at once: the core runs this many generations concurrently,
        #: each on its own handler thread (the HTTP clients are thread-safe; the little state the
        #: backends share across requests is capability hints whose races are benign)
        self.max_concurrency = max_inflight
        if mode not in ("chat", "completion"):
            raise ValueError(f"mode must be 'chat' or 'completion', not {mode!r}")
        if chat_resume not in ("prefill", "replay"):
            raise ValueError(f"chat_resume must be 'prefill' or 'replay', not {chat_resume!r}")
        if not callable(prompt_format) and prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"unknown prompt format {prompt_format!r}; known: {sorted(PROMPT_FORMATS)}")
        self.mode = mode
        self.prompt_format = prompt_format
        self.extra_stop = [s for s in stop if s]
        self.chat_resume = chat_resume
        self.max_server_stops = max_server_stops

    #: seconds a health check may take
    CHECK_TIMEOUT_S = 3.0

    def check(self) -> str | None:
        """Reachability of the server: any HTTP answer means it is up (some servers have no
        endpoint to list models); only a refused or silent connection means it is not."""
        import httpx
        try:
            httpx.get(self._check_url(), timeout=self.CHECK_TIMEOUT_S)
        except httpx.HTTPError as exc:
            return f"cannot reach {self.url}: {exc or type(exc).__name__}"
        return None

    def _check_url(self) -> str:
        return self.url

    # ---- hooks
    @abc.abstractmethod
    def _open(self, gen: RemoteGeneration, n_tokens: int, prefill: bool) -> tuple[Iterator[StreamEvent], Callable[[], None]]:
        """Start one streaming request for `n_tokens` tokens; with `prefill`, continue `gen.text`."""

    @abc.abstractmethod
    def _map_error(self, exc: BaseException) -> BackendError:
        """Translate a client/transport exception into a BackendError."""

    @abc.abstractmethod
    def _server_constrained(self, gen: RemoteGeneration) -> bool:
        """True when the server constrains decoding (grammar/format/native tools): prefill is unsound."""

    # ---- helpers shared by subclasses
    def _prompt_messages(self, gen: RemoteGeneration, *, json_note: bool, tools_note: bool) -> list[ChatMessage]:
        msgs: list[ChatMessage] = list(gen.args.messages)
        if tools_note and gen.args.tools:
            msgs = with_system_note(msgs, tools_preamble(gen.args.tools).strip())
        if json_note and gen.args.json_schema is not None:
            msgs = with_system_note(msgs, json_instruction(gen.args.json_schema))
        return msgs

    def _render(self, gen: RemoteGeneration, *, json_note: bool) -> tuple[str, list[str]]:
        """Completion-mode prompt: tools are always described in text (no native tools there)."""
        return render_prompt(self.prompt_format, self._prompt_messages(gen, json_note=json_note, tools_note=True))

    def _stops(self, gen: RemoteGeneration) -> list[str]:
        stops: list[str] = []
        if self.mode == "completion":
            stops.extend(render_prompt(self.prompt_format, [ChatMessage(role="user", content="")])[1])
        stops.extend(self.extra_stop)
        stops.extend(gen.args.stop)
        seen: list[str] = []
        for s in stops:
            if s not in seen:
                seen.append(s)
        return seen

    def _server_stops(self, gen: RemoteGeneration) -> list[str]:
        return self._stops(gen)[: self.max_server_stops]

    def _uses_replay(self, gen: RemoteGeneration) -> bool:
        if self._server_constrained(gen):
            return True
        return self.mode == "chat" and self.chat_resume == "replay"

    @staticmethod
    def _check(gen: Generation) -> RemoteGeneration:
        if not isinstance(gen, RemoteGeneration):
            raise BackendError("INTERNAL", f"not a remote generation: {type(gen).__name__}")
        return gen

    # ---- Backend interface
    def start(self, args: ChatArgs) -> Generation:
        if args.model is not None and args.model not in self.models:
            raise BackendError("INVALID_ARGUMENT", f"model {args.model!r} is not served here (serving {self.models})")
        estimate = sum(len(m.content) for m in args.messages) // 4 + 4 * len(args.messages)
        return RemoteGeneration(args, estimate)

    def suspend(self, gen: Generation) -> None:
        # Nothing lives on our side between advance() calls: streams are closed when a slice
        # ends, and the server keeps no per-request state we could reuse.
        g = self._check(gen)
        g.suspended = True

    def drop(self, gen: Generation) -> None:
        self._check(gen).suspended = True

    def advance(self, gen: Generation, max_tokens: int | None, on_text: Callable[[str], None]) -> None:
        """One slice of a generation: one streaming request, in phases (plan, stream, commit, finish)."""
        g = self._check(gen)
        if g.done:
            return
        remaining = g.args.max_tokens - g.usage.completion_tokens
        if remaining <= 0:
            g.finish_reason = "length"
            self._emit(g, g.text, [], on_text)
            return
        sl = self._plan_slice(g, max_tokens, remaining)
        self._stream_slice(g, sl, on_text)
        self._check_stream_ended(sl)
        self._commit_slice(g, sl)
        self._record_prompt_usage(g, sl)
        if sl.failure is not None:
            self.log.info("generation failed: %s %s", sl.failure.code, sl.failure.message)
            raise sl.failure
        self._decide_finish(g, sl)
        if g.done:
            self._emit(g, g.text, [], on_text)

    def _plan_slice(self, g: RemoteGeneration, max_tokens: int | None, remaining: int) -> _Slice:
        """How this slice asks the server: fresh, prefill of the text so far, or replay of the whole request."""
        budget = remaining if max_tokens is None else max(1, min(max_tokens, remaining))
        started = g.usage.completion_tokens > 0 or bool(g.text) or bool(g.tool_calls)
        replay = started and self._uses_replay(g)
        prefill = started and not replay
        sl = _Slice(replay=replay, prefill=prefill,
                    n_request=g.usage.completion_tokens + budget if replay else budget,
                    stops=self._stops(g), old_text=g.text, text="" if replay else g.text,
                    calls=[] if replay else [dict(c) for c in g.tool_calls])
        g.suspended = False
        self.log.debug("advance: %d tokens (%s), %d done so far", sl.n_request,
                       "replay" if replay else "prefill" if prefill else "fresh", g.usage.completion_tokens)
        return sl

    def _stream_slice(self, g: RemoteGeneration, sl: _Slice, on_text: Callable[[str], None]) -> None:
        """Send the request and read its stream until it ends, a client-side stop string, or a failure
        (kept in `sl.failure`, translated to a BackendError)."""
        close: Callable[[], None] | None = None
        try:
            events, close = self._open(g, sl.n_request, sl.prefill)
            g.requests += 1
            for ev in events:
                if self._take_event(g, sl, ev, on_text):
                    break
        except BackendError as e:
            sl.failure = e
        except Exception as e:  # transport/client errors: translated, state kept consistent
            sl.failure = self._map_error(e)
        finally:
            if close is not None:
                try:
                    close()
                except Exception:  # closing a broken stream must not mask the real outcome
                    self.log.debug("closing stream failed", exc_info=True)

    def _take_event(self, g: RemoteGeneration, sl: _Slice, ev: StreamEvent, on_text: Callable[[str], None]) -> bool:
        """Fold one stream event into the slice and stream its final text; True when a stop string ends it."""
        sl.events_seen += 1
        if ev.prompt_tokens is not None:
            sl.prompt_tokens = ev.prompt_tokens
        if ev.completion_tokens is not None:
            sl.completion_tokens = ev.completion_tokens
        if ev.cached_prompt_tokens is not None:
            sl.cached_tokens = ev.cached_prompt_tokens
        for d in ev.tool_calls:
            merge_tool_delta(sl.calls, d)
        if not ev.text and any(d.arguments or d.complete for d in ev.tool_calls):
            sl.chunks += 1  # a token of tool-call arguments (empty closing fragments are not tokens)
        if ev.text:
            sl.chunks += 1
            start = len(sl.text)
            sl.text += ev.text
            if sl.replay and not sl.diverged:
                n = min(len(sl.text), len(sl.old_text))
                if sl.text[:n] != sl.old_text[:n]:
                    sl.diverged = True
                    self.log.warning("replay of a suspended generation diverged from its first run "
                                     "(server not deterministic?); output may be inconsistent")
            cut = find_stop(sl.text, sl.stops, start)
            if cut is not None:
                sl.text = sl.text[:cut]
                sl.client_stop = True
            self._emit(g, sl.text, sl.stops, on_text)
            if sl.client_stop:
                return True
        if ev.finish:
            sl.finish = ev.finish
        return False

    def _check_stream_ended(self, sl: _Slice) -> None:
        """A stream that stopped without a finish reason (and no stop string of ours) is a failure."""
        if sl.failure is not None or sl.finish is not None or sl.client_stop:
            return
        if sl.events_seen == 0:
            # An accepted request whose stream is empty failed on the server deterministically
            # (llama_cpp.server does this when the prompt exceeds its context window), so
            # retrying would loop: not retryable.
            sl.failure = BackendError("BACKEND_ERROR", f"{self.url} accepted the request but streamed nothing "
                                      "(prompt too long for the server's context? see the server's log)")
        else:
            sl.failure = BackendError("UNAVAILABLE", f"stream from {self.url} ended before the generation finished")

    @staticmethod
    def _commit_slice(g: RemoteGeneration, sl: _Slice) -> None:
        """Keep what this request produced (also after a failure, so a retry resumes from it)."""
        if sl.replay and sl.failure is not None and len(sl.text) < len(sl.old_text):
            return  # an interrupted replay knows less than we already had
        g.text = sl.text
        g.tool_calls = sl.calls
        if sl.completion_tokens is not None:
            produced = sl.completion_tokens
        elif sl.failure is None and sl.finish == "length" and not sl.client_stop:
            produced = sl.n_request
        else:
            produced = sl.chunks
            g.usage_exact = False
        if sl.replay:
            g.usage.completion_tokens = max(g.usage.completion_tokens, produced)
        else:
            g.usage.completion_tokens += produced

    @staticmethod
    def _record_prompt_usage(g: RemoteGeneration, sl: _Slice) -> None:
        """The prompt's size, once: as the server counted it, else our estimate (a prefill's prompt
        includes the completion so far, so it does not count)."""
        if g.usage.prompt_tokens != 0 or sl.prefill:
            return
        if sl.prompt_tokens is not None:
            g.usage.prompt_tokens = sl.prompt_tokens
            g.usage.cached_prompt_tokens = min(sl.cached_tokens or 0, sl.prompt_tokens)
        else:
            g.usage.prompt_tokens = g.prompt_estimate
            g.usage_exact = False

    @staticmethod
    def _decide_finish(g: RemoteGeneration, sl: _Slice) -> None:
        """Whether the generation is done after this slice, and why."""
        finish = sl.finish
        if finish not in (None, "length") and sl.chunks >= sl.n_request and _has_truncated_call(g.tool_calls):
            # llama_cpp.server reports "tool_calls" even when max_tokens cut the arguments off;
            # a call whose JSON is unfinished exactly at the token budget was cut by the budget.
            finish = "length"
        if sl.client_stop:
            g.finish_reason = "stop"
        elif finish == "length":
            if g.usage.completion_tokens >= g.args.max_tokens:
                g.finish_reason = "length"
            elif sl.completion_tokens is not None and sl.completion_tokens < sl.n_request:
                g.finish_reason = "length"  # the server ran out of context before our budget
            elif sl.completion_tokens is None and sl.chunks == 0:
                g.finish_reason = "length"  # no visible progress: never loop on a server that cannot go on
            # else: the slice is used up; the generation continues on the next advance()
        else:
            g.finish_reason = "tool_calls" if g.tool_calls else "stop"

    @staticmethod
    def _emit(g: RemoteGeneration, text: str, stops: Sequence[str], on_text: Callable[[str], None]) -> None:
        end = len(text) - held_suffix(text, stops)
        if end > g.emitted:
            piece = text[g.emitted:end]
            g.emitted = end
            on_text(piece)

    def finish(self, gen: Generation) -> ChatResult:
        g = self._check(gen)
        if not g.done:
            raise BackendError("INTERNAL", "finish() called on a generation that is not done")
        args = g.args
        calls = [
            ToolCall(id=c.get("id") or f"call_{i}", function={"name": c["name"], "arguments": c.get("arguments") or "{}"})
            for i, c in enumerate(g.tool_calls)
        ]
        if not calls and args.tools and not self._server_constrained(g):
            calls = parse_tool_calls(g.text, (t.function.name for t in args.tools))
        parsed: Any = None
        if args.json_schema is not None and not calls:
            try:
                parsed = parse_json_output(g.text)
            except ValueError as e:
                why = " (cut off at max_tokens)" if g.finish_reason == "length" else ""
                raise BackendError(
                    "BACKEND_ERROR", f"model output is not valid JSON{why}: {e}; output began {g.text[:200]!r}"
                ) from None
        finish_reason: FinishReason = "tool_calls" if calls else (g.finish_reason or "stop")
        return ChatResult(
            message=ChatMessage(role="assistant", content=g.text),
            tool_calls=calls,
            parsed=parsed,
            finish_reason=finish_reason,
            usage=g.usage.model_copy(),
            model=self.models[0],
        )


