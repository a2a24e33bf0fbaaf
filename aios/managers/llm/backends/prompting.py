"""The one prompt and parse toolkit of every LLM backend (llama.cpp and the remote ones).

Why this module exists: the default model (Gemma 3 270M, *base*) has no chat
template, so every backend that talks to a raw completion model must render
chat messages itself, cut the answer at the next turn header, and parse the
structured outputs (JSON, tool calls) a weak model produces. Its six jobs,
each done once here:

1. render chat messages into a prompt (`render_alpaca` for the embedded core;
   `PROMPT_FORMATS` / `render_prompt` for remote completion endpoints);
2. describe tools to the model (`tools_preamble`);
3. ask for JSON (`json_instruction`);
4. parse JSON out of model text (`iter_json_objects`, `parse_json_output`);
5. parse tool calls out of model text (`parse_tool_calls`);
6. stop sequences across token and slice boundaries (`find_stop`,
   `held_suffix`, and `StopStream`, which the embedded core streams through).

Everything here is pure Python and picklable, because streaming state (held
back text, partial UTF-8) is part of a suspended generation.
"""
from __future__ import annotations

import codecs
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from aios.managers.llm.types import ChatMessage, ToolCall, ToolSpec

#: The system line of the Alpaca format.  Base models continue text; this
#: preamble is what makes them treat the next block as an instruction to answer.
DEFAULT_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
INSTRUCTION_HEADER = "### Instruction:"
RESPONSE_HEADER = "### Response:"
#: A base model does not stop after its answer; it writes the next "###" block
#: itself.  Cutting there is what turns a completion model into a chat model.
ALPACA_STOPS: tuple[str, ...] = ("###",)


# --------------------------------------------------------------------------- rendering


def render_alpaca(
    messages: Sequence[ChatMessage],
    *,
    tools: Sequence[ToolSpec] | None = None,
    json_schema: dict[str, Any] | None = None,
) -> str:
    """Render chat messages as one Alpaca-style instruction prompt ending in an open response.

    Alpaca, not Gemma's or ChatML's turn markers: measured on the base Gemma 270M,
    only the instruction format yields answers (the others echo or say nothing).
    Prior assistant turns are kept so that multi-turn conversations stay coherent,
    and tool results become their own block so the model sees what a tool returned.
    """
    system_parts = [m.content.strip() for m in messages if m.role == "system" and m.content.strip()]
    system = "\n\n".join(system_parts) if system_parts else DEFAULT_SYSTEM
    out: list[str] = [system, "\n\n"]
    if tools:
        out.append(tools_preamble(tools))
    if json_schema is not None:
        out.append(json_instruction(json_schema) + "\n\n")
    for m in messages:
        if m.role == "system":
            continue
        content = m.content.strip()
        if m.role == "user":
            out.append(f"{INSTRUCTION_HEADER}\n{content}\n\n")
        elif m.role == "assistant":
            calls = [_call_text(c) for c in m.tool_calls or []]
            shown = "\n".join(x for x in [content, *calls] if x)
            if shown:  # the model sees its earlier tool calls as it would have written them
                out.append(f"{RESPONSE_HEADER}\n{shown}\n\n")
        else:  # tool
            who = m.name or m.tool_call_id or "tool"
            out.append(f"### Tool result ({who}):\n{content}\n\n")
    out.append(f"{RESPONSE_HEADER}\n")
    return "".join(out)


def _call_text(call: ToolCall) -> str:
    """A tool call as the JSON `tools_preamble` asks the model to write."""
    name = call.function.get("name", "")
    raw = call.function.get("arguments") or "{}"
    try:
        args = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        args = raw
    return json.dumps({"name": name, "arguments": args}, ensure_ascii=False)


def _signature(params: dict[str, Any]) -> str:
    """`a: number, b: number`: a tool's arguments the way a model has seen functions written."""
    props = params.get("properties") or {}
    parts = []
    for name, sub in props.items():
        typ = "any"
        if isinstance(sub, dict):
            typ = " | ".join(json.dumps(v) for v in sub["enum"]) if "enum" in sub else str(sub.get("type", "any"))
        parts.append(f"{name}: {typ}")
    return ", ".join(parts)


