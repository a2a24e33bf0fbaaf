"""The Agent SDK: system calls from an agent process to the kernel.

    from aios import sdk
    with sdk.connect(agent="researcher") as kernel:
        kernel.call("kernel", "ping")
        reply = kernel.llm.chat("What is the capital of France?", on_token=print)

Each call is signed, sent over a DEALER socket to the scheduler's frontend and
matched to its reply by request id. Everything about one call (building it,
re-sending an idempotent call that gets no answer under the same id, retrying
after a retryable error under a new id, matching replies, typed errors) is the
call engine's (`aios.sdk.engine`); the sync and asyncio clients here differ
only in how they wait. Service helpers (`kernel.llm.chat`, ...) are written
once in `aios.sdk.services` and bound to both.
"""
from __future__ import annotations

import abc
import asyncio
import os
import time
from pathlib import Path
from typing import Any, Callable

import zmq
import zmq.asyncio

from aios import messages
from aios.config import Config
from aios.rundir import RunDir
from aios.sdk.engine import (
    DEFAULT_TIMEOUT_S,
    PartialHandler,
    PendingCall,
    Reply,
    Send,
    Wait,
    decode,
    match_id,
)
from aios.protocol import ErrorCode
from aios.sdk.errors import InvalidArgument, KernelNotRunning
from aios.sdk.services import KernelService, LLMService
from aios.sockets import dealer
from aios.zmqio import recv_multipart, send_multipart

__all__ = ["AsyncClient", "Client", "Reply", "connect", "connect_async", "DEFAULT_TIMEOUT_S"]

#: ops known to be safe to repeat without the caller saying so
IDEMPOTENT_OPS = {("kernel", "ping"), ("kernel", "status")}


class _Endpoint:
    """Run directory -> signing codec and frontend address."""

    def __init__(self, run_dir: str | Path | RunDir | None) -> None:
        from aios.protocol import Codec

        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        try:
            key = self.run_dir.load_key()
            config: Config = self.run_dir.load_config()
        except FileNotFoundError as exc:
            raise KernelNotRunning("UNAVAILABLE", str(exc), retryable=True) from None
        self.codec = Codec(key)
        self.config = config
        self.address = self.run_dir.frontend_endpoint(config)


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
        self.timeout = timeout
        self.retry_interval = retry_interval
        self._endpoint = _Endpoint(run_dir)
        self.run_dir = self._endpoint.run_dir
        self.llm = LLMService(self)
        self.kernel = KernelService(self)

    def _new_call(self, service: str, op: str, args: dict[str, Any] | None, timeout: float | None,
                  idempotent: bool | None, target: str | None, on_partial: PartialHandler | None) -> PendingCall:
        if timeout is None:
            timeout = self.timeout
        else:
            _check_timeout(timeout, f"{service}.{op}")
        if idempotent is None:
            idempotent = (service, op) in IDEMPOTENT_OPS
        header = messages.Request(id="", service=service, op=op, agent=self.agent, target=target)
        return PendingCall(self._endpoint.codec, header, args or {}, timeout=timeout, idempotent=idempotent,
                           now=time.monotonic(), resend_interval=self.retry_interval, on_partial=on_partial,
                           where=f"the kernel at {self.run_dir.path}")

    @abc.abstractmethod
    def request(self, service: str, op: str, args: dict[str, Any] | None = None, *,
                timeout: float | None = None, idempotent: bool | None = None, target: str | None = None,
                on_partial: PartialHandler | None = None, then: Callable[[Reply], Any] | None = None) -> Any:
        """Make a call and return its Reply (or then(reply)); each client waits its own way."""

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
        self._sock = dealer(self._ctx, self.run_dir, self._endpoint.config, role="agent")
        self._sock.connect(self._endpoint.address)
        self._rcvtimeo = -1  # the socket's RCVTIMEO in ms, set by _recv_until only when it changes

    def call(self, service: str, op: str, /, **args: Any) -> Any:
        """Make a system call and return its result."""
        return self.request(service, op, args).result

    def request(self, service: str, op: str, args: dict[str, Any] | None = None, *,
                timeout: float | None = None, idempotent: bool | None = None, target: str | None = None,
                on_partial: PartialHandler | None = None, then: Callable[[Reply], Any] | None = None) -> Any:
        """The full form of `call`: per-call timeout, retry policy, target (model/tool), streaming.

        `on_partial` receives each partial reply body as it arrives; a body
        {"reset": True} means the kernel restarted the call (its manager died)
        and what was streamed so far should be discarded. Returns the `Reply`
        (or `then(reply)`).
        """
        call = self._new_call(service, op, args, timeout, idempotent, target, on_partial)
        codec = self._endpoint.codec
        while True:
            step = call.step(time.monotonic())
            if type(step) is Send:
                send_multipart(self._sock, step.frames)
            elif type(step) is Wait:
                frames = self._recv_until(step.until)
                if frames is not None:
                    msg = decode(codec, frames)
                    if match_id(msg) == call.rid:
                        call.feed(msg)  # type: ignore[arg-type]
            else:
                return then(step) if then is not None else step

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
        self._sock.close(0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """An asyncio kernel connection; many tasks may call concurrently."""

    def __init__(self, run_dir: str | Path | RunDir | None = None, agent: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S, retry_interval: float = 1.0) -> None:
        super().__init__(run_dir, agent, timeout=timeout, retry_interval=retry_interval)
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = dealer(self._ctx, self.run_dir, self._endpoint.config, role="agent")
        self._sock.connect(self._endpoint.address)
        self._waiters: dict[str, asyncio.Queue[Any]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def call(self, service: str, op: str, /, **args: Any) -> Any:
        return (await self.request(service, op, args)).result

    async def request(self, service: str, op: str, args: dict[str, Any] | None = None, *,
                      timeout: float | None = None, idempotent: bool | None = None, target: str | None = None,
                      on_partial: PartialHandler | None = None,
                      then: Callable[[Reply], Any] | None = None) -> Any:
        """Async `Client.request`."""
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read())
        call = self._new_call(service, op, args, timeout, idempotent, target, on_partial)
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        rid = ""
        try:
            while True:
                step = call.step(time.monotonic())
                if type(step) is Send:
                    if call.rid != rid:
                        self._waiters.pop(rid, None)
                        rid = call.rid
                        self._waiters[rid] = inbox
                    await self._sock.send_multipart(step.frames)
                elif type(step) is Wait:
                    left = step.until - time.monotonic()
                    if left > 0:
                        try:
                            msg = await asyncio.wait_for(inbox.get(), left)
                        except asyncio.TimeoutError:
                            continue
                        if match_id(msg) == call.rid:
                            call.feed(msg)
                else:
                    return then(step) if then is not None else step
        finally:
            self._waiters.pop(rid, None)

    async def _read(self) -> None:
        """Route every incoming reply to the task waiting for its id (decoded once, here)."""
        codec = self._endpoint.codec
        while True:
            msg = decode(codec, await self._sock.recv_multipart())
            waiter = self._waiters.get(match_id(msg) or "")
            if waiter is not None:
                waiter.put_nowait(msg)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
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
