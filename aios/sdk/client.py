"""The Agent SDK: system calls from an agent process to the kernel.

    from aios import sdk
    with sdk.connect(agent="researcher") as kernel:
        kernel.call("kernel", "ping")
        reply = kernel.llm.chat("What is the capital of France?", on_token=print)

Each call is signed, sent over a DEALER socket to the scheduler's frontend and
matched to its reply by request id. Everything about one call (building it,
re-sending an idempotent call that gets no answer under the same id, retrying
after a retryable error under a new id, matching replies, typed errors) is the
call engine's (`aios.calls`); the sync and asyncio clients here differ
only in how they wait. Service helpers (`kernel.llm.chat`, ...) are written
once in `aios.sdk.services` and bound to both.

Failing fast. A socket monitor tells the client when its connection to the
scheduler drops. If the kernel is gone (its supervisor no longer runs, or it
stopped the kernel because the scheduler was FATAL), every call in flight and
every new call fails at once with `KernelUnavailable`, saying why, instead of
waiting for its timeout. If only the scheduler restarted, idempotent calls are
re-sent as soon as it is back and the others fail at once with an UNAVAILABLE
that says their outcome is unknown; while it is down, a call whose deadline
comes before the scheduler's next start (the supervisor's table says when)
fails at once with UNAVAILABLE too. The client looks again every
`MONITOR_CHECK_S` while it is not connected. Which ops are idempotent the
client learns from the kernel (`kernel.ops`), so an op a manager declares
safe to repeat is re-sent too.

One deadline per call. A call's timeout covers everything it does: when the
client must first ask the kernel which ops are idempotent, that question gets
what is left of the call's own time, not a budget of its own.

Bad input fails here, before anything is sent, with `InvalidArgument`: an
agent name the kernel refuses (`aios.agent_names`) when the client is created;
an argument a call cannot carry, or a request larger than the kernel accepts
(`[kernel] max_message_bytes`), when the call is made.
"""
from __future__ import annotations

import abc
import asyncio
import inspect
import os
import time
from pathlib import Path
from typing import Any, Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message, recv_monitor_message

from aios import messages
from aios.agent_names import agent_name_problem
from aios.endpoint import Endpoint
from aios.rundir import RunDir
from aios.calls import (
    DEFAULT_TIMEOUT_S,
    PartialHandler,
    PendingCall,
    CallResult,
    Send,
    Wait,
    decode,
    match_id,
)
from aios.protocol import ErrorCode
from aios.sdk.errors import AIOSError, InvalidArgument, KernelError, KernelTimeout, KernelUnavailable
from aios.sdk.services import KernelService, LLMService, MemoryService, StorageService, ToolsService
from aios.sockets import dealer
from aios.zmqio import recv_multipart, send_multipart

__all__ = ["AsyncClient", "Client", "CallResult", "connect", "connect_async", "DEFAULT_TIMEOUT_S"]

#: ops known to be safe to repeat without the caller saying so (the kernel adds its managers' ops)
IDEMPOTENT_OPS = {("kernel", "ping"), ("kernel", "status"), ("kernel", "ops")}
#: how long a waiting call blocks before it looks at the connection monitor
MONITOR_CHECK_S = 0.25
#: how often the table of idempotent ops may be fetched again when it lacks an op
OPS_REFRESH_S = 5.0
#: the longest the `kernel.ops` fetch before a call may take (always within the call's own deadline)
OPS_FETCH_MAX_S = 10.0
_MONITOR_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class _Link:
    """Run directory -> signing codec and the kernel's endpoint description (`endpoint.json`,
    written by the supervisor: the client never reads the kernel's whole configuration)."""

    def __init__(self, run_dir: str | Path | RunDir | None) -> None:
        from aios.protocol import Codec

        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        try:
            key = self.run_dir.load_key()
            endpoint: Endpoint = self.run_dir.read_endpoint()
        except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
            raise KernelUnavailable("UNAVAILABLE", f"no kernel running in {self.run_dir.path} ({exc})",
                                    retryable=True) from None
        self.codec = Codec(key)
        self.endpoint = endpoint
        self.address = endpoint.frontend
        if self.kernel_gone():
            raise KernelUnavailable("UNAVAILABLE", self.gone_message(), retryable=True)

    def kernel_gone(self) -> bool:
        """Whether this machine's kernel for the run directory is certainly not running. Over tcp
        the kernel may be on another machine, so only its silence can tell."""
        return self.endpoint.transport == "ipc" and self.run_dir.supervisor_pid() is None

    def gone_message(self) -> str:
        sup = self._state().get("supervisor") if self.endpoint.transport == "ipc" else None
        why = sup.get("message") if isinstance(sup, dict) else None  # it stopped by itself: why
        return (f"no kernel running in {self.run_dir.path}" + (f": {why}" if why else "")
                + f" (start one with: aios start --run-dir {self.run_dir.path})")

    def scheduler_down(self, remaining: float) -> str | None:
        """Why the scheduler cannot answer within `remaining` seconds, from the supervisor's table
        (this machine's kernel only): it is FATAL, or waiting to be restarted until after then."""
        if self.endpoint.transport != "ipc":
            return None
        rows = self._state().get("processes")
        row = next((r for r in rows if isinstance(r, dict) and r.get("name") == "scheduler"), None) \
            if isinstance(rows, list) else None
        if not isinstance(row, dict):
            return None
        state, message = row.get("state"), row.get("message") or ""
        if state == "FATAL":
            return f"the kernel's scheduler is FATAL ({message}); nothing can answer"
        restart_at = row.get("restart_at")
        if state == "BACKOFF" and isinstance(restart_at, (int, float)):
            wait = restart_at - time.time()
            if wait >= remaining:
                return (f"the kernel's scheduler is down ({message}); it restarts in {max(wait, 0):.1f}s, after "
                        f"this call's deadline")
        return None

    def _state(self) -> dict[str, Any]:
        state = self.run_dir.read_state()
        return state if isinstance(state, dict) else {}