def tools_preamble(tools: Sequence[ToolSpec]) -> str:
    """Describe the tools as function signatures and ask for one JSON call.

    Chosen by measurement on the base Gemma 270M (six queries, three tools):
    signatures `name(arg: type): description` picked the right tool 5/6 times,
    JSON-schema listings 3/6, and adding a worked example with an invented tool
    made it worse (4/6), so there is no example.  The grammar guarantees the
    shape; this text only has to steer the choice of tool and arguments.
    """
    lines = ["You have access to the following tools:"]
    for t in tools:
        f = t.function
        lines.append(f"{f.name}({_signature(f.parameters)}): {f.description.strip()}")
    lines += [
        "",
        'Answer with the tool call that best fits the instruction, as JSON: {"name": tool name, "arguments": {...}}.',
        "",
        "",
    ]
    return "\n".join(lines)


def json_instruction(schema: dict[str, Any]) -> str:
    """Ask for JSON valid for `schema`. Where a grammar enforces the shape (llama.cpp) this only
    improves the content; where nothing constrains decoding (a remote completion endpoint) the
    "no prose, no code fences" part is what makes the answer parseable."""
    return ("Answer with only a JSON value, no prose and no code fences. "
            f"It must be valid for this JSON schema: {json.dumps(schema, separators=(',', ':'))}")


def with_system_note(messages: Sequence[ChatMessage], note: str) -> list[ChatMessage]:
    """Prepend `note` to the first system message (or add one), leaving the caller's list untouched."""
    out = list(messages)
    for i, m in enumerate(out):
        if m.role == "system":
            out[i] = m.model_copy(update={"content": f"{m.content}\n\n{note}" if m.content else note})
            return out
    return [ChatMessage(role="system", content=note), *out]


# --------------------------------------------------------------------------- remote prompt layouts
#: A prompt renderer turns chat messages into (prompt text, stop sequences of the layout).
PromptRenderer = Callable[[Sequence[ChatMessage]], "tuple[str, list[str]]"]


def _render_alpaca_server(messages: Sequence[ChatMessage]) -> tuple[str, list[str]]:
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
            shown = "\n".join(x for x in [m.content, *(_call_text(c) for c in m.tool_calls or [])] if x)
            parts.append(f"### Response: {shown}\n\n")
        elif m.role == "tool":
            label = f" ({m.name})" if m.name else ""
            parts.append(f"### Input{label}: {m.content}\n\n")
    return "".join(parts), list(ALPACA_STOPS)


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
    "alpaca": _render_alpaca_server,
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


# --------------------------------------------------------------------------- tool schemas


