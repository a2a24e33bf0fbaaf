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

The remote-agnostic machinery (`RemoteBackend`, `RemoteGeneration`,
`render_prompt`) lives here and is reused by the Ollama backend.
"""
from __future__ import annotations

import abc
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import openai

from ..types import (
    Backend,
    BackendError,
    ChatArgs,
    ChatMessage,
    ChatResult,
    FinishReason,
    Generation,
    ToolCall,
    Usage,
)

log = logging.getLogger("aios.llm.openai")

#: A prompt renderer turns chat messages into (prompt text, stop sequences of the layout).
PromptRenderer = Callable[[Sequence[ChatMessage]], "tuple[str, list[str]]"]


# --------------------------------------------------------------------------- prompt rendering


def _render_alpaca(messages: Sequence[ChatMessage]) -> tuple[str, list[str]]:
    """The layout of llama_cpp's ``alpaca`` chat format, so that completion mode and chat mode
    against ``llama_cpp.server --chat_format alpaca`` see the same prompt for plain chats.

    llama_cpp uses "</s>" after assistant turns, which is not a token of most models; we use
    the blank line throughout. Tool results become "### Input" sections.
    """
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    parts = [system + "\n\n"]
    for m in messages:
        if m.role == "user":
            parts.append(f"### Instruction: {m.content}\n\n")
        elif m.role == "assistant":
            parts.append(f"### Response: {m.content}\n\n")
        elif m.role == "tool":
            label = f" ({m.name})" if m.name else ""
            parts.append(f"### Input{label}: {m.content}\n\n")
    return "".join(parts), ["###"]


def _render_chatml(messages: Sequence[ChatMessage]) -> tuple[str, list[str]]:
    parts = []
    for m in messages:
        parts.append(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts), ["<|im_end|>", "<|im_start|>"]


def _render_gemma(messages: Sequence[ChatMessage]) -> tuple[str, list[str]]:
    """Gemma instruction-tuned layout (Gemma has no system role: it is folded into the first user turn)."""
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    parts = []
    for m in messages:
        if m.role == "system":
            continue
        role = "model" if m.role == "assistant" else "user"
        content = m.content
        if system and role == "user":
            content, system = f"{system}\n\n{content}", ""
        parts.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
    parts.append("<start_of_turn>model\n")
    return "".join(parts), ["<end_of_turn>", "<start_of_turn>"]


PROMPT_FORMATS: dict[str, PromptRenderer] = {
    "alpaca": _render_alpaca,
    "chatml": _render_chatml,
    "gemma": _render_gemma,
}


def render_prompt(fmt: str | PromptRenderer, messages: Sequence[ChatMessage]) -> tuple[str, list[str]]:
    """Render chat messages into one completion prompt; returns (prompt, the layout's stop sequences)."""
    if callable(fmt):
        return fmt(messages)
    try:
        return PROMPT_FORMATS[fmt](messages)
    except KeyError:
        raise ValueError(f"unknown prompt format {fmt!r}; known: {sorted(PROMPT_FORMATS)}") from None


def json_instruction(schema: dict[str, Any]) -> str:
    """System text asking for JSON, for servers/modes with no constrained decoding."""
    return (
        "Answer with only a JSON value, no prose and no code fences. "
        f"It must be valid for this JSON schema: {json.dumps(schema, separators=(',', ':'))}"
    )


def tools_instruction(args: ChatArgs) -> str:
    """System text describing tools, for modes where the server has no native tool calling."""
    lines = ["You can call these tools:"]
    for t in args.tools or []:
        f = t.function
        lines.append(f"- {f.name}: {f.description} Arguments schema: {json.dumps(f.parameters, separators=(',', ':'))}")
    lines.append(
        'To call a tool, answer with only a JSON object {"tool": "<name>", "arguments": {...}}. '
        "Otherwise answer normally."
    )
    return "\n".join(lines)


def with_system_note(messages: Sequence[ChatMessage], note: str) -> list[ChatMessage]:
    """Prepend `note` to the first system message (or add one), leaving the caller's list untouched."""
    out = list(messages)
    for i, m in enumerate(out):
        if m.role == "system":
            out[i] = m.model_copy(update={"content": f"{m.content}\n\n{note}" if m.content else note})
            return out
    return [ChatMessage(role="system", content=note), *out]


# --------------------------------------------------------------------------- output parsing


def parse_json_output(text: str) -> Any:
    """Decode the model's JSON answer, tolerating surrounding whitespace, code fences and prose.

    Raises ValueError with json's message when nothing decodes.
    """
    s = text.strip()
    try:
        return json.loads(s)
    except json.JSONDecodeError as first:
        err = first
    if s.startswith("```"):
        inner = s.split("\n", 1)[1] if "\n" in s else ""
        inner = inner.rsplit("```", 1)[0]
        try:
            return json.loads(inner.strip())
        except json.JSONDecodeError:
            pass
    dec = json.JSONDecoder()
    for i, ch in enumerate(s):
        if ch in "{[":
            try:
                return dec.raw_decode(s, i)[0]
            except json.JSONDecodeError:
                continue
    raise ValueError(str(err))


def parse_tool_call_text(text: str, tool_names: set[str]) -> list[dict[str, str]]:
    """Find prompt-shim tool calls ({"tool": name, "arguments": {...}}) in free text."""
    dec = json.JSONDecoder()
    calls: list[dict[str, str]] = []
    i = text.find("{")
    while i != -1:
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            name = obj.get("tool", obj.get("name"))
            arguments = obj.get("arguments", obj.get("parameters", {}))
            if isinstance(name, str) and name in tool_names and isinstance(arguments, dict):
                calls.append({"name": name, "arguments": json.dumps(arguments)})
        i = text.find("{", end)
    return calls


# --------------------------------------------------------------------------- stop handling


def find_stop(text: str, stops: Sequence[str], new_from: int) -> int | None:
    """Earliest index of a stop sequence that ends in text[new_from:], or None."""
    if not stops:
        return None
    longest = max(len(s) for s in stops)
    lo = max(0, new_from - longest + 1)
    best: int | None = None
    for s in stops:
        k = text.find(s, lo)
        if k != -1 and (best is None or k < best):
            best = k
    return best


def held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop sequence."""
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return held


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
    ) -> None:
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
            msgs = with_system_note(msgs, tools_instruction(gen.args))
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
        g = self._check(gen)
        if g.done:
            return
        args = g.args
        remaining = args.max_tokens - g.usage.completion_tokens
        if remaining <= 0:
            g.finish_reason = "length"
            self._emit(g, g.text, [], on_text)
            return
        budget = remaining if max_tokens is None else max(1, min(max_tokens, remaining))
        started = g.usage.completion_tokens > 0 or bool(g.text) or bool(g.tool_calls)
        replay = started and self._uses_replay(g)
        prefill = started and not replay
        n_request = g.usage.completion_tokens + budget if replay else budget
        stops = self._stops(g)

        old_text = g.text
        text = "" if replay else g.text
        calls: list[dict[str, Any]] = [] if replay else [dict(c) for c in g.tool_calls]
        chunks = 0
        events_seen = 0
        finish: str | None = None
        prompt_tokens: int | None = None
        completion_tokens: int | None = None
        client_stop = False
        diverged = False
        close: Callable[[], None] | None = None
        failure: BackendError | None = None
        g.suspended = False
        self.log.debug("advance: %d tokens (%s), %d done so far", n_request,
                       "replay" if replay else "prefill" if prefill else "fresh", g.usage.completion_tokens)
        try:
            events, close = self._open(g, n_request, prefill)
            g.requests += 1
            for ev in events:
                events_seen += 1
                if ev.prompt_tokens is not None:
                    prompt_tokens = ev.prompt_tokens
                if ev.completion_tokens is not None:
                    completion_tokens = ev.completion_tokens
                for d in ev.tool_calls:
                    merge_tool_delta(calls, d)
                if not ev.text and any(d.arguments or d.complete for d in ev.tool_calls):
                    chunks += 1  # a token of tool-call arguments (empty closing fragments are not tokens)
                if ev.text:
                    chunks += 1
                    start = len(text)
                    text += ev.text
                    if replay and not diverged:
                        n = min(len(text), len(old_text))
                        if text[:n] != old_text[:n]:
                            diverged = True
                            self.log.warning("replay of a suspended generation diverged from its first run "
                                             "(server not deterministic?); output may be inconsistent")
                    cut = find_stop(text, stops, start)
                    if cut is not None:
                        text = text[:cut]
                        client_stop = True
                    self._emit(g, text, stops, on_text)
                    if client_stop:
                        break
                if ev.finish:
                    finish = ev.finish
        except BackendError as e:
            failure = e
        except Exception as e:  # transport/client errors: translated, state kept consistent
            failure = self._map_error(e)
        finally:
            if close is not None:
                try:
                    close()
                except Exception:  # closing a broken stream must not mask the real outcome
                    self.log.debug("closing stream failed", exc_info=True)

        if failure is None and finish is None and not client_stop:
            if events_seen == 0:
                # An accepted request whose stream is empty failed on the server deterministically
                # (llama_cpp.server does this when the prompt exceeds its context window), so
                # retrying would loop: not retryable.
                failure = BackendError("BACKEND_ERROR", f"{self.url} accepted the request but streamed nothing "
                                       "(prompt too long for the server's context? see the server's log)")
            else:
                failure = BackendError("UNAVAILABLE", f"stream from {self.url} ended before the generation finished")

        # Commit what this request produced (also after a failure, so a retry resumes from it).
        if replay and failure is not None and len(text) < len(old_text):
            pass  # an interrupted replay knows less than we already had
        else:
            g.text = text
            g.tool_calls = calls
            if completion_tokens is not None:
                produced = completion_tokens
            elif failure is None and finish == "length" and not client_stop:
                produced = n_request
            else:
                produced = chunks
                g.usage_exact = False
            if replay:
                g.usage.completion_tokens = max(g.usage.completion_tokens, produced)
            else:
                g.usage.completion_tokens += produced
        if g.usage.prompt_tokens == 0:
            if prompt_tokens is not None and not prefill:
                g.usage.prompt_tokens = prompt_tokens
            elif not prefill:
                g.usage.prompt_tokens = g.prompt_estimate
                g.usage_exact = False
        if failure is not None:
            self.log.info("generation failed: %s %s", failure.code, failure.message)
            raise failure

        if finish not in (None, "length") and chunks >= n_request and _has_truncated_call(g.tool_calls):
            # llama_cpp.server reports "tool_calls" even when max_tokens cut the arguments off;
            # a call whose JSON is unfinished exactly at the token budget was cut by the budget.
            finish = "length"
        if client_stop:
            g.finish_reason = "stop"
        elif finish == "length":
            if g.usage.completion_tokens >= args.max_tokens:
                g.finish_reason = "length"
            elif completion_tokens is not None and completion_tokens < n_request:
                g.finish_reason = "length"  # the server ran out of context before our budget
            elif completion_tokens is None and chunks == 0:
                g.finish_reason = "length"  # no visible progress: never loop on a server that cannot go on
            # else: the slice is used up; the generation continues on the next advance()
        else:
            g.finish_reason = "tool_calls" if g.tool_calls else "stop"
        if g.done:
            self._emit(g, g.text, [], on_text)

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
            names = {t.function.name for t in args.tools}
            calls = [ToolCall(id=f"call_{i}", function=c) for i, c in enumerate(parse_tool_call_text(g.text, names))]
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
        max_retries: int = 0,
    ) -> None:
        super().__init__(mode=mode, prompt_format=prompt_format, stop=stop, chat_resume=chat_resume,
                         max_server_stops=max_server_stops)
        if completion_json not in ("prompt", "grammar"):
            raise ValueError(f"completion_json must be 'prompt' or 'grammar', not {completion_json!r}")
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url
        self.model = model
        self.models = [name or model]
        self.completion_json = completion_json
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
        extra = dict(self.extra_body)
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
