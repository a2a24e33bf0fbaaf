"""Kernel configuration: one TOML file validated by pydantic.

Every field has a default, so `Config()` (no file at all) runs the kernel with
the embedded llama.cpp core serving Gemma 3 270M, FIFO scheduling and ipc
transport. The supervisor writes the resolved configuration into the run
directory as JSON, and every child process reads it from there, so all
processes of one kernel agree on one configuration.
"""
from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAME_PATTERN = r"^[a-z][a-z0-9_\-]{0,30}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KernelConfig(_Strict):
    """Transport, liveness and limits shared by every process."""

    transport: Literal["ipc", "tcp"] = "ipc"
    host: str = "127.0.0.1"
    curve: bool = Field(default=True, description="tcp only: encrypt with CurveZMQ (server key in the run directory)")
    frontend_port: int = Field(default=5710, ge=1, le=65535)
    backend_port: int = Field(default=5711, ge=1, le=65535)
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    heartbeat_liveness: int = Field(default=3, ge=2)
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_queue: int = Field(default=100_000, ge=1)
    high_water_mark: int = Field(default=100_000, ge=100)
    reply_cache: int = Field(default=4096, ge=0, description="completed replies kept to answer retried request ids")


class SchedulerConfig(_Strict):
    policy: str = "fifo"
    time_slice_tokens: int = Field(default=32, ge=1)
    weights: dict[str, float] = Field(default_factory=dict, description="per-agent weights for fair-share policies")


class SupervisorConfig(_Strict):
    start_timeout_s: float = Field(default=120.0, gt=0)
    stop_timeout_s: float = Field(default=5.0, gt=0)
    backoff_initial_s: float = Field(default=0.25, ge=0)
    backoff_max_s: float = Field(default=8.0, ge=0)
    fast_crash_s: float = Field(default=5.0, ge=0, description="a process that dies sooner than this counts as a fast crash")
    max_fast_crashes: int = Field(default=5, ge=1, description="consecutive fast crashes before the process is FATAL")


class ContextConfig(_Strict):
    """Where preempted generations live while they wait for their next slice."""

    ram_budget_mb: float = Field(default=256.0, ge=0)
    disk_budget_mb: float = Field(default=4096.0, ge=0)


class LLMCoreConfig(_Strict):
    """One LLM instance = one core process."""

    name: str = Field(default="llm-0", pattern=NAME_PATTERN)
    backend: Literal["llamacpp", "openai", "ollama", "sim"] = "llamacpp"
    model: str | None = Field(default=None, description="model name requests use; llamacpp default: gemma3-270m")
    model_path: str | None = Field(default=None, description="GGUF file for llamacpp; default: the packaged Gemma 3 270M")
    n_ctx: int = Field(default=2048, ge=128)
    n_threads: int | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    mode: Literal["chat", "completion"] = "chat"
    sim_seconds_per_token: float = Field(default=0.01, ge=0, description="sim backend only (labelled simulation)")
    default: bool = Field(default=False, description="serve requests that name no model")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="extra keyword arguments for the backend (e.g. openai extra_body)")

    @model_validator(mode="after")
    def _remote_needs_url(self) -> "LLMCoreConfig":
        if self.backend == "openai" and not self.base_url:
            raise ValueError(f"llm core {self.name!r}: backend 'openai' needs base_url")
        if self.backend in ("openai", "ollama") and not self.model:
            raise ValueError(f"llm core {self.name!r}: backend {self.backend!r} needs model")
        return self


class ManagerConfig(_Strict):
    """A manager process built from a Manager subclass named by import path."""

    name: str = Field(pattern=NAME_PATTERN)
    target: str = Field(description="'package.module:ClassName' of a aios.managers.base.Manager subclass")
    capacity: int | None = Field(default=None, ge=1)
    service: str | None = Field(default=None, description="filled in by the supervisor from the class")
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("target")
    @classmethod
    def _target_shape(cls, v: str) -> str:
        if v.count(":") != 1:
            raise ValueError("target must look like 'package.module:ClassName'")
        return v


class Config(_Strict):
    kernel: KernelConfig = Field(default_factory=KernelConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)
    context: ContextConfig = Field(default_factory=ContextConfig)
    llm: list[LLMCoreConfig] = Field(default_factory=lambda: [LLMCoreConfig()])
    managers: list[ManagerConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> "Config":
        names = [c.name for c in self.llm] + [m.name for m in self.managers]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"process names must be unique; repeated: {sorted(dupes)}")
        if "scheduler" in names:
            raise ValueError("'scheduler' is reserved for the scheduler process")
        return self

    def manager_names(self) -> list[str]:
        """Every manager process, in start order."""
        return [c.name for c in self.llm] + [m.name for m in self.managers]

    def llm_core(self, name: str) -> LLMCoreConfig | None:
        return next((c for c in self.llm if c.name == name), None)

    def manager(self, name: str) -> ManagerConfig | None:
        return next((m for m in self.managers if m.name == name), None)


class ConfigError(Exception):
    """A configuration file that cannot be used; the message says where and why."""


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a TOML config (or defaults), apply dotted overrides like {"scheduler.policy": "rr"}."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        where = f"{path}" if path else "configuration"
        raise ConfigError(f"{where}: {exc}") from None


def config_to_json(config: Config) -> str:
    return config.model_dump_json(indent=2)


def config_from_json(text: str) -> Config:
    return Config.model_validate(json.loads(text))


def dump_toml(data: Mapping[str, Any]) -> str:
    """Write a configuration mapping as TOML (the inverse of `load_config`'s parsing): tables,
    arrays of tables, scalars, lists and inline maps. Benchmarks and tests build configs with it."""
    lines: list[str] = []
    _toml_table(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _toml_table(data: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    tables, arrays = [], []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in tables:
        lines.append("")
        lines.append(f"[{'.'.join(_toml_key(k) for k in path + [key])}]")
        _toml_table(value, path + [key], lines)
    for key, items in arrays:
        for item in items:
            lines.append("")
            lines.append(f"[[{'.'.join(_toml_key(k) for k in path + [key])}]]")
            _toml_table(item, path + [key], lines)


def _toml_key(key: str) -> str:
    key = str(key)
    if key and all(c.isalnum() or c in "_-" for c in key):
        return key
    return _toml_string(key)


def _toml_string(s: str) -> str:
    escaped = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"cannot write {value!r} as TOML")
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        raise ValueError("TOML has no null; leave the key out instead")
    raise ValueError(f"cannot write {type(value).__name__} as TOML")
