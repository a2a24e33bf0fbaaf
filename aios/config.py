"""Kernel configuration: one TOML file validated by pydantic.

Every field has a default, so `Config()` (no file at all) runs the kernel with
the embedded llama.cpp core serving Gemma 3 270M, the built-in managers, FIFO
scheduling and ipc transport. The supervisor writes the resolved configuration
into the run directory as JSON, and every child process reads it from there,
so all processes of one kernel agree on one configuration.

Managers, one path for all. Every manager process is described by a
`ManagerSpec` (name, Manager class, options, the place in the file it came
from), built by `Config.manager_specs()` from three spellings:
- `[[llm]]` entries: LLM cores (`aios.managers.llm.core:LLMCore`), options = the entry;
- built-in tables (`BUILTIN_MANAGERS`: `[memory]`, `[storage]`, ...), on by
  default, `enabled = false` turns one off, the other keys are its options;
- `[[managers]]` entries: any Manager subclass by import path.
Each class's `Options` model validates its options at start
(`aios.managers.runner.resolve_managers`), and errors name the place. Rules
that span managers ("memory keeps its entries in storage", "the prefix cache
fits the context budget", which LLM core serves requests naming no model) are
the manager classes' own hooks (`Manager.check_kernel`, `Manager.complete_options`),
run there too, not code here.

Each component declares its options in a leaf module: `[scheduler]` in
`aios.scheduler.options`, `[[llm]]` and `[context]` in `aios.managers.llm.options`.
Adding a built-in manager that is on by default is one module plus one entry
in `BUILTIN_MANAGERS`.

Errors are reported one short line per problem with the TOML location and a
"did you mean" for misspelled keys (`format_errors`), never as a raw dump.
"""
from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aios.managers.llm.options import NAME_PATTERN, ContextConfig, LLMCoreConfig
from aios.scheduler.options import SchedulerConfig

__all__ = ["Config", "ConfigError", "ContextConfig", "LLMCoreConfig", "ManagerSpec", "SchedulerConfig", "load_config",
           "dump_toml", "BUILTIN_MANAGERS"]

LLM_CORE_TARGET = "aios.managers.llm.core:LLMCore"

#: built-in managers: config table -> Manager class. Each runs as a process named after its
#: table, on by default; `[table] enabled = false` turns it off; other keys are its Options.
#: a table that turns every built-in manager off (a kernel of just the scheduler and what you name)
NO_BUILTINS: dict[str, dict[str, bool]] = {}  # filled below

BUILTIN_MANAGERS: dict[str, str] = {
    "storage": "aios.managers.storage.manager:StorageManager",
    "memory": "aios.managers.memory.manager:MemoryManager",
    "tools": "aios.managers.tools.manager:ToolManager",
}
NO_BUILTINS.update({name: {"enabled": False} for name in BUILTIN_MANAGERS})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KernelConfig(_Strict):
    """Transport, liveness and limits shared by every process."""

    transport: Literal["ipc", "tcp"] = "ipc"
    host: str = "127.0.0.1"
    curve: bool = Field(default=True, description="tcp only: encrypt with CurveZMQ (server key in the run directory)")
    frontend_port: int = Field(default=5710, ge=1, le=65535)
    backend_port: int = Field(default=5711, ge=1, le=65535)
    heartbeat_interval_s: float = Field(default=1.0, gt=0, le=60)
    heartbeat_liveness: int = Field(default=3, ge=2)
    max_message_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_queue: int = Field(default=100_000, ge=1, description="queued requests per service")
    high_water_mark: int = Field(default=100_000, ge=100)
    reply_cache: int = Field(default=4096, ge=0, description="completed replies kept to answer retried request ids")
    reply_cache_mb: float = Field(default=64.0, ge=0, description="bytes those cached replies may hold")

    @model_validator(mode="after")
    def _distinct_ports(self) -> "KernelConfig":
        if self.transport == "tcp" and self.frontend_port == self.backend_port:
            raise ValueError(f"frontend_port and backend_port are both {self.frontend_port}; "
                             "the agent and manager sockets need a port each")
        return self


class SupervisorConfig(_Strict):
    start_timeout_s: float = Field(default=120.0, gt=0)
    stop_timeout_s: float = Field(default=5.0, gt=0)
    backoff_initial_s: float = Field(default=0.25, ge=0)
    backoff_max_s: float = Field(default=8.0, ge=0)
    fast_crash_s: float = Field(default=5.0, ge=0, description="a process that dies sooner than this counts as a fast crash")
    max_fast_crashes: int = Field(default=5, ge=1, description="consecutive fast crashes before the process is FATAL")
    on_scheduler_fatal: Literal["stop", "restart"] = Field(
        default="stop", description="when the scheduler crashes too often too fast: 'stop' the whole kernel (it "
                                    "cannot answer anything), or keep 'restart'ing it with backoff up to 30 s")


