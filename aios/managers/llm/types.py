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
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator


#: the largest value a JSON schema may give a length or count bound (maxLength, maxItems, ...).
#: Measured: llama.cpp's schema-to-grammar converter expands {"maxLength": N} into N nested rules,
#: and N = 1e9 grew a core to 9.7 GB before it was killed; no completion is that long anyway.
MAX_SCHEMA_BOUND = 4096
#: the largest JSON schema (serialized) a request may carry
MAX_SCHEMA_BYTES = 32 * 1024
_BOUND_KEYWORDS = ("maxLength", "minLength", "maxItems", "minItems", "maxProperties", "minProperties",
                   "maxContains", "minContains")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: dict[str, Any]  # {"name": str, "arguments": str (JSON text)}


class ChatMessage(BaseModel):
    """One chat message, OpenAI style: content as text or a list of text parts; an assistant
    message may carry `tool_calls`, a tool message names the call it answers (`tool_call_id`)."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        """OpenAI's content forms: a string, null (an assistant turn with only tool calls), or a list
        of parts, of which only text parts ({"type": "text", "text": ...}) carry meaning for a text model."""
        if v is None:
            return ""
        if isinstance(v, list):
            texts = []
            for i, part in enumerate(v):
                if isinstance(part, str):
                    texts.append(part)
                elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                else:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"content part {i} is {kind!r}; only text parts are supported")
            return "".join(texts)
        return v


def check_json_schema(schema: Any, where: str = "json_schema") -> None:
    """A JSON schema a request may carry: valid, small, and with bounded lengths and counts, so that
    no request can cost more to prepare (grammar, memory) than any answer could use."""
    import json as _json

    import jsonschema  # a declared dependency: messages a person can act on

    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be a JSON object")
    size = len(_json.dumps(schema, separators=(",", ":")))
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"{where} is {size} bytes; at most {MAX_SCHEMA_BYTES} are accepted")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"{where} is not a valid JSON schema: {exc.message}") from None

    def walk(node: Any, path: str, depth: int) -> None:
        if depth > 32:
            raise ValueError(f"{where} nests deeper than 32 levels")
        if isinstance(node, dict):
            for key in _BOUND_KEYWORDS:
                bound = node.get(key)
                if isinstance(bound, (int, float)) and bound > MAX_SCHEMA_BOUND:
                    raise ValueError(f"{where}{path}: {key} = {bound} is larger than {MAX_SCHEMA_BOUND}, "
                                     "the most any request may ask for")
            for k, child in node.items():
                walk(child, f"{path}.{k}", depth + 1)
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{path}[{i}]", depth + 1)

    walk(schema, "", 0)


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
        check_json_schema(v, "parameters")
        return v


class ToolSpec(BaseModel):
    """An OpenAI-style tool schema: {"type": "function", "function": {...}}."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: ToolFunction


#: a registered tool named instead of described (letters, digits, _ and -, as OpenAI function names)
ToolName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]

#: sampling options and their neutral values; a backend maps each one it supports and the core
#: refuses a request that sets one the backend cannot honour (see Backend.sampling)
SAMPLING_DEFAULTS: dict[str, Any] = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0,
                                     "frequency_penalty": 0.0, "presence_penalty": 0.0}


class ChatArgs(BaseModel):
    """Arguments of `llm.chat` (and of `llm.json` / `llm.tools`, which fix the output mode).

    `max_tokens` bounds the completion; the core rejects a value that cannot
    fit in the model's context together with the prompt. Sampling options
    follow OpenAI's and llama.cpp's meaning; at their defaults they change
    nothing. Every check here runs for every backend.
    """

    model_config = ConfigDict(extra="forbid")
    messages: list[ChatMessage] = Field(min_length=1, max_length=4096)
    model: str | None = None
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(default=128, ge=1, le=32768)
    stop: list[str] = Field(default_factory=list, max_length=8)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling: the smallest set of "
                                                                   "tokens whose probability adds up to top_p")
    top_k: int = Field(default=0, ge=0, le=100_000, description="only the k most likely tokens (0: all)")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, description="drop tokens less likely than min_p x the best")
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0, description="llama.cpp's repetition penalty "
                                                                            "(1.0: off)")
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    # Generate exactly max_tokens: end-of-text and stop sequences do not end the completion.
    # A benchmarking knob (fixed-length workloads), like llama.cpp server's ignore_eos.
    ignore_eos: bool = False
    # Output modes. `json_schema` constrains the completion to JSON valid for the schema;
    # `tools` lets the model answer with tool calls instead of text.
    json_schema: dict[str, Any] | None = None
    # OpenAI-style tool schemas, or the names of tools registered with the kernel's tool manager
    # (the LLM core asks it for their schemas: `tools = ["calculator", "weather"]`)
    tools: list[ToolSpec | ToolName] | None = Field(default=None, max_length=128)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_string_or_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @field_validator("json_schema")
    @classmethod
    def _bounded_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            check_json_schema(v)
        return v

    @model_validator(mode="after")
    def _one_output_mode(self) -> "ChatArgs":
        if self.json_schema is not None and self.tools:
            raise ValueError("json_schema and tools cannot be combined in one request")
        return self

    def tool_names(self) -> list[str]:
        """Tools named by registration rather than described (to be resolved by the LLM core)."""
        return [t for t in self.tools or [] if isinstance(t, str)]

    def sampling_set(self) -> set[str]:
        """The sampling options this request sets to something other than their neutral value."""
        return {k for k, neutral in SAMPLING_DEFAULTS.items() if getattr(self, k) != neutral}


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: prompt tokens whose KV came from the prefix cache instead of being computed
    #: (part of prompt_tokens; OpenAI reports it as prompt_tokens_details.cached_tokens)
    cached_prompt_tokens: int = 0


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
    #: the sampling options (SAMPLING_DEFAULTS' keys) this backend honours; the core refuses a
    #: request that sets any other, instead of silently ignoring it
    sampling: frozenset[str] = frozenset()
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

    #: whether `embed` works on this backend
    embeddings: bool = False

    def embed(self, texts: list[str]) -> list[list[float]]:
        """One embedding vector per text (for search by meaning). Backends that cannot say so."""
        raise BackendError("INVALID_ARGUMENT", f"the {type(self).__name__} backend does not offer embeddings")

    def check(self) -> str | None:
        """Whether the backend can serve now: None if so, else why not in one line (a remote server
        that does not answer). Cheap; called at start and while the core reports itself degraded."""
        return None
