"""Settings of the LLM cores: one `[[llm]]` entry of the configuration (`LLMCore.Options`), and
the `[context]` table every core's context store is sized from.

Kept in a module of its own with no heavy imports, because the configuration
loader reads it (the `[[llm]]` table is the user-facing spelling of an LLM
core manager) and must not pull in llama.cpp or the HTTP clients.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[a-z][a-z0-9_\-]{0,30}$"

#: most generations one llama.cpp context decodes together (the KV cache grows linearly with it)
MAX_BATCH_LIMIT = 64
#: requests a remote core keeps open by default: a real server (vLLM, llama.cpp's server with
#: slots, Ollama with OLLAMA_NUM_PARALLEL) batches them; one at a time would waste it
DEFAULT_MAX_INFLIGHT = 32
#: `[[llm]]` keys that only the embedded llama.cpp backend understands
#: the first bytes of every GGUF file, the only model format llama.cpp loads
GGUF_MAGIC = b"GGUF"
LLAMACPP_KEYS = ("max_batch", "prefix_cache_mb", "prefill_chunk", "prefill_budget", "n_batch", "extra_buffer_types")


class ContextConfig(BaseModel):
    """`[context]`: where preempted generations live while they wait for their next slice (each
    core's context store; the llama.cpp prefix cache is part of the RAM budget)."""

    model_config = ConfigDict(extra="forbid")

    ram_budget_mb: float = Field(default=256.0, ge=0)
    disk_budget_mb: float = Field(default=4096.0, ge=0)


class LLMCoreConfig(BaseModel):
    """One LLM instance = one core process."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="llm-0", pattern=NAME_PATTERN)
    backend: Literal["llamacpp", "openai", "ollama", "sim"] = "llamacpp"
    model: str | None = Field(default=None, description="model name requests use; llamacpp default: gemma3-270m")
    model_path: str | None = Field(default=None, description="GGUF file for llamacpp; default: the packaged Gemma 3 270M")
    n_ctx: int = Field(default=2048, ge=128)
    n_threads: int | None = Field(default=None, ge=1)
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    mode: Literal["chat", "completion"] = "chat"
    sim_seconds_per_token: float = Field(default=0.01, ge=0, description="sim backend only (labelled simulation)")
    default: bool = Field(default=False, description="serve requests that name no model")
    memory_limit_mb: int | None = Field(default=None, ge=64,
                                        description="the supervisor kills (and restarts) the core above this "
                                                    "resident memory; default: sized from the model file")
    # ---- throughput (see the README's "LLM throughput"); None: the backend's measured default
    max_batch: int | None = Field(default=None, ge=1, le=MAX_BATCH_LIMIT,
                                  description="llamacpp: generations decoded together in one context (default 1, "
                                              "exact mode; 8 pays off with many concurrent agents)")
    prefix_cache_mb: float | None = Field(default=None, ge=0,
                                          description="llamacpp: RAM for cached prompt prefixes, part of [context] "
                                                      "ram_budget_mb (default 128, at most half of it; 0: off)")
    prefill_chunk: int | None = Field(default=None, ge=1, le=1 << 16,
                                      description="llamacpp: prompt tokens per prefill call (default 64)")
    prefill_budget: int | None = Field(default=None, ge=1, le=1 << 20,
                                       description="llamacpp: prompt tokens prefilled per step while others wait "
                                                   "(default 256)")
    n_batch: int | None = Field(default=None, ge=1, le=1 << 16, description="llamacpp: llama.cpp's n_batch (512)")
    extra_buffer_types: bool | None = Field(default=None,
                                            description="llamacpp: allow llama.cpp's extra CPU buffer types "
                                                        "(default: on unless the CPU has AMX)")
    max_inflight: int | None = Field(default=None, ge=1, le=1024,
                                     description="openai/ollama: requests open at once on the server (default "
                                                 f"{DEFAULT_MAX_INFLIGHT}); sim: simulated concurrency (default 1)")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="extra keyword arguments for the backend (e.g. openai extra_body)")

    @field_validator("model_path")
    @classmethod
    def _model_file_exists(cls, v: str | None) -> str | None:
        """A model file that is missing, unreadable or not GGUF is refused in one line here (at `aios
        config check` and start), not by llama.cpp's loader in the core's log after the kernel started."""
        if v is None:
            return v
        path = Path(v).expanduser()
        if not path.is_file():
            raise ValueError(f"model file {v!r} does not exist")
        try:
            with open(path, "rb") as f:
                magic = f.read(len(GGUF_MAGIC))
        except OSError as exc:
            raise ValueError(f"model file {v!r} cannot be read: {exc.strerror}") from None
        if magic != GGUF_MAGIC:
            raise ValueError(f"model file {v!r} is not a GGUF file (its first bytes are not \"GGUF\"); "
                             "the llamacpp backend loads GGUF models only")
        return v

    @model_validator(mode="after")
    def _keys_fit_the_backend(self) -> "LLMCoreConfig":
        for key in LLAMACPP_KEYS:
            if getattr(self, key) is not None and self.backend != "llamacpp":
                raise ValueError(f"{key} applies to the llamacpp backend only, not {self.backend!r}"
                                 + (" (a remote core's concurrency is max_inflight)" if key == "max_batch" else ""))
        if self.max_inflight is not None and self.backend == "llamacpp":
            raise ValueError("max_inflight applies to remote backends; the llamacpp backend's concurrency is max_batch")
        chunk, n_batch = self.prefill_chunk, self.n_batch or 512
        if chunk is not None and chunk > n_batch:
            raise ValueError(f"prefill_chunk = {chunk} exceeds n_batch = {n_batch} (one prefill call is one batch)")
        moved = sorted(set(self.options) & set(type(self).model_fields))
        if moved:
            raise ValueError(f"set {', '.join(moved)} in the [[llm]] entry itself, not in its options "
                             f"(write {moved[0]} = {self.options[moved[0]]!r} next to backend = ...)")
        return self

    def backend_kwargs(self) -> dict[str, Any]:
        """The typed throughput settings as the backend's keyword arguments: the llama.cpp keys the user
        set (the backend has measured defaults for the rest), a remote core's max_inflight (default 32)."""
        if self.backend == "llamacpp":
            return {k: getattr(self, k) for k in LLAMACPP_KEYS if getattr(self, k) is not None}
        if self.backend == "sim":
            return {"max_concurrency": self.max_inflight} if self.max_inflight is not None else {}
        return {"max_inflight": self.max_inflight if self.max_inflight is not None else DEFAULT_MAX_INFLIGHT}

    @model_validator(mode="after")
    def _remote_needs_url(self) -> "LLMCoreConfig":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. \"http://127.0.0.1:8000/v1\")")
        if self.backend in ("openai", "ollama") and not self.model:
            raise ValueError(f"backend {self.backend!r} needs model (the name the server knows the model by)")
        return self
