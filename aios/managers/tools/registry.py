"""Tool discovery, the public description of a tool, and argument validation.

Discovery reads manifests only (no tool code is imported here: code loads on
first use, in a worker or, for builtin tools, in the manager). Each folder of
each tool directory that holds a `tool.toml`/`tool.json` is one tool; a folder
whose manifest is malformed, or whose name repeats one already found, becomes a
`ToolProblem` with its path and reason, and the others load.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel

from aios.managers.base import OpError
from aios.managers.tools.manifest import ManifestError, ToolManifest, find_manifest, load_manifest
from aios.protocol import ErrorCode

log = logging.getLogger("aios.tools")

Kind = Literal["subprocess", "builtin", "mcp"]


@dataclass(frozen=True)
class ToolProblem:
    """A tool that did not load: where it is and why (reported at start and by `aios tools`)."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class RegisteredTool:
    """Everything the runtime knows about one callable tool (local or mounted from MCP)."""

    name: str
    description: str
    parameters: dict[str, Any]
    kind: Kind
    source: str
    limit: int
    timeout_s: float
    memory_mb: int | None
    idempotent: bool
    network: bool = False
    reuse: bool = True
    entry: str = "tool:run"
    folder: Path | None = None
    requires_setting: str | None = None
    mcp_server: str | None = None
    mcp_tool: str | None = None
    validator: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.validator is None:
            self.validator = jsonschema.Draft202012Validator(
                self.parameters, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)

    @classmethod
    def from_manifest(cls, manifest: ToolManifest, folder: Path, source: str) -> "RegisteredTool":
        return cls(name=manifest.name, description=manifest.description, parameters=manifest.parameters,
                   kind=manifest.kind, source=source, limit=manifest.limit, timeout_s=manifest.timeout_s,
                   memory_mb=manifest.memory_mb, idempotent=manifest.idempotent, network=manifest.network,
                   reuse=manifest.reuse, entry=manifest.entry, folder=folder,
                   requires_setting=manifest.requires_setting)

    def function_schema(self) -> dict[str, Any]:
        """The OpenAI-style function tool the LLM ops can offer to a model."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


class ToolInfo(BaseModel):
    """What `list` and `describe` answer about a tool."""

    name: str
    description: str
    kind: Kind
    source: str
    limit: int
    timeout_s: float
    memory_mb: int | None
    idempotent: bool
    network: bool
    enabled: bool
    disabled_reason: str | None = None
    isolation: str
    parameters: dict[str, Any]
    function: dict[str, Any]


def discover(dirs: list[tuple[Path, bool]]) -> tuple[dict[str, RegisteredTool], list[ToolProblem]]:
    """Find the tools in `dirs` ([(directory, may_hold_builtin_tools)], searched in order).

    The first tool of a name wins; a later one with the same name is a problem (not an
    override), so the tool an agent gets never depends on which directory was read last.
    """
    specs: dict[str, RegisteredTool] = {}
    problems: list[ToolProblem] = []
    for directory, trusted in dirs:
        if not directory.is_dir():
            problems.append(ToolProblem(str(directory), "tool directory does not exist"))
            continue
        for folder in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
            path = find_manifest(folder)
            if path is None:
                continue  # not a tool folder (e.g. __pycache__, data)
            try:
                manifest = load_manifest(path)
            except ManifestError as exc:
                problems.append(ToolProblem(str(path), str(exc)))
                continue
            if manifest.kind == "builtin" and not trusted:
                problems.append(ToolProblem(str(path), "kind 'builtin' runs inside the tool manager without "
                                                       "isolation and is only allowed for tools shipped with AIOS"))
                continue
            if manifest.name in specs:
                problems.append(ToolProblem(str(path), f"a tool named {manifest.name!r} was already loaded from "
                                                       f"{specs[manifest.name].source}; this one is ignored"))
                continue
            specs[manifest.name] = RegisteredTool.from_manifest(manifest, folder, str(folder))
    for p in problems:
        log.warning("tool not loaded: %s", p)
    return specs, problems


def format_path(path: Any) -> str:
    out = "arguments"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def validate_arguments(spec: RegisteredTool, args: Any) -> None:
    """Raise INVALID_ARGUMENT naming each bad field ("arguments.x: 'abc' is not of type 'number'")."""
    if not isinstance(args, dict):
        raise OpError(ErrorCode.INVALID_ARGUMENT,
                      f"tool {spec.name!r}: arguments must be an object, not {type(args).__name__}")
    errors = sorted(spec.validator.iter_errors(args), key=lambda e: (list(map(str, e.path)), e.message))
    if errors:
        shown = "; ".join(f"{format_path(e.path)}: {e.message}" for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise OpError(ErrorCode.INVALID_ARGUMENT, f"tool {spec.name!r}: {shown}{more}")
