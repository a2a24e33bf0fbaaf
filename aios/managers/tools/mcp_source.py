"""Tools served by MCP servers over stdio, mounted beside the local tools.

Each configured server ({name, command, env, limit, timeout_s, ...}) is started
at setup; its tools appear as `<server>__<tool>` (a valid OpenAI function name,
which `<server>.<tool>` would not be; "__" is reserved for this, local tool
names cannot contain it). Calls get the same treatment as local tools: the
runtime validates arguments against the server's input schema first, applies
the per-tool concurrency limit and the timeout, and bounds the result size.

The `mcp` client is asyncio/anyio based; the tool manager is threaded. One
background thread runs one event loop for all servers. Each server's stdio
transport and session live inside one long-lived task (anyio scopes must be
entered and left by the same task); calls are separate tasks submitted with
`run_coroutine_threadsafe`, which the MCP session supports (verified: a request
from a second task while the holder task waits).

A server that dies is noticed by a ping before each call (about a pipe round
trip) and restarted transparently when it died while idle; when it dies during
a call, that call fails with UNAVAILABLE naming the server's exit and stderr
tail, and the next call restarts it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from aios.managers.base import OpError
from aios.managers.tools.manifest import check_parameters_schema
from aios.managers.tools.registry import ToolProblem, RegisteredTool
from aios.managers.tools.isolation import WORKER_SCRIPT, JailPlanner
from aios.protocol import ErrorCode

log = logging.getLogger("aios.tools.mcp")

CONNECTION_CLOSED = -32000
REQUEST_TIMEOUT = -32001
_SAFE = re.compile(r"[^a-zA-Z0-9_-]")


class McpServerConfig(BaseModel):
    """One MCP server in the tools configuration (`[[managers.options.mcp]]` or similar)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,30}$")
    command: list[str] = Field(min_length=1, description="the server's command line; it speaks MCP on stdin/stdout")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for the server")
    cwd: str | None = None
    limit: int = Field(default=2, ge=1, le=256, description="concurrent calls per tool of this server")
    timeout_s: float = Field(default=30.0, gt=0, le=3600)
    start_timeout_s: float = Field(default=20.0, gt=0, le=600)
    memory_mb: int | None = Field(default=None, ge=32, description="RLIMIT_AS of the server process")
    sandbox: bool = Field(default=False, description="run the server in the tool jail (no network, read-only "
                                                     "filesystem, private /tmp), when this machine allows it")


def mcp_tool_name(server: str, tool: str) -> str:
    return f"{server}__{_SAFE.sub('_', tool)}"[:64]


class _Server:
    """One MCP server: its process and session, held by one task of the hub's loop."""

    def __init__(self, config: McpServerConfig, planner: JailPlanner | None) -> None:
        self.config = config
        self.planner = planner
        self.session: Any = None
        self.tools: list[Any] = []
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        self._errlog = tempfile.TemporaryFile(mode="w+", prefix=f"aios-mcp-{config.name}-")
        self._errmark = 0
        self.starts = 0
        self.last_exit: str | None = None

    def command(self) -> tuple[str, list[str]]:
        """The server's command, wrapped by the worker's exec mode when limits or the jail apply."""
        cfg = self.config
        jail = None
        if cfg.sandbox and self.planner is not None:
            jail = self.planner.spec(None, cpu_s=0, memory_mb=cfg.memory_mb)
            if jail is not None:
                jail["keep"] = sorted(set(jail["keep"]) | {os.path.realpath(os.path.dirname(p))
                                                           for p in cfg.command[:2] if os.path.isabs(p)})
        if jail is None and cfg.memory_mb is None:
            return cfg.command[0], list(cfg.command[1:])
        spec = {"manager_pid": os.getpid(), "jail": jail, "rlimits": {"memory_mb": cfg.memory_mb}}
        return sys.executable, ["-I", str(WORKER_SCRIPT), "exec", json.dumps(spec), "--", *cfg.command]

    def stderr_tail(self) -> str:
        try:
            self._errlog.flush()
            self._errlog.seek(max(self._errmark, self._errlog.seek(0, os.SEEK_END) - 1500))
            return self._errlog.read().strip()
        except (OSError, ValueError):
            return ""

    async def _hold(self, ready: asyncio.Future[list[Any]]) -> None:
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client

        command, args = self.command()
        params = StdioServerParameters(command=command, args=args, env=self.config.env or None, cwd=self.config.cwd)
        assert self._stop is not None
        try:
            async with stdio_client(params, errlog=self._errlog) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    tools: list[Any] = []
                    cursor = None
                    while True:
                        from mcp_types import PaginatedRequestParams
                        page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
                        tools += page.tools
                        cursor = page.next_cursor
                        if not cursor:
                            break
                    self.session, self.tools = session, tools
                    ready.set_result(tools)
                    await self._stop.wait()
        except BaseException as exc:  # noqa: BLE001 - reported through `ready` or the next call
            self.last_exit = f"{type(exc).__name__}: {exc}"
            if not ready.done():
                ready.set_exception(exc)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            self.session = None

    async def connect(self, restart: bool = False) -> list[Any]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if not restart and self.session is not None and self._task is not None and not self._task.done():
                return self.tools
            await self._shutdown()
            self._errmark = self._errlog.seek(0, os.SEEK_END)
            self._stop = asyncio.Event()
            ready: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._hold(ready), name=f"mcp-{self.config.name}")
            self.starts += 1
            try:
                return await asyncio.wait_for(asyncio.shield(ready), self.config.start_timeout_s)
            except asyncio.TimeoutError:
                await self._shutdown()
                raise TimeoutError(f"did not finish the MCP handshake within {self.config.start_timeout_s:g} s "
                                   f"(start_timeout_s)") from None

    async def _shutdown(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 10.0)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - the holder reports its own end
                self._task.cancel()
        self._task = None
        self.session = None

    async def call(self, tool: str, args: dict[str, Any], timeout: float) -> Any:
        from mcp.shared.exceptions import MCPError
        session = self.session
        alive = False
        if session is not None:
            try:
                await session.send_ping()
                alive = True
            except MCPError:
                alive = False
        if not alive:
            log.info("MCP server %s is not running; starting it", self.config.name)
            await self.connect(restart=True)
            session = self.session
        return await session.call_tool(tool, args, read_timeout_seconds=timeout)


