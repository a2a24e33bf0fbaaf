"""The tool runtime: what the `tools` manager process calls.

    rt = ToolRuntime(["./tools"], ToolRuntimeOptions(hide_paths=[run_dir]))
    rt.problems                 # tools that did not load: [ToolProblem(path, reason)]
    rt.list()                   # [ToolInfo]
    rt.describe("calculator")   # ToolInfo with the JSON schema and the OpenAI function schema
    rt.functions()              # OpenAI-style tools of the enabled tools, for the LLM ops
    rt.limits()                 # {"calculator": 4, ...}: per-tool concurrency for the scheduler
    rt.call("calculator", {"expression": "2*(3+4)"}, agent="a1", timeout=5.0,
            call_fn=ctx.call, cancelled=ctx.cancelled)
    rt.close()

A call is validated against the tool's schema before anything runs (a bad call
never starts a worker), then runs isolated: subprocess tools in a confined
worker (isolation.py, sandbox.py, worker_pool.py), builtin tools in this process with `call_fn` to reach
kernel services, MCP tools in their server (mcp_source.py). Every failure is an
OpError with a code from aios.protocol.ErrorCode and a message that names the
tool, the field or the limit, and the setting that changes it.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from aios.managers.base import OpError
from aios.managers.tools import worker as wire
from aios.managers.tools.call_limits import detect_call_limits
from aios.managers.tools.isolation import Isolation, JailPlanner, detect_isolation
from aios.managers.tools.mcp_source import McpHub, McpServerConfig
from aios.managers.tools.registry import ToolInfo, ToolProblem, RegisteredTool, discover, validate_arguments
from aios.managers.tools.worker_pool import WorkerPool
from aios.protocol import ErrorCode

log = logging.getLogger("aios.tools")

#: Tools shipped with AIOS live inside the package (aios/tools/<name>/), so they are in every
#: installed wheel; the top-level tools/ folder of a checkout is where a user's own tools go.
SHIPPED_TOOLS_DIR = Path(__file__).resolve().parents[2] / "tools"

CallFn = Callable[..., Any]


class ToolRuntimeOptions(BaseModel):
    """The tools manager's options (the `options` table of its entry in the kernel config)."""

    model_config = ConfigDict(extra="forbid")

    dirs: list[str] = Field(default_factory=list, description="more tool directories, searched after the shipped tools")
    shipped: bool = Field(default=True, description="load the tools shipped with AIOS (aios/tools)")
    sandbox: Literal["auto", "require", "off"] = Field(
        default="auto", description="auto: the strongest isolation this machine allows, reported at start; "
                                    "require: refuse subprocess tools unless network, filesystem, pid and "
                                    "privilege isolation all hold; off: rlimits only")
    sandbox_strategy: Literal["auto", "root", "userns"] = Field(
        default="auto", description="root: namespaces then setuid nobody (needs root); userns: a user namespace "
                                    "then all capabilities dropped (works for normal users); auto: by the kernel's uid")
    hide_paths: list[str] = Field(default_factory=list,
                                  description="directories (or files) tools must never see: the run directory, "
                                              "data directories (the manager adds the run directory)")
    max_result_bytes: int = Field(
        default=1 << 20, ge=1024, le=64 << 20,
        description="largest result a tool may return. 1 MB: a result goes back in one syscall reply "
                    "(kernel.max_message_bytes is 16 MB) and usually into a model's context, where even "
                    "1 MB is hundreds of times a small model's window; bigger data belongs in storage")
    scratch_mb: int = Field(default=64, ge=1, le=1 << 16, description="size of a worker's private /tmp (tmpfs)")
    nproc: int = Field(default=256, ge=8, description="RLIMIT_NPROC of a sandboxed worker (processes per uid)")
    warm_workers: int = Field(default=16, ge=0, description="idle warm workers kept (each for one tool and one agent)")
    warm_idle_s: float = Field(default=60.0, gt=0, description="an idle warm worker is closed after this long")
    max_workers: int = Field(default=32, ge=1, description="worker processes at most, busy and idle, across tools "
                                                          "and agents; at the bound a call takes an idle worker's "
                                                          "place or waits for a busy one")
    settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-tool settings, e.g. {web_fetch = {allow = ['https://example.org']}}")
    mcp: list[McpServerConfig] = Field(default_factory=list, description="MCP servers whose tools are mounted")

    @field_validator("dirs")
    @classmethod
    def _dirs_exist(cls, dirs: list[str]) -> list[str]:
        """A directory that is not there is a mistake (a typo, the wrong working directory): refused at
        `aios config check` and start, rather than started without its tools and nothing said."""
        for d in dirs:
            path = Path(d).expanduser()
            if not path.is_dir():
                what = "is not a directory" if path.exists() else "does not exist"
                where = "" if path.is_absolute() else f" (relative to the current directory, {Path.cwd()})"
                raise ValueError(f"tool directory {d!r} {what}{where}")
        return dirs


