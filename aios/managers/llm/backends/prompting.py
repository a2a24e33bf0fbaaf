"""Backend-neutral helpers: chat rendering for base models, stop handling, JSON / tool-call parsing.

Why this module exists: the default model (Gemma 3 270M, *base*) has no chat
template, so every backend that talks to a raw completion model must render
chat messages itself, cut the answer at the next turn header, and parse the
structured outputs (JSON, tool calls) a weak model produces.  The llama.cpp
backend uses all of it; a remote backend that only offers plain completions
can reuse the same pieces, and one that speaks chat natively still needs the
tolerant parsers.

Everything here is pure Python and picklable, because streaming state (held
back text, partial UTF-8) is part of a suspended generation.
"""
from __future__ import annotations

import codecs
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

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
        out.append(json_preamble(json_schema))
    for m in messages:
        if m.role == "system":
            continue
        content = m.content.strip()
        if m.role == "user":
            out.append(f"{INSTRUCTION_HEADER}\n{content}\n\n")
        elif m.role == "assistant":
            if content:  # an assistant turn that only carried tool calls has no text to show
                out.append(f"{RESPONSE_HEADER}\n{content}\n\n")
        else:  # tool
            who = m.name or m.tool_call_id or "tool"
            out.append(f"### Tool result ({who}):\n{content}\n\n")
    out.append(f"{RESPONSE_HEADER}\n")
    return "".join(out)


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


def json_preamble(schema: dict[str, Any]) -> str:
    """Tell the model the shape we want; the grammar enforces it, the hint improves content."""
    return (
        "The response is a single JSON value that follows this JSON schema:\n"
        f"{json.dumps(schema, separators=(',', ':'))}\n\n"
    )


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


def parse_tool_call(text: str, tools: Sequence[ToolSpec]) -> ToolCall | None:
    """Turn model output into a ToolCall, tolerating prose or code fences around the JSON.

    Returns None when no JSON object naming one of `tools` can be found, so the
    caller can fall back to returning the text as a plain answer.
    """
    names = {t.function.name for t in tools}
    for obj in iter_json_objects(text):
        if not isinstance(obj, dict):
            continue
        name = obj.get("name")
        if name not in names:
            fn = obj.get("function")
            if isinstance(fn, dict) and fn.get("name") in names:
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
        return ToolCall(
            id=new_tool_call_id(),
            function={"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
        )
    return None


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
    _max_keep: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.stops = tuple(s for s in self.stops if s)
        self._max_keep = max((len(s) - 1 for s in self.stops), default=0)

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
            cut = -1
            for s in self.stops:
                j = buf.find(s)
                if j >= 0 and (cut < 0 or j < cut):
                    cut = j
            if cut >= 0:
                self.stopped = True
                self.held = ""
                return buf[:cut].rstrip()
            keep = 0
            tail_from = max(0, len(buf) - self._max_keep)
            for i in range(tail_from, len(buf)):
                suffix = buf[i:]
                if any(s.startswith(suffix) for s in self.stops):
                    keep = len(buf) - i
                    break
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
