"""Settings of one LLM core: one `[[llm]]` entry of the configuration, and `LLMCore.Options`.

Kept in a module of its own with no heavy imports, because the configuration
loader reads it (the `[[llm]]` table is the user-facing spelling of an LLM
core manager) and must not pull in llama.cpp or the HTTP clients.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[a-z][a-z0-9_\-]{0,30}$"


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
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="extra keyword arguments for the backend (e.g. openai extra_body)")

    @field_validator("model_path")
    @classmethod
    def _model_file_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_file():
            raise ValueError(f"model file {v!r} does not exist")
        return v

    @model_validator(mode="after")
    def _remote_needs_url(self) -> "LLMCoreConfig":
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. \"http://127.0.0.1:8000/v1\")")
        if self.backend in ("openai", "ollama") and not self.model:
            raise ValueError(f"backend {self.backend!r} needs model (the name the server knows the model by)")
        return self
