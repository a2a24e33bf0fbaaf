"""The tool manager: the `tools` service, one process wrapping one `ToolRuntime`.

At start it discovers the tools (the ones shipped in `aios/tools/`, the folders
listed in `[tools] dirs`, and MCP servers named in `[tools] mcp`) and announces
each tool as a *target* with its concurrency limit, so the scheduler itself
never runs more instances of a tool than its limit and lets calls to other
tools pass a saturated one. A tool's code is loaded on its first call.

    kernel.tools.call("calculator", expression="2 * (3 + 4)")   # target = the tool's name

A call's arguments are validated against the tool's schema before anything
runs; it then runs isolated (a sandboxed worker process with the tool's
timeout and memory limit), and the result comes back as JSON data. Whether a
call may be repeated after the manager dies is the tool's own `idempotent`
flag (announced per target), not the op's.
"""
from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from aios.datadir import storage_private_paths
from aios.managers.base import Manager, OpError, RequestContext, op
from aios.managers.tools.runtime import ToolRuntime, ToolRuntimeOptions
from aios.protocol import ErrorCode


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CallArgs(_Args):
    arguments: dict[str, Any] = Field(default_factory=dict, description="the tool's arguments")


class NameArgs(_Args):
    name: str = Field(min_length=1, max_length=256)


class FunctionsArgs(_Args):
    names: list[str] | None = Field(default=None, max_length=128,
                                    description="these tools (default: every enabled tool)")


class NoArgs(_Args):
    pass


class ToolManager(Manager):
    service = "tools"
    # Handler threads: calls wait on workers and on other services (files -> storage), so more
    # threads than cores; each tool's own limit is enforced by the scheduler per target.
    capacity = 16
    Options = ToolRuntimeOptions

    def setup(self) -> None:
        options: ToolRuntimeOptions = self.options
        # agents' files are reached through the storage service only, never in its database
        database = self.config.builtin.get("storage", {}).get("path")  # [storage] path, None: the default
        hide = [str(self.run_dir.path), *options.hide_paths, *map(str, storage_private_paths(database))]
        self.runtime = ToolRuntime((), options.model_copy(update={"hide_paths": hide}))
        for problem in self.runtime.all_problems():
            self.log.warning("tool not loaded: %s", problem)
        self._announce()

    def _announce(self) -> None:
        infos = self.runtime.list()
        self.targets = [i.name for i in infos]
        self.limits = self.runtime.limits()
        self.idempotent_targets = [i.name for i in infos if i.idempotent]

    def teardown(self) -> None:
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.close()

    @op(CallArgs)
    def call(self, args: CallArgs, ctx: RequestContext) -> dict:
        """Run the tool named by the request's target; {"tool", "result"}."""
        if not ctx.target:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "name the tool to call (the request's target), "
                                                      "e.g. kernel.tools.call('calculator', expression='1+1')")
        remaining = ctx.deadline - time.monotonic() if ctx.deadline is not None else None
        result = self.runtime.call(ctx.target, args.arguments, agent=ctx.agent, timeout=remaining,
                                   call_fn=ctx.call, cancelled=ctx.cancelled)
        return {"tool": ctx.target, "result": result}

    @op(NoArgs, name="list", idempotent=True)
    def list_tools(self, args: NoArgs, ctx: RequestContext) -> dict:
        return {"tools": [i.model_dump() for i in self.runtime.list()]}

    @op(NameArgs, idempotent=True)
    def describe(self, args: NameArgs, ctx: RequestContext) -> dict:
        return self.runtime.describe(args.name).model_dump()

    @op(FunctionsArgs, idempotent=True)
    def functions(self, args: FunctionsArgs, ctx: RequestContext) -> dict:
        """OpenAI-style function schemas, for offering tools to a model (the LLM `tools` op)."""
        if args.names is None:
            return {"functions": self.runtime.functions()}
        out = []
        for name in args.names:
            info = self.runtime.describe(name)
            if not info.enabled:
                raise OpError(ErrorCode.DENIED, info.disabled_reason or f"tool {name!r} is off")
            out.append(info.function)
        return {"functions": out}

    def status_figures(self) -> dict[str, Any]:
        """Isolation in force, per-call limits, tools that did not load, workers, MCP servers."""
        return self.runtime.status()

    def status_line(self, figures: dict[str, Any]) -> str:
        d, w = figures, figures.get("workers", {})
        isolation = "complete" if d.get("isolation_complete") else "INCOMPLETE: " + "; ".join(d.get("problems", []))
        servers = ", ".join(d.get("mcp", {})) or "none"
        # per_target (limit, running, queued per tool) is the scheduler's view, passed in by `aios status`
        active = {t: c for t, c in d.get("per_target", {}).items() if c["running"] or c["queued"]}
        in_use = ", ".join(f"{t} {c['running']}/{c['limit']} running, {c['queued']} queued" for t, c in active.items())
        limits = d.get("call_limits", {}).get("summary", "unknown")
        return (f"isolation {isolation}; {limits}; workers {w.get('live', 0)}/{w.get('max', '?')} live, "
                f"{w.get('idle', 0)} idle, {w.get('warm', 0)} warm calls, {w.get('cold', 0)} cold starts; "
                f"MCP servers: {servers}; in use: {in_use or 'none'}")