def tool_call_schema(tools: Sequence[ToolSpec]) -> dict[str, Any]:
    """JSON schema of one tool call: {"name": <a tool>, "arguments": <its parameters>}.

    `anyOf` over the tools ties each name to its own argument schema, so a grammar
    built from it can only produce calls that the tool manager will accept.
    """
    alts = []
    for t in tools:
        params = dict(t.function.parameters)
        params.setdefault("type", "object")
        params.setdefault("properties", {})
        alts.append(
            {
                "type": "object",
                "properties": {"name": {"const": t.function.name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return alts[0] if len(alts) == 1 else {"anyOf": alts}


def new_tool_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def parse_tool_calls(text: str, names: Iterable[str]) -> list[ToolCall]:
    """Every tool call in model output naming one of `names`, tolerating prose and code fences.

    Accepts {"name": ..., "arguments": {...}} (what `tools_preamble` asks for),
    {"tool": ...}, {"function": {"name": ...}} and "parameters" for "arguments",
    with arguments as an object or as JSON text.
    """
    known = set(names)
    calls: list[ToolCall] = []
    for obj in iter_json_objects(text):
        if not isinstance(obj, dict):
            continue
        name = obj.get("name", obj.get("tool"))
        if name not in known:
            fn = obj.get("function")
            if isinstance(fn, dict) and fn.get("name") in known:
                obj, name = fn, fn.get("name")
            else:
                continue
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                continue
        if not isinstance(args, dict):
            continue
        calls.append(ToolCall(id=new_tool_call_id(),
                              function={"name": name, "arguments": json.dumps(args, ensure_ascii=False)}))
    return calls


def parse_tool_call(text: str, tools: Sequence[ToolSpec]) -> ToolCall | None:
    """The first tool call in `text` naming one of `tools`, or None (the caller falls back to text)."""
    calls = parse_tool_calls(text, (t.function.name for t in tools))
    return calls[0] if calls else None


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def iter_json_objects(text: str) -> Iterable[Any]:
    """Yield every JSON value that can be decoded from `text`: whole, in fences, then embedded."""
    text = text.strip()
    try:
        yield json.loads(text, strict=False)
        return
    except ValueError:
        pass
    for m in _FENCE.finditer(text):
        try:
            yield json.loads(m.group(1), strict=False)
        except ValueError:
            pass
    dec = json.JSONDecoder(strict=False)
    i = 0
    while True:
        starts = [p for p in (text.find("{", i), text.find("[", i)) if p >= 0]
        if not starts:
            return
        i = min(starts)
        try:
            obj, end = dec.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        yield obj
        i = end


def parse_json_output(text: str) -> Any:
    """The first JSON value in model output (whole, in code fences, or embedded in prose).

    Raises ValueError with json's message about the whole text when nothing decodes.
    """
    for obj in iter_json_objects(text):
        return obj
    try:
        json.loads(text.strip())
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    raise ValueError("no JSON value found")


def parse_json_lenient(text: str) -> Any:
    """The first JSON value in `text`, or None.  For backends that cannot constrain output."""
    for obj in iter_json_objects(text):
        return obj
    return None


def json_complete(text: str) -> bool:
    """True when `text` is a finished JSON document that no further character could extend.

    Lets a grammar-constrained generation stop right after the closing bracket
    instead of spending tokens on optional trailing whitespace.  A number is never
    "complete": another digit could always follow.
    """
    t = text.rstrip()
    if not t or t[-1] not in '}]"el':
        return False
    try:
        json.loads(t, strict=False)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- stop sequences


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
    """Length of the longest suffix of `text` that is a proper prefix of a stop sequence
    (text that must be held back: it may turn out to be the start of a stop)."""
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return held


# --------------------------------------------------------------------------- streaming state


@dataclass
class Utf8Stream:
    """Decode a byte stream that may split UTF-8 characters across tokens.

    A token of a byte-level vocabulary can end in the middle of a character; the
    incomplete tail is kept here (it is part of a suspended generation's state).
    """

    pending: bytes = b""

    def feed(self, data: bytes) -> str:
        buf = self.pending + data
        text, used = codecs.utf_8_decode(buf, "replace", False)
        self.pending = buf[used:]
        return text

    def flush(self) -> str:
        buf, self.pending = self.pending, b""
        return buf.decode("utf-8", "replace")


@dataclass
class StopStream:
    """Cut the completion at the first stop string without ever streaming part of one.

    Text that could still turn out to be the start of a stop string (across token
    boundaries) is held back; so is leading whitespace and whitespace at the end,
    because the final answer is reported stripped and the streamed pieces must add
    up to exactly the final text.
    """

    stops: tuple[str, ...] = ()
    held: str = ""
    started: bool = False
    stopped: bool = False

    def __post_init__(self) -> None:
        self.stops = tuple(s for s in self.stops if s)

    def feed(self, piece: str) -> str:
        """Add generated text; return the part that is now safe to emit (maybe "").

        Sets `stopped` when a stop string appeared; the stop and everything after
        it is discarded.
        """
        if self.stopped:
            return ""
        buf = self.held + piece
        if not self.started:
            buf = buf.lstrip()
            if not buf:
                self.held = ""
                return ""
            self.started = True
        if self.stops:
            cut = find_stop(buf, self.stops, 0)
            if cut is not None:
                self.stopped = True
                self.held = ""
                return buf[:cut].rstrip()
            keep = held_suffix(buf, self.stops)
            safe, held = buf[: len(buf) - keep], buf[len(buf) - keep :]
        else:
            safe, held = buf, ""
        out = safe.rstrip()
        self.held = safe[len(out) :] + held
        return out

    def flush(self) -> str:
        """End of generation without a stop: release held text, minus trailing whitespace."""
        if self.stopped:
            return ""
        out = self.held.rstrip()
        self.held = ""
        return out
