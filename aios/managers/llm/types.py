"""Boundary types of the `llm` syscall family and the backend interface.

Every LLM core process runs one `Backend`. The core (the manager process) owns
the request lifecycle: it validates the syscall body into `ChatArgs`, asks the
backend to `start` a `Generation`, drives it with `advance` for at most the
slice of tokens the scheduler granted, and, when the slice runs out before the
generation is done, calls `suspend` so that the generation's state lives in
the `Generation` object alone (the context manager then keeps that object in
RAM or spills it to a file) and the backend is free to run another request.
A later `advance` on the suspended generation resumes it exactly.

Backends are deliberately ignorant of sockets, scheduling and snapshots'
storage; they only know how to generate, pause and continue.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ChatMessage(BaseModel):
    """One chat message, OpenAI style."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    name: str | None = None
    tool_call_id: str | None = None


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @field_validator("parameters")
    @classmethod
    def _parameters_is_object_schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v.get("type", "object") != "object":
            raise ValueError("tool parameters must be a JSON schema of type 'object'")
        props = v.get("properties", {})
        if not isinstance(props, dict):
            raise ValueError("tool parameters 'properties' must be an object")
        return v


class ToolSpec(BaseModel):
    """An OpenAI-style tool schema: {"type": "function", "function": {...}}."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: ToolFunction


class ChatArgs(BaseModel):
    """Arguments of `llm.chat` (and of `llm.json` / `llm.tools`, which fix the output mode).

    `max_tokens` bounds the completion; the core rejects a value that cannot
    fit in the model's context together with the prompt.
    """

    model_config = ConfigDict(extra="forbid")
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(default=128, ge=1, le=32768)
    stop: list[str] = Field(default_factory=list, max_length=8)
    seed: int = 0
    stream: bool = False
    # Generate exactly max_tokens: end-of-text and stop sequences do not end the completion.
    # A benchmarking knob (fixed-length workloads), like llama.cpp server's ignore_eos.
    ignore_eos: bool = False
    # Output modes. `json_schema` constrains the completion to JSON valid for the schema;
    # `tools` lets the model answer with tool calls instead of text.
    json_schema: dict[str, Any] | None = None
    tools: list[ToolSpec] | None = None

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop sequences must be non-empty strings")
        return v


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: prompt tokens whose KV came from the prefix cache instead of being computed
    #: (part of prompt_tokens; OpenAI reports it as prompt_tokens_details.cached_tokens)
    cached_prompt_tokens: int = 0


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: dict[str, Any]  # {"name": str, "arguments": str (JSON text)}


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatResult(BaseModel):
    """What an `llm` syscall returns to the agent."""

    message: ChatMessage
    tool_calls: list[ToolCall] = Field(default_factory=list)
    parsed: Any = None  # the decoded JSON for llm.json
    finish_reason: FinishReason
    usage: Usage
    model: str


class Generation(abc.ABC):
    """One in-progress completion. Backends subclass it with whatever they need.

    After `Backend.suspend(gen)` returns, everything needed to continue lives
    in this object (plain Python data and bytes), so the core can hold it or
    pickle it to disk and resume it later on the same backend instance.
    """

    args: ChatArgs
    text: str  # completion text produced so far
    usage: Usage
    finish_reason: FinishReason | None  # set when done

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @abc.abstractmethod
    def snapshot_bytes(self) -> int:
        """Approximate RAM this generation holds while suspended (for the context budget)."""


class BackendError(Exception):
    """A request the backend cannot serve; `code` is a protocol error code name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Backend(abc.ABC):
    """One LLM instance.

    The core runs up to `max_concurrency` requests at once, each on its own
    thread, and each thread drives its own generation.  A backend that keeps
    the default of 1 is only ever called from one thread at a time; one that
    announces more must accept concurrent calls for different generations.
    """

    #: names a request may use in `ChatArgs.model` to reach this backend
    models: list[str]
    #: cumulative seconds spent saving and restoring generation state (context switches)
    switch_seconds: float = 0.0
    #: generations this backend serves at once (the core's capacity)
    max_concurrency: int = 1
    #: RAM the backend keeps for reusable context (a prefix cache), carved out of the
    #: context store's RAM budget by the core
    prefix_cache_budget_bytes: int = 0

    @abc.abstractmethod
    def start(self, args: ChatArgs) -> Generation:
        """Validate against this model (context size, schema) and create a generation.

        Raises BackendError("INVALID_ARGUMENT", ...) for requests the model cannot serve.
        """

    @abc.abstractmethod
    def advance(self, gen: Generation, max_tokens: int | None, on_text: Callable[[str], None]) -> None:
        """Generate up to `max_tokens` more tokens (None: until done), calling `on_text`
        with each new piece of completion text. Sets `gen.finish_reason` when done.
        Resumes `gen` transparently if it was suspended."""

    @abc.abstractmethod
    def suspend(self, gen: Generation) -> None:
        """Move `gen`'s live state (e.g. KV cache) into `gen` so another generation can run."""

    @abc.abstractmethod
    def finish(self, gen: Generation) -> ChatResult:
        """Build the result of a done generation (parses JSON / tool calls) and release it."""

    def drop(self, gen: Generation) -> None:
        """Forget a generation that will never be resumed (failed, cancelled)."""

    def stats(self) -> dict[str, Any]:
        """Backend figures for the core's `info` op (batching, caches); empty by default."""
        return {}

    def close(self) -> None:
        """Release the model."""
