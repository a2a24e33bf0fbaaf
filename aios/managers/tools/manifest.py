"""A tool's manifest: `tool.toml` (or `tool.json`) in the tool's folder.

    name = "calculator"                     # must equal the folder name
    description = "Evaluate arithmetic ..."  # what the model reads
    entry = "tool:run"                      # <module file in the folder>:<function>
    limit = 2                               # calls of this tool in flight at once (the scheduler enforces it)
    timeout_s = 5
    memory_mb = 64                          # RLIMIT_AS of the worker process
    idempotent = true                       # safe to repeat (re-queued if the manager dies mid-call)

    [parameters]                            # JSON schema of the arguments, type "object"
    type = "object"
    required = ["expression"]
    properties.expression = { type = "string", maxLength = 1000 }

Validated here with pydantic and jsonschema, so a malformed manifest is a
problem reported at start with its path and reason, never a crash, and never
a reason for the other tools not to load.
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

#: Tool names are OpenAI function names too (^[a-zA-Z0-9_-]{1,64}$); "__" is kept for MCP
#: tools ("<server>__<tool>"), so a local name cannot collide with a mounted one.
TOOL_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,47}$"
ENTRY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
MANIFEST_FILES = ("tool.toml", "tool.json")

#: Default concurrency per tool. 1 would serialise every agent behind one slow call of a tool
#: that mostly waits (a fetch, a storage call); unbounded would let one tool start a worker per
#: request and take the machine (each worker may use memory_mb). 2 lets a second call overlap
#: the first on these 2-core machines while bounding a tool's footprint to 2 x memory_mb.
DEFAULT_LIMIT = 2
#: Measured: a worker needs 18 MB of address space for its own imports (26 MB with
#: socket/ssl/urllib); below 32 MB a tool would fail before running any of its code.
MIN_MEMORY_MB = 32


class ToolManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str = Field(min_length=1, max_length=4000)
    parameters: dict[str, Any] = Field(description="JSON schema (type object) of the arguments")
    entry: str = Field(default="tool:run", pattern=ENTRY_PATTERN)
    kind: Literal["subprocess", "builtin"] = Field(
        default="subprocess",
        description="builtin: runs inside the tool manager (tools that call kernel services, like files); "
                    "only allowed for tools shipped with AIOS")
    limit: int = Field(default=DEFAULT_LIMIT, ge=1, le=256)
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    memory_mb: int = Field(default=256, ge=MIN_MEMORY_MB, le=1 << 20)
    idempotent: bool = False
    network: bool = Field(default=False, description="the worker keeps the host network (no network namespace)")
    reuse: bool = Field(default=True, description="keep a warm worker per agent between calls")
    requires_setting: str | None = Field(
        default=None, description="a key of this tool's settings that must be non-empty for the tool to be enabled")

    @field_validator("name")
    @classmethod
    def _no_double_underscore(cls, v: str) -> str:
        if "__" in v:
            raise ValueError("'__' is reserved for MCP tools (<server>__<tool>)")
        return v

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        check_parameters_schema(v)
        return v


def check_parameters_schema(schema: Any) -> None:
    """A tool's argument schema must be a valid JSON schema describing an object."""
    if not isinstance(schema, dict):
        raise ValueError("parameters must be a JSON schema object")
    if schema.get("type") != "object":
        raise ValueError(f"parameters must have type 'object' (got {schema.get('type')!r})")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise ValueError(f"parameters is not a valid JSON schema at {where}: {exc.message}") from None


class ManifestError(Exception):
    """A manifest that cannot be used; the message names the file and the reason."""


def find_manifest(folder: Path) -> Path | None:
    for name in MANIFEST_FILES:
        path = folder / name
        if path.is_file():
            return path
    return None


def load_manifest(path: Path) -> ToolManifest:
    """Parse and validate one manifest file; ManifestError says why it cannot be used."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ManifestError(f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"not valid {path.suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError("the manifest must be a table/object")
    try:
        manifest = ToolManifest.model_validate(data)
    except ValidationError as exc:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ())) or "(manifest)"
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{where}: {msg}")
        raise ManifestError("; ".join(parts)) from None
    if manifest.name != path.parent.name:
        raise ManifestError(f"name {manifest.name!r} must equal the folder name {path.parent.name!r}")
    module = manifest.entry.partition(":")[0]
    code = path.parent.joinpath(*module.split(".")).with_suffix(".py")
    if not code.is_file():
        raise ManifestError(f"entry {manifest.entry!r}: no file {code.name} in {path.parent}")
    return manifest