def _check_timeout(timeout: Any, what: str) -> None:
    """NaN, infinite, negative or absurd timeouts fail here, at the caller, not in the kernel."""
    try:
        messages.check_deadline(timeout)
    except ValueError as exc:
        raise InvalidArgument(ErrorCode.INVALID_ARGUMENT.value, f"{what}: timeout {timeout!r}: {exc}") from None


class _ClientBase(abc.ABC):
    """What both clients share: identity, defaults, the service helpers and call construction."""

    def __init__(self, run_dir: str | Path | RunDir | None = None, agent: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S, retry_interval: float = 1.0) -> None:
        _check_timeout(timeout, "client")
        self.agent = agent or f"agent-{os.getpid()}"
        problem = agent_name_problem(self.agent)
        if problem is not None:
            raise InvalidArgument(ErrorCode.INVALID_ARGUMENT.value, f"client: {problem}")
        self.timeout = timeout
        self.retry_interval = retry_interval
        self._link = _Link(run_dir)
        self.run_dir = self._link.run_dir
        self.llm = LLMService(self)
        self.kernel = KernelService(self)
        self.storage = StorageService(self)
        self.memory = MemoryService(self)
        self.tools = ToolsService(self)
        self._connected = False
        self._idempotent: set[tuple[str, str]] | None = None  # learned from kernel.ops
        self._ops_fetched = 0.0

    def _is_idempotent(self, service: str, op: str) -> bool | None:
        """What the kernel says about (service, op); None if the client must ask it first."""
        if (service, op) in IDEMPOTENT_OPS:
            return True
        if self._idempotent is not None and ((service, op) in self._idempotent
                                             or time.monotonic() - self._ops_fetched < OPS_REFRESH_S):
            return (service, op) in self._idempotent
        return None

    def _learn_ops(self, table: Any) -> None:
        self._ops_fetched = time.monotonic()
        self._idempotent = {(svc, op) for svc, ops in (table or {}).items() if isinstance(ops, dict)
                            for op, info in ops.items() if isinstance(info, dict) and info.get("idempotent")}

    def _check_kernel(self, call: PendingCall) -> None:
        """Not connected: fail at once if the kernel is gone, or if its scheduler will not be back
        before the call's deadline (otherwise it is restarting: wait for it)."""
        if self._link.kernel_gone():
            raise KernelUnavailable("UNAVAILABLE", f"{call.what}: {self._link.gone_message()}", retryable=True)
        why = self._link.scheduler_down(call.deadline - time.monotonic())
        if why:
            raise KernelError(ErrorCode.UNAVAILABLE.value, f"{call.what}: {why}", retryable=True)

    def _deadline(self, service: str, op: str, timeout: float | None) -> float:
        """When the call must be over (monotonic): everything it does draws on this one deadline."""
        if timeout is None:
            timeout = self.timeout
        else:
            _check_timeout(timeout, f"{service}.{op}")
        return time.monotonic() + timeout

    @staticmethod
    def _ops_fetch_timeout(until: float) -> float | None:
        """The timeout of the `kernel.ops` fetch before a call due by `until`: what is left of the
        call's own time (at most OPS_FETCH_MAX_S); None if nothing is left."""
        left = until - time.monotonic()
        return min(left, OPS_FETCH_MAX_S) if left > 0 else None

    def _new_call(self, service: str, op: str, args: dict[str, Any] | None, until: float,
                  idempotent: bool | None, target: str | None, on_partial: PartialHandler | None) -> PendingCall:
        now = time.monotonic()
        if now >= until:  # the kernel.ops fetch before it used up the call's time
            raise KernelTimeout("TIMEOUT", f"{service}.{op}: no answer from the kernel at {self.run_dir.path} "
                                           "within the timeout (asking which ops are safe to repeat took it all)")
        if idempotent is None:
            idempotent = bool(self._is_idempotent(service, op))
        header = messages.Request(id="", service=service, op=op, agent=self.agent, target=target)
        return PendingCall(self._link.codec, header, args or {}, timeout=until - now, idempotent=idempotent,
                           now=now, resend_interval=self.retry_interval, on_partial=on_partial,
                           where=f"the kernel at {self.run_dir.path}",
                           max_message_bytes=self._link.endpoint.max_message_bytes)

    @abc.abstractmethod
    def request(self, service: str, op: str, args: dict[str, Any] | None = None, *,
                timeout: float | None = None, idempotent: bool | None = None, target: str | None = None,
                on_partial: PartialHandler | None = None, then: Callable[[CallResult], Any] | None = None) -> Any:
        """Make a call and return its CallResult (or then(reply)); each client waits its own way."""

    def chat(self, messages: list[dict[str, Any]] | str, *, model: str | None = None, op: str = "chat",
             on_token: Callable[[str], None] | None = None, timeout: float | None = None, **options: Any) -> Any:
        """Shorthand for `llm.chat` (`op="json"` / `op="tools"` for the other output modes)."""
        return self.llm.generate(op, messages, model=model, on_token=on_token, timeout=timeout, **options)