class ManagerConfig(_Strict):
    """A manager process built from a Manager subclass named by import path."""

    name: str = Field(pattern=NAME_PATTERN)
    target: str = Field(description="'package.module:ClassName' of a aios.managers.base.Manager subclass")
    path: str | None = Field(default=None, description="a directory put on the import path for this manager, "
                                                        "where its target's module lives (relative: to the "
                                                        "current directory); default: the current directory "
                                                        "and the installed packages")
    capacity: int | None = Field(default=None, ge=1)
    memory_limit_mb: int | None = Field(default=None, ge=16, description="kill and restart above this RSS")
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("target")
    @classmethod
    def _target_shape(cls, v: str) -> str:
        if v.count(":") != 1:
            raise ValueError("target must look like 'package.module:ClassName'")
        return v

    @field_validator("path")
    @classmethod
    def _path_is_a_directory(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_dir():
            where = "" if Path(v).expanduser().is_absolute() else f" (relative to the current directory, {Path.cwd()})"
            raise ValueError(f"{v!r} is not a directory{where}")
        return v


@dataclass(frozen=True)
class ManagerSpec:
    """One manager process as the configuration describes it (before its class is imported)."""

    name: str
    target: str
    options: dict[str, Any]
    capacity: int | None
    where: str  # the place in the configuration, for error messages
    memory_limit_mb: int | None = None
    path: str | None = None  # a directory the target is imported from (`[[managers]] path`)


class Config(_Strict):
    kernel: KernelConfig = Field(default_factory=KernelConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)
    context: ContextConfig = Field(default_factory=ContextConfig)
    llm: list[LLMCoreConfig] = Field(default_factory=lambda: [LLMCoreConfig()])
    managers: list[ManagerConfig] = Field(default_factory=list)
    #: the built-in managers' tables, by name (filled from top-level tables named in BUILTIN_MANAGERS)
    builtin: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _collect_builtin_tables(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            tables = dict(data.get("builtin") or {})
            for name in BUILTIN_MANAGERS:
                if name in data:
                    table = data.pop(name)
                    if not isinstance(table, dict):
                        raise ValueError(f"[{name}] must be a table")
                    tables[name] = table
            if tables:
                data["builtin"] = tables
        return data

    @model_validator(mode="after")
    def _check(self) -> "Config":
        for name, table in self.builtin.items():
            if name not in BUILTIN_MANAGERS:
                raise ValueError(f"[{name}] is not a built-in manager; built-in: {sorted(BUILTIN_MANAGERS)}")
            enabled = table.get("enabled", True)
            if not isinstance(enabled, bool):
                raise ValueError(f"[{name}] enabled must be true or false")
            for key in ("capacity", "memory_limit_mb"):
                value = table.get(key)
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                    raise ValueError(f"[{name}] {key} must be a positive integer")
        names = [s.name for s in self.manager_specs()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"process names must be unique; repeated: {dupes}")
        if "scheduler" in names:
            raise ValueError("'scheduler' is reserved for the scheduler process")
        return self

    def builtin_enabled(self, name: str) -> bool:
        """Whether the built-in manager `name` runs (its table does not say `enabled = false`)."""
        return bool(self.builtin.get(name, {}).get("enabled", True))

    def manager_specs(self) -> list[ManagerSpec]:
        """Every manager process, in start order: LLM cores, built-in managers, then [[managers]]."""
        specs = [ManagerSpec(c.name, LLM_CORE_TARGET, c.model_dump(), None, f'[[llm]] #{i + 1} (name "{c.name}")',
                             c.memory_limit_mb)
                 for i, c in enumerate(self.llm)]
        for name, target in BUILTIN_MANAGERS.items():
            table = self.builtin.get(name, {})
            if self.builtin_enabled(name):
                options = {k: v for k, v in table.items() if k not in ("enabled", "capacity", "memory_limit_mb")}
                specs.append(ManagerSpec(name, target, options, table.get("capacity"), f"[{name}]",
                                         table.get("memory_limit_mb")))
        specs += [ManagerSpec(m.name, m.target, dict(m.options), m.capacity,
                              f'[[managers]] #{i + 1} (name "{m.name}")', m.memory_limit_mb, m.path)
                  for i, m in enumerate(self.managers)]
        return specs

    def manager_spec(self, name: str) -> ManagerSpec | None:
        return next((s for s in self.manager_specs() if s.name == name), None)

    def manager_names(self) -> list[str]:
        return [s.name for s in self.manager_specs()]


class ConfigError(Exception):
    """A configuration that cannot be used; the message has one line per problem, each naming its place."""


# ------------------------------------------------------------------ error messages
_SECTIONS_OF_ARRAYS = {"llm": "[[llm]]", "managers": "[[managers]]"}


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of `loc` (for "did you mean")."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def describe_location(loc: tuple[Any, ...], data: Mapping[str, Any] | None = None) -> str:
    """('llm', 0, 'modle') -> '[[llm]] #1 (name "gpt"), key "modle"'."""
    parts: list[str] = []
    i = 0
    if loc and loc[0] in _SECTIONS_OF_ARRAYS and len(loc) > 1 and isinstance(loc[1], int):
        idx = loc[1]
        label = f"{_SECTIONS_OF_ARRAYS[loc[0]]} #{idx + 1}"
        entries = (data or {}).get(loc[0])
        if isinstance(entries, list) and idx < len(entries) and isinstance(entries[idx], dict) \
                and isinstance(entries[idx].get("name"), str):
            label += f' (name "{entries[idx]["name"]}")'
        parts.append(label)
        i = 2
    elif loc and loc[0] == "builtin" and len(loc) > 1:
        parts.append(f"[{loc[1]}]")
        i = 2
    elif loc and isinstance(loc[0], str) and loc[0] in Config.model_fields:
        parts.append(f"[{loc[0]}]")
        i = 1
    rest = [str(p) for p in loc[i:]]
    if rest:
        parts.append(f'key "{".".join(rest)}"')
    return ", ".join(parts) if parts else "top level"


def edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: insertions, deletions, substitutions, transpositions."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[len(b)]


def closest(word: str, candidates: list[str]) -> str | None:
    """The candidate a typo most likely meant (at most a third of its letters off), or None."""
    scored = sorted((edit_distance(word.lower(), c.lower()), abs(len(c) - len(word)), c) for c in candidates)
    if scored and scored[0][0] <= max(1, len(word) // 3):
        return scored[0][2]
    return None


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    model = _model_at(loc)
    candidates = list(model.model_fields) if model is not None else []
    if model is Config:
        candidates = [c for c in candidates if c != "builtin"] + list(BUILTIN_MANAGERS)
    guess = closest(str(loc[-1]), candidates)
    if guess:
        return f'; did you mean "{guess}"?'
    return f"; known keys: {', '.join(sorted(candidates))}" if candidates else ""


def format_errors(exc: ValidationError, data: Mapping[str, Any] | None = None, prefix: str = "") -> list[str]:
    """One short line per problem: where (TOML location), what is wrong, and a hint."""
    lines: list[str] = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        kind = err.get("type", "")
        msg = str(err.get("msg", "invalid"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        where = describe_location(loc, data)
        if kind == "extra_forbidden" and len(loc) == 1 and isinstance(err.get("input"), dict):
            where, msg = f"[{loc[0]}]", "unknown table" + _did_you_mean(loc)
        elif kind == "extra_forbidden":
            msg = "unknown key" + _did_you_mean(loc)
        elif kind in ("list_type",) and len(loc) == 1 and loc[0] in _SECTIONS_OF_ARRAYS:
            name = loc[0]
            msg = (f"`{name}` must be a list of tables: write [[{name}]] (double brackets) for each entry, "
                   f"not [{name}]")
            where = f"[{name}]"
        elif kind == "missing":
            msg = "required key is missing"
        lines.append(f"{prefix}{where}: {msg}")
    return lines


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a TOML config (or defaults), apply dotted overrides like {"scheduler.policy": "rr"}."""
    data: dict[str, Any] = {}
    where = str(path) if path is not None else "configuration"
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except IsADirectoryError:
            raise ConfigError(f"config path is a directory, not a file: {p}") from None
        except PermissionError:
            raise ConfigError(f"config file cannot be read (permission denied): {p}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a text file (not UTF-8)") from None
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
        lines = format_errors(exc, data)
        raise ConfigError(f"{where}: " + ("\n  " if len(lines) > 1 else "") + "\n  ".join(lines)) from None


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