class McpHub:
    """All configured MCP servers, their tools as RegisteredTools, and calls into them from any thread."""

    def __init__(self, configs: list[McpServerConfig], planner: JailPlanner | None, max_result_bytes: int) -> None:
        self.configs = configs
        self.max_result_bytes = max_result_bytes
        self.servers = {c.name: _Server(c, planner) for c in configs}
        self.specs: dict[str, RegisteredTool] = {}
        self.problems: list[ToolProblem] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mcp-loop", daemon=True)
        self._thread.start()

    def _run(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def start(self, taken: set[str]) -> None:
        """Start every server at once and mount the tools of those that answered."""
        futures = {name: self._run(s.connect()) for name, s in self.servers.items()}
        for name, fut in futures.items():
            server = self.servers[name]
            try:
                tools = fut.result(server.config.start_timeout_s + 15)
            except Exception as exc:  # noqa: BLE001 - any start failure is a problem, not a crash
                tail = server.stderr_tail()
                self.problems.append(ToolProblem(f"mcp:{name}", f"MCP server {server.config.command!r} failed to "
                                                               f"start: {_explain(exc)}"
                                                               + (f"; stderr: {tail[-500:]}" if tail else "")))
                continue
            self._mount(server, tools, taken)
        for p in self.problems:
            log.warning("MCP tool not mounted: %s", p)

    def mount_late(self, server_name: str, taken: set[str]) -> bool:
        """Try again to start a server that failed at setup (called when one of its tools is asked for)."""
        server = self.servers.get(server_name)
        if server is None or any(s.mcp_server == server_name for s in self.specs.values()):
            return False
        try:
            tools = self._run(server.connect(restart=True)).result(server.config.start_timeout_s + 15)
        except Exception as exc:  # noqa: BLE001
            tail = server.stderr_tail()
            raise OpError(ErrorCode.UNAVAILABLE, f"MCP server {server_name!r} failed to start: {_explain(exc)}"
                          + (f"; stderr: {tail[-500:]}" if tail else "")) from None
        self.problems = [p for p in self.problems if p.path != f"mcp:{server_name}"]
        self._mount(server, tools, taken)
        return True

    def _mount(self, server: _Server, tools: list[Any], taken: set[str]) -> None:
        cfg = server.config
        for tool in tools:
            name = mcp_tool_name(cfg.name, tool.name)
            where = f"mcp:{cfg.name}/{tool.name}"
            if name in taken or name in self.specs:
                if self.specs.get(name) and self.specs[name].mcp_tool == tool.name:
                    continue  # the same tool again after a restart
                self.problems.append(ToolProblem(where, f"name {name!r} is already taken; tool not mounted"))
                continue
            schema = dict(tool.input_schema or {"type": "object"})
            schema.setdefault("type", "object")
            try:
                check_parameters_schema(schema)
            except ValueError as exc:
                self.problems.append(ToolProblem(where, str(exc)))
                continue
            hints = tool.annotations
            self.specs[name] = RegisteredTool(
                name=name, description=(tool.description or tool.title or f"{tool.name} (MCP server {cfg.name})")[:4000],
                parameters=schema, kind="mcp", source=f"mcp:{cfg.name}", limit=cfg.limit, timeout_s=cfg.timeout_s,
                memory_mb=cfg.memory_mb, idempotent=bool(hints and hints.idempotent_hint),
                network=not cfg.sandbox, reuse=True, mcp_server=cfg.name, mcp_tool=tool.name)

    def call(self, spec: RegisteredTool, args: dict[str, Any], timeout: float, cancelled: threading.Event | None) -> Any:
        server = self.servers[spec.mcp_server or ""]
        fut = self._run(server.call(spec.mcp_tool or "", args, timeout))
        deadline = time.monotonic() + timeout + server.config.start_timeout_s + 2.0
        while True:
            try:
                result = fut.result(0.05 if cancelled is not None else 1.0)
                break
            except FutureTimeout:
                if cancelled is not None and cancelled.is_set():
                    fut.cancel()
                    raise OpError(ErrorCode.CANCELLED, f"tool {spec.name!r}: call cancelled") from None
                if time.monotonic() > deadline:
                    fut.cancel()
                    raise OpError(ErrorCode.DEADLINE_EXCEEDED,
                                  f"tool {spec.name!r}: MCP server {server.config.name!r} did not answer "
                                  f"within {timeout:.3g} s (timeout_s)") from None
            except Exception as exc:  # noqa: BLE001
                raise self._error(spec, server, exc, timeout) from None
        return self._result(spec, result)

    def _error(self, spec: RegisteredTool, server: _Server, exc: BaseException, timeout: float) -> OpError:
        from mcp.shared.exceptions import MCPError
        name = server.config.name
        if isinstance(exc, MCPError) and exc.code == REQUEST_TIMEOUT:
            return OpError(ErrorCode.DEADLINE_EXCEEDED, f"tool {spec.name!r} did not finish within {timeout:.3g} s "
                                                        f"(MCP server {name!r}, timeout_s {server.config.timeout_s:g})")
        if isinstance(exc, MCPError) and exc.code == CONNECTION_CLOSED:
            self._run(server._shutdown())
            tail = server.stderr_tail()
            return OpError(ErrorCode.UNAVAILABLE,
                           f"tool {spec.name!r}: MCP server {name!r} exited during the call; it will be restarted "
                           f"on the next call" + (f"; stderr: {tail[-600:]}" if tail else ""))
        if isinstance(exc, MCPError):
            return OpError(ErrorCode.BACKEND_ERROR, f"tool {spec.name!r}: MCP server {name!r} answered error "
                                                    f"{exc.code}: {exc.message}")
        tail = server.stderr_tail()
        return OpError(ErrorCode.UNAVAILABLE, f"tool {spec.name!r}: MCP server {name!r} is not available: "
                                              f"{_explain(exc)}" + (f"; stderr: {tail[-600:]}" if tail else ""))

    def _result(self, spec: RegisteredTool, result: Any) -> Any:
        texts = [c.text for c in result.content if getattr(c, "type", None) == "text"]
        if result.is_error:
            raise OpError(ErrorCode.BACKEND_ERROR, f"tool {spec.name!r} failed: {' '.join(texts)[:2000]}")
        if result.structured_content is not None:
            out: Any = result.structured_content
        elif len(texts) == len(result.content):
            out = {"text": "\n".join(texts)}
        else:
            out = {"content": [c.model_dump(mode="json", exclude_none=True) for c in result.content]}
        size = len(json.dumps(out, ensure_ascii=False))
        if size > self.max_result_bytes:
            raise OpError(ErrorCode.TOO_LARGE, f"tool {spec.name!r}: result of {size} bytes exceeds the limit of "
                                               f"{self.max_result_bytes} bytes (tools max_result_bytes)")
        return out

    def close(self) -> None:
        async def stop_all() -> None:
            await asyncio.gather(*(s._shutdown() for s in self.servers.values()), return_exceptions=True)
        try:
            self._run(stop_all()).result(30)
        except Exception as exc:  # noqa: BLE001
            log.warning("stopping MCP servers: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
        for s in self.servers.values():
            s._errlog.close()


def _explain(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_explain(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