class Client(_ClientBase):
    """A synchronous kernel connection. One thread at a time; open one per thread."""

    def __init__(self, run_dir: str | Path | RunDir | None = None, agent: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S, retry_interval: float = 1.0) -> None:
        super().__init__(run_dir, agent, timeout=timeout, retry_interval=retry_interval)
        self._ctx = zmq.Context.instance()
        self._sock = dealer(self._ctx, self.run_dir, self._link.endpoint, role="agent")
        self._monitor = self._sock.get_monitor_socket(_MONITOR_EVENTS)
        self._sock.connect(self._link.address)
        self._rcvtimeo = -1  # the socket's RCVTIMEO in ms, set by _recv_until only when it changes

    def call(self, service: str, op: str, /, **args: Any) -> Any:
        """Make a system call and return its result."""
        return self.request(service, op, args).result

    def request(self, service: str, op: str, args: dict[str, Any] | None = None, *,
                timeout: float | None = None, idempotent: bool | None = None, target: str | None = None,
                on_partial: PartialHandler | None = None, then: Callable[[CallResult], Any] | None = None) -> Any:
        """The full form of `call`: per-call timeout, retry policy, target (model/tool), streaming.

        `on_partial` receives each partial reply body as it arrives; a body
        {"reset": True} means the kernel restarted the call (its manager died)
        and what was streamed so far should be discarded. Returns the `CallResult`
        (or `then(reply)`).
        """
        until = self._deadline(service, op, timeout)
        if idempotent is None and self._is_idempotent(service, op) is None:
            self._fetch_ops(until)
        call = self._new_call(service, op, args, until, idempotent, target, on_partial)
        codec = self._link.codec
        while True:
            step = call.step(time.monotonic())
            if type(step) is Send:
                if self._monitor.getsockopt(_EVENTS) & _POLLIN:  # 1.4 µs; recv(NOBLOCK) costs twice that
                    self._connection_events()
                if not self._connected:
                    self._check_kernel(call)
                send_multipart(self._sock, step.frames)
            elif type(step) is Wait:
                frames = self._recv_until(min(step.until, time.monotonic() + MONITOR_CHECK_S))
                if frames is not None:
                    msg = decode(codec, frames)
                    if match_id(msg) == call.rid:
                        call.feed(msg)  # type: ignore[arg-type]
                    continue
                lost = self._connection_events()
                if lost or not self._connected:  # still down: the kernel may have gone meanwhile
                    self._check_kernel(call)
                if lost:
                    call.connection_lost(time.monotonic())
            else:
                return then(step) if then is not None else step

    def _fetch_ops(self, until: float) -> None:
        """Learn which ops are idempotent, within the time left to the call that needs to know (due by `until`)."""
        timeout = self._ops_fetch_timeout(until)
        if timeout is None:
            return
        try:
            self._learn_ops(self.request("kernel", "ops", {}, timeout=timeout).result)
        except AIOSError:
            self._learn_ops({})  # an older kernel, or none: only the built-in list applies

    def _connection_events(self) -> bool:
        """Read the connection monitor; True if the connection dropped since the last look."""
        lost = False
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return lost
            if event["event"] == zmq.EVENT_CONNECTED:
                self._connected = True
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._connected = False
                lost = True

    def _recv_until(self, until: float) -> list[bytes] | None:
        remaining_ms = int((until - time.monotonic()) * 1000)
        if remaining_ms <= 0:
            return None
        # A blocking receive with a timeout: half the system calls of zmq_poll + receive.
        # Rounded up to 64 ms steps so the option rarely changes between calls (waking up to 64 ms
        # late only delays a re-send); at most an hour at a time (RCVTIMEO is a C int).
        remaining_ms = min((remaining_ms + 63) & ~63, 3_600_000)
        if remaining_ms != self._rcvtimeo:
            self._sock.setsockopt(zmq.RCVTIMEO, remaining_ms)
            self._rcvtimeo = remaining_ms
        try:
            return recv_multipart(self._sock)
        except zmq.Again:
            return None

    def close(self) -> None:
        self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close(0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_LOST = object()  # put in a waiting call's inbox when the connection drops


class AsyncClient(_ClientBase):
    """An asyncio kernel connection; many tasks may call concurrently."""

    def __init__(self, run_dir: str | Path | RunDir | None = None, agent: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S, retry_interval: float = 1.0) -> None:
        super().__init__(run_dir, agent, timeout=timeout, retry_interval=retry_interval)
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = dealer(self._ctx, self.run_dir, self._link.endpoint, role="agent")
        self._monitor = self._sock.get_monitor_socket(_MONITOR_EVENTS)
        self._sock.connect(self._link.address)
        self._waiters: dict[str, asyncio.Queue[Any]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def call(self, service: str, op: str, /, **args: Any) -> Any:
        return (await self.request(service, op, args)).result

    async def request(self, service: str, op: str, args: dict[str, Any] | None = None, *,
                      timeout: float | None = None, idempotent: bool | None = None, target: str | None = None,
                      on_partial: PartialHandler | None = None,
                      then: Callable[[CallResult], Any] | None = None) -> Any:
        """Async `Client.request`."""
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read())
            self._watcher = asyncio.ensure_future(self._watch())
        until = self._deadline(service, op, timeout)
        if idempotent is None and self._is_idempotent(service, op) is None:
            await self._fetch_ops(until)
        call = self._new_call(service, op, args, until, idempotent, target, on_partial)
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        rid = ""
        try:
            while True:
                step = call.step(time.monotonic())
                if type(step) is Send:
                    if not self._connected:
                        self._check_kernel(call)
                    if call.rid != rid:
                        self._waiters.pop(rid, None)
                        rid = call.rid
                        self._waiters[rid] = inbox
                    await self._sock.send_multipart(step.frames)
                elif type(step) is Wait:
                    left = step.until - time.monotonic()
                    if left > 0:
                        try:  # while not connected, look at the kernel every MONITOR_CHECK_S
                            msg = await asyncio.wait_for(inbox.get(), left if self._connected
                                                         else min(left, MONITOR_CHECK_S))
                        except asyncio.TimeoutError:
                            if not self._connected:
                                self._check_kernel(call)
                            continue
                        if msg is _LOST:
                            self._check_kernel(call)
                            call.connection_lost(time.monotonic())
                        elif match_id(msg) == call.rid:
                            call.feed(msg)
                else:
                    if then is None:
                        return step
                    out = then(step)  # a helper may chain a second call: await it here
                    return await out if inspect.isawaitable(out) else out
        finally:
            self._waiters.pop(rid, None)

    async def _fetch_ops(self, until: float) -> None:
        """Async `Client._fetch_ops`: within the time left to the call that needs to know."""
        timeout = self._ops_fetch_timeout(until)
        if timeout is None:
            return
        try:
            self._learn_ops((await self.request("kernel", "ops", {}, timeout=timeout)).result)
        except AIOSError:
            self._learn_ops({})

    async def _read(self) -> None:
        """Route every incoming reply to the task waiting for its id (decoded once, here)."""
        codec = self._link.codec
        while True:
            msg = decode(codec, await self._sock.recv_multipart())
            waiter = self._waiters.get(match_id(msg) or "")
            if waiter is not None:
                waiter.put_nowait(msg)

    async def _watch(self) -> None:
        """Follow the connection; tell every waiting call when it drops."""
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_CONNECTED:
                self._connected = True
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self._connected = False
                for inbox in list(self._waiters.values()):
                    inbox.put_nowait(_LOST)

    async def close(self) -> None:
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
        self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close(0)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def connect(run_dir: str | Path | RunDir | None = None, agent: str | None = None, **options: Any) -> Client:
    """Connect to the kernel whose run directory is `run_dir` (default: the default run directory)."""
    return Client(run_dir, agent, **options)


def connect_async(run_dir: str | Path | RunDir | None = None, agent: str | None = None, **options: Any) -> AsyncClient:
    return AsyncClient(run_dir, agent, **options)
