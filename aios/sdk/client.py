"""The Agent SDK: system calls from an agent process to the kernel.

    from aios import sdk
    with sdk.connect(agent="researcher") as aios:
        aios.call("kernel", "ping")
        reply = aios.request("llm", "chat", {"messages": [...]}, on_partial=print)

Each call is signed, sent over a DEALER socket to the scheduler's frontend and
matched to its reply by request id. Idempotent calls are retried with backoff
when the kernel does not answer (the same request id is re-sent, so the
scheduler never runs a request twice while it is still pending), and calls
that failed with a retryable error (its manager died, overloaded) are retried
under a new id. Failures raise typed exceptions from `aios.sdk.errors`.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import zmq
import zmq.asyncio

from aios.config import Config
from aios.protocol import Codec, Kind, Message, ProtocolError, Status, new_request_id
from aios.rundir import RunDir
from aios.sdk.errors import AIOSError, KernelNotRunning, KernelTimeout, error_from_body
from aios.zmqio import recv_multipart, send_multipart

log = logging.getLogger("aios.sdk")

#: ops known to be safe to repeat without the caller saying so
IDEMPOTENT_OPS = {("kernel", "ping"), ("kernel", "status")}
DEFAULT_TIMEOUT_S = 120.0
#: after the call's own deadline, how long to wait for the kernel's DEADLINE_EXCEEDED verdict
#: (the kernel's clock for a request starts when it arrives, a little after ours)
DEADLINE_GRACE_S = 0.25


@dataclass
class Reply:
    """A final reply: the result plus what the scheduler measured about the call."""

    result: Any
    header: dict[str, Any]
    partials: list[Any] = field(default_factory=list)

    @property
    def timing(self) -> dict[str, Any]:
        return self.header.get("timing", {})


PartialHandler = Callable[[Any], None]


class _Endpoint:
    """Run directory → signing codec and frontend address."""

    def __init__(self, run_dir: str | Path | RunDir | None) -> None:
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        try:
            key = self.run_dir.load_key()
            config: Config = self.run_dir.load_config()
        except FileNotFoundError as exc:
            raise KernelNotRunning("UNAVAILABLE", str(exc), retryable=True) from None
        self.codec = Codec(key)
        self.config = config
        self.address = self.run_dir.frontend_endpoint(config)


def _configure(sock: zmq.Socket, endpoint: _Endpoint) -> None:
    endpoint.run_dir.secure_client(sock, endpoint.config)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 50)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)


class Client:
    """A synchronous kernel connection. One thread at a time; open one per thread."""

    def __init__(self, run_dir: str | Path | RunDir | None = None, agent: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S, retry_interval: float = 1.0) -> None:
        self.agent = agent or f"agent-{os.getpid()}"
        self.timeout = timeout
        self.retry_interval = retry_interval
        self._endpoint = _Endpoint(run_dir)
        self.run_dir = self._endpoint.run_dir
        self._ctx = zmq.Context.instance()
        self._sock = self._open()
        self._rcvtimeo = -1  # the socket's RCVTIMEO in ms, set by _wait only when it changes

    def _open(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        _configure(sock, self._endpoint)
        sock.connect(self._endpoint.address)
        return sock

    # ----------------------------------------------------------------- API
    def call(self, service: str, op: str, /, **args: Any) -> Any:
        """Make a system call and return its result."""
        return self.request(service, op, args).result

    def request(self, service: str, op: str, args: dict[str, Any] | None = None, *,
                timeout: float | None = None, idempotent: bool | None = None, target: str | None = None,
                on_partial: PartialHandler | None = None) -> Reply:
        """The full form of `call`: per-call timeout, retry policy, model target, streaming.

        `on_partial` receives each partial reply body as it arrives; a body
        {"reset": True} means the kernel restarted the call (its manager died)
        and what was streamed so far should be discarded.
        """
        timeout = self.timeout if timeout is None else timeout
        if idempotent is None:
            idempotent = (service, op) in IDEMPOTENT_OPS
        deadline = time.monotonic() + timeout
        backoff = self.retry_interval
        while True:
            try:
                return self._attempt(service, op, args or {}, deadline, idempotent, target, on_partial)
            except AIOSError as exc:
                if not (idempotent and exc.retryable) or time.monotonic() + backoff >= deadline:
                    raise
                log.info("retrying %s.%s after %s", service, op, exc.code)
                time.sleep(backoff)
                backoff = min(backoff * 2, 8.0)

    def _attempt(self, service: str, op: str, args: dict[str, Any], deadline: float, idempotent: bool,
                 target: str | None, on_partial: PartialHandler | None) -> Reply:
        rid = new_request_id()
        header = {"kind": Kind.REQUEST.value, "id": rid, "agent": self.agent, "service": service, "op": op}
        if target is not None:
            header["target"] = target
        partials: list[Any] = []
        resend_every = self.retry_interval
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KernelTimeout("TIMEOUT", f"{service}.{op}: no answer from the kernel at "
                                    f"{self.run_dir.path} within the timeout")
            header["deadline"] = remaining
            send_multipart(self._sock, self._endpoint.codec.encode(header, args))
            wait = min(resend_every, remaining) if idempotent else remaining
            if wait >= remaining:
                wait += DEADLINE_GRACE_S
            wait_until = time.monotonic() + wait
            reply = self._wait(rid, wait_until, partials, on_partial)
            if reply is not None:
                return reply
            # No answer: re-send the same id (the scheduler ignores it if still pending).
            resend_every = min(resend_every * 2, 8.0)
            log.info("no answer to %s.%s yet; re-sending", service, op)

    def _wait(self, rid: str, until: float, partials: list[Any], on_partial: PartialHandler | None) -> Reply | None:
        while True:
            remaining_ms = int((until - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return None
            # A blocking receive with a timeout: half the system calls of zmq_poll + receive.
            # (RCVTIMEO is a C int: wait at most an hour at a time; the loop goes on after.)
            remaining_ms = min(remaining_ms, 3_600_000)
            if remaining_ms != self._rcvtimeo:
                self._sock.setsockopt(zmq.RCVTIMEO, remaining_ms)
                self._rcvtimeo = remaining_ms
            try:
                frames = recv_multipart(self._sock)
            except zmq.Again:
                continue  # timed out: the check above ends the wait
            result = _match(_decode(self._endpoint.codec, frames), rid, partials, on_partial)
            if result is not None:
                return result

    def chat(self, messages: list[dict[str, Any]] | str, *, model: str | None = None, op: str = "chat",
             on_token: Callable[[str], None] | None = None, timeout: float | None = None, **options: Any) -> Reply:
        """`llm.chat` (or `op="json"` / `op="tools"`): the kernel's model answers `messages`.

        A plain string is one user message. `on_token` streams the answer's
        text as it is generated. Options: temperature, max_tokens, stop, seed,
        json_schema, tools. The result is {message, finish_reason, usage, ...};
        `Reply.timing` says how long the call waited and ran.
        """
        args = _chat_args(messages, model, on_token is not None, options)
        return self.request("llm", op, args, target=model, timeout=timeout, idempotent=True,
                            on_partial=_token_sink(on_token))

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _chat_args(messages: list[dict[str, Any]] | str, model: str | None, stream: bool,
               options: dict[str, Any]) -> dict[str, Any]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    args = {"messages": messages, "stream": stream, **options}
    if model is not None:
        args["model"] = model
    return args


def _token_sink(on_token: Callable[[str], None] | None) -> PartialHandler | None:
    if on_token is None:
        return None

    def handle(body: Any) -> None:
        if isinstance(body, dict) and isinstance(body.get("delta"), str):
            on_token(body["delta"])

    return handle


def _decode(codec: Codec, frames: list[bytes]) -> Message | None:
    try:
        return codec.decode(frames)
    except ProtocolError as exc:
        log.warning("dropped a reply: %s", exc.message)
        return None


def _match(msg: Message | None, rid: str, partials: list[Any], on_partial: PartialHandler | None) -> Reply | None:
    """Return a Reply if `msg` is the final answer to `rid`, raise if it is an error, else None."""
    if msg is None:
        return None
    h = msg.header
    if h.get("id") != rid:
        if h.get("id") is None and h.get("status") == Status.ERROR.value:
            log.warning("kernel rejected a frame: %s", msg.body)
        return None  # a stale reply to an earlier attempt
    status = h.get("status")
    if status == Status.PARTIAL.value:
        body = {"reset": True} if h.get("reset") else msg.body
        if h.get("reset"):
            partials.clear()
        else:
            partials.append(body)
        if on_partial is not None:
            on_partial(body)
        return None
    if status == Status.ERROR.value:
        raise error_from_body(msg.body)
    return Reply(msg.body, h, partials)


class AsyncClient:
    """An asyncio kernel connection; many tasks may call concurrently."""

    def __init__(self, run_dir: str | Path | RunDir | None = None, agent: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S, retry_interval: float = 1.0) -> None:
        self.agent = agent or f"agent-{os.getpid()}"
        self.timeout = timeout
        self.retry_interval = retry_interval
        self._endpoint = _Endpoint(run_dir)
        self.run_dir = self._endpoint.run_dir
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        _configure(self._sock, self._endpoint)
        self._sock.connect(self._endpoint.address)
        self._waiters: dict[str, tuple[asyncio.Queue[Message], list[Any], PartialHandler | None]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def call(self, service: str, op: str, /, **args: Any) -> Any:
        return (await self.request(service, op, args)).result

    async def request(self, service: str, op: str, args: dict[str, Any] | None = None, *,
                      timeout: float | None = None, idempotent: bool | None = None, target: str | None = None,
                      on_partial: PartialHandler | None = None) -> Reply:
        timeout = self.timeout if timeout is None else timeout
        if idempotent is None:
            idempotent = (service, op) in IDEMPOTENT_OPS
        deadline = time.monotonic() + timeout
        backoff = self.retry_interval
        while True:
            try:
                return await self._attempt(service, op, args or {}, deadline, idempotent, target, on_partial)
            except AIOSError as exc:
                if not (idempotent and exc.retryable) or time.monotonic() + backoff >= deadline:
                    raise
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 8.0)

    async def chat(self, messages: list[dict[str, Any]] | str, *, model: str | None = None, op: str = "chat",
                   on_token: Callable[[str], None] | None = None, timeout: float | None = None,
                   **options: Any) -> Reply:
        """Async `llm.chat`; see `Client.chat`."""
        args = _chat_args(messages, model, on_token is not None, options)
        return await self.request("llm", op, args, target=model, timeout=timeout, idempotent=True,
                                  on_partial=_token_sink(on_token))

    async def _attempt(self, service: str, op: str, args: dict[str, Any], deadline: float, idempotent: bool,
                       target: str | None, on_partial: PartialHandler | None) -> Reply:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read())
        rid = new_request_id()
        header = {"kind": Kind.REQUEST.value, "id": rid, "agent": self.agent, "service": service, "op": op}
        if target is not None:
            header["target"] = target
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        partials: list[Any] = []
        self._waiters[rid] = (inbox, partials, on_partial)
        resend_every = self.retry_interval
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise KernelTimeout("TIMEOUT", f"{service}.{op}: no answer from the kernel within the timeout")
                header["deadline"] = remaining
                await self._sock.send_multipart(self._endpoint.codec.encode(header, args))
                wait = min(resend_every, remaining) if idempotent else remaining
                if wait >= remaining:
                    wait += DEADLINE_GRACE_S
                until = time.monotonic() + wait
                while True:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        msg = await asyncio.wait_for(inbox.get(), left)
                    except asyncio.TimeoutError:
                        break
                    reply = _match(msg, rid, partials, on_partial)
                    if reply is not None:
                        return reply
                resend_every = min(resend_every * 2, 8.0)
        finally:
            self._waiters.pop(rid, None)

    async def _read(self) -> None:
        """Route every incoming reply to the task waiting for its id."""
        while True:
            msg = _decode(self._endpoint.codec, await self._sock.recv_multipart())
            rid = msg.header.get("id") if msg is not None else None
            waiter = self._waiters.get(rid) if isinstance(rid, str) else None
            if waiter is not None:
                waiter[0].put_nowait(msg)  # decoded once, here

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