class _BuiltinContext:
    """What a builtin tool's `run(args, ctx)` gets: `ctx.call(service, op, **args)` acts for the agent."""

    def __init__(self, name: str, tool_dir: Path, agent: str, settings: dict[str, Any], deadline: float,
                 call_fn: CallFn | None) -> None:
        self.name = name
        self.tool_dir = str(tool_dir)
        self.agent = agent
        self.settings = settings
        self.deadline = deadline
        self._call_fn = call_fn

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def call(self, service: str, op: str, **args: Any) -> Any:
        if self._call_fn is None:
            raise OpError(ErrorCode.UNAVAILABLE, f"tool {self.name!r} needs kernel services, and this runtime "
                                                 f"was called without call_fn")
        remaining = self.remaining()
        if remaining <= 0:
            raise OpError(ErrorCode.DEADLINE_EXCEEDED, f"tool {self.name!r} ran out of time")
        args.setdefault("timeout", remaining)
        return self._call_fn(service, op, **args)


class ToolRuntime:
    def __init__(self, dirs: Sequence[str | Path] = (), options: ToolRuntimeOptions | dict[str, Any] | None = None) -> None:
        self.options = options if isinstance(options, ToolRuntimeOptions) else ToolRuntimeOptions.model_validate(options or {})
        opts = self.options
        self.isolation: Isolation = detect_isolation(opts.sandbox, opts.hide_paths, opts.scratch_mb, opts.nproc,
                                                   opts.sandbox_strategy)
        (log.info if self.isolation.complete else log.warning)("%s", self.isolation.summary(opts.scratch_mb))
        search: list[tuple[Path, bool]] = [(SHIPPED_TOOLS_DIR, True)] if opts.shipped else []
        search += [(Path(d).expanduser().resolve(), False) for d in [*dirs, *opts.dirs]]
        self._specs, problems = discover(search)
        self.problems: list[ToolProblem] = list(problems)
        self._planner = JailPlanner(self.isolation, opts.hide_paths, opts.scratch_mb, opts.nproc)
        self.call_limits = detect_call_limits(opts.nproc)
        log.info("tool calls: %s", self.call_limits.summary())
        self._pool = WorkerPool(self._planner, opts.warm_workers, opts.warm_idle_s, opts.max_result_bytes,
                                opts.max_workers, self.call_limits)
        self._builtins: dict[str, Callable[..., Any]] = {}
        self._builtin_lock = threading.Lock()
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._slots_lock = threading.Lock()
        self._mcp: McpHub | None = None
        if opts.mcp:
            self._mcp = McpHub(opts.mcp, self._planner, opts.max_result_bytes)
            self._mcp.start(set(self._specs))
        log.info("tools: %d loaded (%s), %d problems", len(self._all_specs()), ", ".join(sorted(self._all_specs())),
                 len(self.all_problems()))

    # ------------------------------------------------------------ catalogue
    def _all_specs(self) -> dict[str, RegisteredTool]:
        if self._mcp is None:
            return self._specs
        return {**self._specs, **self._mcp.specs}

    def all_problems(self) -> list[ToolProblem]:
        return self.problems + (self._mcp.problems if self._mcp else [])

    def _disabled_reason(self, spec: RegisteredTool) -> str | None:
        key = spec.requires_setting
        if key and not self.options.settings.get(spec.name, {}).get(key):
            return (f"tool {spec.name!r} is off: its setting {key!r} is empty "
                    f"(set tools option settings.{spec.name}.{key})")
        if self.options.sandbox == "require" and spec.kind == "subprocess" and not self.isolation.complete:
            return (f"tool {spec.name!r} is refused: sandbox = 'require' but this machine gives only "
                    f"{self.isolation.summary(self.options.scratch_mb)}")
        return None

    def _info(self, spec: RegisteredTool) -> ToolInfo:
        reason = self._disabled_reason(spec)
        return ToolInfo(name=spec.name, description=spec.description, kind=spec.kind, source=spec.source,
                        limit=spec.limit, timeout_s=spec.timeout_s, memory_mb=spec.memory_mb,
                        idempotent=spec.idempotent, network=spec.network, enabled=reason is None,
                        disabled_reason=reason, isolation=self.isolation.for_tool(spec),
                        parameters=spec.parameters, function=spec.function_schema())

    def list(self) -> list[ToolInfo]:
        return [self._info(s) for _, s in sorted(self._all_specs().items())]

    def describe(self, name: str) -> ToolInfo:
        return self._info(self._lookup(name))

    def functions(self) -> list[dict[str, Any]]:
        """OpenAI-style function tools for every enabled tool (what an LLM op can offer a model)."""
        return [i.function for i in self.list() if i.enabled]

    def limits(self) -> dict[str, int]:
        return {name: spec.limit for name, spec in sorted(self._all_specs().items())}

    def _lookup(self, name: str) -> RegisteredTool:
        if not isinstance(name, str):
            raise OpError(ErrorCode.INVALID_ARGUMENT, "the tool name must be a string")
        spec = self._all_specs().get(name)
        if spec is None and self._mcp is not None and "__" in name:
            server = name.split("__", 1)[0]
            if self._mcp.mount_late(server, set(self._specs)):
                spec = self._all_specs().get(name)
        if spec is not None:
            return spec
        broken = [p for p in self.all_problems() if Path(p.path).parent.name == name or p.path == f"mcp:{name}"]
        if broken:
            raise OpError(ErrorCode.NOT_FOUND, f"tool {name!r} did not load: {broken[0].reason} ({broken[0].path})")
        raise OpError(ErrorCode.NOT_FOUND, f"no tool named {name!r}; tools: {sorted(self._all_specs())}")

    # ----------------------------------------------------------------- calls
    def call(self, name: str, args: Any, *, agent: str = "", timeout: float | None = None,
             call_fn: CallFn | None = None, cancelled: threading.Event | None = None) -> Any:
        """Validate, then run the tool isolated; return its result (JSON data) or raise OpError.

        timeout: the caller's remaining time (e.g. from the request deadline); the tool's own
        timeout_s applies when it is shorter. agent: whose call this is (warm workers are per agent).
        """
        spec = self._lookup(name)
        reason = self._disabled_reason(spec)
        if reason:
            raise OpError(ErrorCode.DENIED, reason)
        validate_arguments(spec, args)
        budget = spec.timeout_s if timeout is None else min(spec.timeout_s, max(0.0, timeout))
        if budget <= 0:
            raise OpError(ErrorCode.DEADLINE_EXCEEDED, f"tool {name!r}: no time left for the call")
        deadline = time.monotonic() + budget
        slot = self._slot(spec)
        if not slot.acquire(timeout=budget):
            raise OpError(ErrorCode.DEADLINE_EXCEEDED, f"tool {name!r}: no free slot within {budget:g} s "
                                                       f"(its limit is {spec.limit} concurrent calls)")
        try:
            remaining = deadline - time.monotonic()
            if spec.kind == "subprocess":
                return self._call_subprocess(spec, args, agent, deadline, budget, cancelled)
            if spec.kind == "builtin":
                return self._call_builtin(spec, args, agent, deadline, call_fn, cancelled)
            assert self._mcp is not None
            return self._mcp.call(spec, args, remaining, cancelled)
        finally:
            slot.release()

    def _slot(self, spec: RegisteredTool) -> threading.BoundedSemaphore:
        """Defence in depth: the scheduler already keeps a tool within its limit."""
        with self._slots_lock:
            slot = self._slots.get(spec.name)
            if slot is None:
                slot = self._slots[spec.name] = threading.BoundedSemaphore(spec.limit)
            return slot

    def _call_subprocess(self, spec: RegisteredTool, args: dict[str, Any], agent: str, deadline: float,
                         budget: float, cancelled: threading.Event | None) -> Any:
        worker = self._pool.acquire(spec, agent, deadline, cancelled)
        try:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise OpError(ErrorCode.DEADLINE_EXCEEDED, f"tool {spec.name!r}: no time left once a worker was free")
            return worker.call(args, self.options.settings.get(spec.name, {}), timeout, cancelled, budget)
        finally:
            self._pool.release(worker)

    def _call_builtin(self, spec: RegisteredTool, args: dict[str, Any], agent: str, deadline: float,
                      call_fn: CallFn | None, cancelled: threading.Event | None) -> Any:
        func = self._load_builtin(spec)
        if cancelled is not None and cancelled.is_set():
            raise OpError(ErrorCode.CANCELLED, f"tool {spec.name!r}: call cancelled")
        assert spec.folder is not None
        ctx = _BuiltinContext(spec.name, spec.folder, agent, self.options.settings.get(spec.name, {}), deadline, call_fn)
        try:
            result = func(args, ctx)
        except OpError as exc:
            raise OpError(exc.code, f"tool {spec.name!r}: {exc.message}") from None
        except Exception as exc:  # noqa: BLE001 - a failing builtin tool must not take the manager down
            log.exception("builtin tool %s failed", spec.name)
            raise OpError(ErrorCode.BACKEND_ERROR, f"tool {spec.name!r} raised {type(exc).__name__}: {exc}") from None
        try:
            size = len(json.dumps(result, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise OpError(ErrorCode.BACKEND_ERROR, f"tool {spec.name!r} returned something that is not JSON "
                                                   f"data: {exc}") from None
        if size > self.options.max_result_bytes:
            raise OpError(ErrorCode.TOO_LARGE, f"tool {spec.name!r}: result of {size} bytes exceeds the limit of "
                                               f"{self.options.max_result_bytes} bytes (tools max_result_bytes)")
        return result

    def _load_builtin(self, spec: RegisteredTool) -> Callable[..., Any]:
        """Import a builtin tool's code on its first call (dynamic loading)."""
        with self._builtin_lock:
            func = self._builtins.get(spec.name)
            if func is None:
                assert spec.folder is not None
                try:
                    func = wire.load_entry(spec.name, str(spec.folder), spec.entry)
                except Exception as exc:  # noqa: BLE001
                    raise OpError(ErrorCode.BACKEND_ERROR, f"tool {spec.name!r} failed to load its code "
                                                           f"({spec.entry}): {type(exc).__name__}: {exc}") from None
                self._builtins[spec.name] = func
            return func

    # -------------------------------------------------------------- shutdown
    def close(self) -> None:
        self._pool.close()
        if self._mcp is not None:
            self._mcp.close()
        self._pool.remove_scratch()
        self.call_limits.close()

    def __enter__(self) -> "ToolRuntime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- stats
    @property
    def worker_stats(self) -> dict[str, int]:
        """Cold starts and warm reuses so far (for `describe`/benchmarks)."""
        return dict(self._pool.stats)

    def status(self) -> dict[str, Any]:
        """For the manager's describe/status answers and `aios tools`: isolation in force, problems, workers."""
        return {"isolation": self.isolation.summary(self.options.scratch_mb),
                "isolation_complete": self.isolation.complete,
                "problems": [{"path": p.path, "reason": p.reason} for p in self.all_problems()],
                "call_limits": {"method": self.call_limits.method, "summary": self.call_limits.summary()},
                "workers": {**self.worker_stats, "idle": self._pool.idle_count(), "live": self._pool.live_count(),
                            "max": self.options.max_workers},
                "mcp": {name: {"running": s.session is not None, "starts": s.starts}
                        for name, s in (self._mcp.servers.items() if self._mcp else [])}}
