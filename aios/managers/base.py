"""What every manager process shares (after ZeroMQ's Paranoid Pirate worker).

A manager is written by declaring its ops, never by touching sockets:

    class EchoArgs(BaseModel):
        text: str

    class EchoManager(Manager):
        service = "echo"
        capacity = 4

        @op(EchoArgs, idempotent=True)
        def echo(self, args: EchoArgs, ctx: RequestContext) -> dict:
            return {"text": args.text}

The base connects a DEALER to the scheduler's backend, announces
READY(service, capacity, incarnation, ops), heartbeats, validates each
request's body with the op's pydantic model, runs handlers on a pool of
`capacity` threads (so the socket loop keeps heartbeating while a long
handler runs), and turns exceptions into error replies. Handlers may stream
partial replies (`ctx.partial`) and, for preemptible ops, hand a request back
to the scheduler by returning `Yield`.
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import zmq
from pydantic import BaseModel, ValidationError

from aios.config import Config
from aios.protocol import Codec, ErrorCode, Kind, ProtocolError, Status, error_body
from aios.rundir import RunDir
from aios.zmqio import NOBLOCK, recv_multipart, send_multipart

log = logging.getLogger("aios.manager")


class OpError(Exception):
    """Raise from a handler to answer with a specific error code."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message


@dataclass(frozen=True)
class Yield:
    """Returned by a preemptible handler whose slice ran out: re-queue the request.

    `affinity` says this manager keeps the request's saved context, so the
    scheduler must bring it back here.
    """

    affinity: bool = True


@dataclass(frozen=True)
class OpSpec:
    name: str
    func: Callable[..., Any]
    args_model: type[BaseModel] | None
    idempotent: bool
    preemptible: bool


def op(args_model: type[BaseModel] | None = None, *, name: str | None = None,
       idempotent: bool = False, preemptible: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a method as a syscall handler.

    idempotent: safe to run again if its manager dies mid-way (the scheduler re-queues it).
    preemptible: the handler honours `ctx.slice` and may return `Yield`.
    """

    def mark(func: Callable[..., Any]) -> Callable[..., Any]:
        func.__aios_op__ = OpSpec(name or func.__name__, func, args_model, idempotent, preemptible)  # type: ignore[attr-defined]
        return func

    return mark


def request_key(rid: str, client: bytes) -> str:
    """A request's identity on a manager (ids are unique per agent connection); a string,
    so managers can use it to name what they keep for the request."""
    return rid + "\0" + client.hex()


@dataclass
class RequestContext:
    """What a handler knows about the request it serves."""

    id: str
    client: bytes
    agent: str
    op: str
    attempt: int
    resume: bool
    slice: int | None
    deadline: float | None
    target: str | None
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: int = 0  # service units consumed in this run (LLM tokens), reported to the policy
    _send: Callable[[dict[str, Any], Any], None] | None = None

    def partial(self, body: Any) -> None:
        """Stream a partial reply to the agent now."""
        if self._send is not None:
            self._send({"status": Status.PARTIAL.value}, body)

    @property
    def key(self) -> str:
        return request_key(self.id, self.client)


class Manager:
    """Base class of every manager. Subclasses set `service`, `capacity` and declare ops."""

    service: ClassVar[str]
    capacity: ClassVar[int] = 1

    def __init__(self, name: str, run_dir: RunDir, config: Config, options: dict[str, Any] | None = None,
                 capacity: int | None = None) -> None:
        self.name = name
        self.run_dir = run_dir
        self.config = config
        self.options = options or {}
        if capacity is not None:
            self.capacity = capacity  # type: ignore[misc]
        self.log = logging.getLogger(f"aios.{name}")
        self.incarnation = f"{os.getpid()}-{int(time.time() * 1000)}"
        self.ops: dict[str, OpSpec] = self._collect_ops()
        self.models: list[str] = []
        self.default_model = False
        self._stopping = threading.Event()
        self._active: dict[str, RequestContext] = {}
        self._lock = threading.Lock()

    @classmethod
    def _op_specs(cls) -> dict[str, OpSpec]:
        specs: dict[str, OpSpec] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                spec = getattr(attr, "__aios_op__", None)
                if isinstance(spec, OpSpec):
                    specs[spec.name] = spec
        return specs

    def _collect_ops(self) -> dict[str, OpSpec]:
        return self._op_specs()

    # ------------------------------------------------------------- hooks
    def setup(self) -> None:
        """Acquire resources (load a model, open a database) before READY."""

    def teardown(self) -> None:
        """Release resources on the way out."""

    def on_cancel(self, ctx: RequestContext) -> None:
        """A running request was cancelled (agent gone, deadline): `ctx.cancelled` is already set."""

    def on_forget(self, key: str) -> None:
        """A request that is not running here was cancelled: drop anything kept for it
        (e.g. a preempted generation's saved context). `key` is `RequestContext.key`."""

    # -------------------------------------------------------------- loop
    def serve(self) -> None:
        k = self.config.kernel
        self.codec = Codec(self.run_dir.load_key())
        self.ctx = zmq.Context()
        self._results = self.ctx.socket(zmq.PULL)
        self._results.bind(f"inproc://results-{id(self)}")
        self._local = threading.local()
        self.pool = ThreadPoolExecutor(max_workers=self.capacity, thread_name_prefix=self.name)
        self.sock = self._connect()
        hb_interval, hb_expiry = k.heartbeat_interval_s, k.heartbeat_interval_s * k.heartbeat_liveness
        last_heard = last_sent = time.monotonic()
        self._send_ready()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._results, zmq.POLLIN)
        self.log.info("serving %s (capacity %d, ops %s)", self.service, self.capacity, sorted(self.ops))
        while not self._stopping.is_set():
            events = dict(poller.poll(int(hb_interval * 250)))
            now = time.monotonic()
            if self._results in events:
                while True:
                    try:
                        frames = recv_multipart(self._results, NOBLOCK)
                    except zmq.Again:
                        break
                    self._send_frames(frames)
                    last_sent = now
            if self.sock in events:
                while True:
                    try:
                        frames = recv_multipart(self.sock, NOBLOCK)
                    except zmq.Again:
                        break
                    last_heard = now
                    self._on_message(frames)
            if now - last_heard > hb_expiry:
                # The scheduler went quiet (restarting?): announce ourselves again.
                self.log.warning("no word from the scheduler for %.1fs; re-announcing", now - last_heard)
                self._send_ready()
                last_heard = last_sent = now
            elif now - last_sent >= hb_interval:
                self._send_frames(self.codec.encode({"kind": Kind.HEARTBEAT.value}))
                last_sent = now
        self._shutdown()

    def stop(self) -> None:
        self._stopping.set()

    def _connect(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.name.encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.config.kernel.high_water_mark)
        sock.setsockopt(zmq.RCVHWM, self.config.kernel.high_water_mark)
        self.run_dir.secure_client(sock, self.config)
        sock.connect(self.run_dir.backend_endpoint(self.config))
        return sock

    def _send_frames(self, frames: list[bytes]) -> None:
        try:
            send_multipart(self.sock, frames, NOBLOCK)
        except zmq.Again:
            self.log.warning("scheduler not accepting messages; dropped one")

    def _send_ready(self) -> None:
        with self._lock:
            busy = len(self._active)
        self._send_frames(self.codec.encode({
            "kind": Kind.READY.value, "name": self.name, "service": self.service,
            "capacity": self.capacity, "incarnation": self.incarnation, "pid": os.getpid(),
            "busy": busy, "models": self.models, "default": self.default_model,
            "ops": {n: {"idempotent": s.idempotent, "preemptible": s.preemptible} for n, s in self.ops.items()},
        }))

    def _shutdown(self) -> None:
        self._send_frames(self.codec.encode({"kind": Kind.DISCONNECT.value}))
        for ctx in list(self._active.values()):
            ctx.cancelled.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.teardown()
        self.sock.close(0)
        self._results.close(0)
        self.ctx.term()

    # ---------------------------------------------------------- messages
    def _on_message(self, frames: list[bytes]) -> None:
        try:
            msg = self.codec.decode(frames)
        except ProtocolError as exc:
            self.log.warning("rejected frame from scheduler: %s", exc.message)
            return
        h = msg.header
        kind = h.get("kind")
        if kind == Kind.REQUEST.value:
            self._on_request(h, msg)
        elif kind == Kind.REREGISTER.value:
            self._send_ready()
        elif kind == Kind.CANCEL.value:
            key = request_key(str(h.get("id")), h.get("client") or b"")
            with self._lock:
                ctx = self._active.get(key)
            if ctx is not None:
                ctx.cancelled.set()
                self.on_cancel(ctx)
            else:
                self.on_forget(key)

    def _on_request(self, h: dict[str, Any], msg: Any) -> None:
        deadline = h.get("deadline")
        ctx = RequestContext(
            id=str(h.get("id")), client=h.get("client") or b"", agent=str(h.get("agent", "")),
            op=str(h.get("op")), attempt=int(h.get("attempt", 1)), resume=bool(h.get("resume")),
            slice=h.get("slice"), target=h.get("target"),
            deadline=time.monotonic() + deadline if isinstance(deadline, (int, float)) else None,
        )
        ctx._send = lambda header, body, c=ctx: self._post(c, header, body)
        spec = self.ops.get(ctx.op)
        if spec is None:
            return self._post(ctx, {"status": Status.ERROR.value},
                              error_body(ErrorCode.UNKNOWN_OP, f"service {self.service!r} has no op {ctx.op!r}; ops: {sorted(self.ops)}"))
        try:
            body = msg.body
            if not isinstance(body, dict):
                raise OpError(ErrorCode.INVALID_ARGUMENT, "the syscall body must be a map of arguments")
            args = spec.args_model.model_validate(body) if spec.args_model else body
        except ProtocolError as exc:
            return self._post(ctx, {"status": Status.ERROR.value}, error_body(exc.code, exc.message))
        except OpError as exc:
            return self._post(ctx, {"status": Status.ERROR.value}, error_body(exc.code, exc.message))
        except ValidationError as exc:
            return self._post(ctx, {"status": Status.ERROR.value},
                              error_body(ErrorCode.INVALID_ARGUMENT, f"{self.service}.{ctx.op}: {_describe(exc)}"))
        with self._lock:
            self._active[ctx.key] = ctx
        self.pool.submit(self._run, spec, args, ctx)

    def _run(self, spec: OpSpec, args: Any, ctx: RequestContext) -> None:
        header: dict[str, Any]
        try:
            result = spec.func(self, args, ctx)
            if isinstance(result, Yield):
                header, body = {"kind": Kind.YIELD.value, "affinity": result.affinity}, None
            else:
                if isinstance(result, BaseModel):
                    result = result.model_dump(mode="json")
                header, body = {"status": Status.OK.value}, result
        except OpError as exc:
            header, body = {"status": Status.ERROR.value}, error_body(exc.code, exc.message)
        except ValidationError as exc:
            header, body = {"status": Status.ERROR.value}, error_body(ErrorCode.INVALID_ARGUMENT, _describe(exc))
        except Exception as exc:
            self.log.exception("op %s failed", ctx.op)
            header, body = {"status": Status.ERROR.value}, error_body(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        with self._lock:
            self._active.pop(ctx.key, None)
        header["tokens"] = ctx.tokens
        self._post(ctx, header, body)

    def _post(self, ctx: RequestContext, header: dict[str, Any], body: Any) -> None:
        """Send a reply from any thread (through the inproc results socket)."""
        header.setdefault("kind", Kind.REPLY.value)
        header["id"], header["client"] = ctx.id, ctx.client
        frames = self.codec.encode(header, body)
        if threading.current_thread() is threading.main_thread():
            self._send_frames(frames)
            return
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._local.push = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"inproc://results-{id(self)}")
        sock.send_multipart(frames)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ())) or "arguments"
        parts.append(f"{where}: {err.get('msg')}")
    return "invalid arguments: " + "; ".join(parts)


def load_manager_class(target: str) -> type[Manager]:
    """Import 'package.module:ClassName' and check it is a Manager."""
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import manager module {module_name!r}: {exc}") from None
    except Exception as exc:  # the module itself is broken: say so in one line, not a traceback
        raise ValueError(f"manager module {module_name!r} failed to import: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Manager)):
        raise ValueError(f"{target!r} is not a aios.managers.base.Manager subclass")
    if not getattr(cls, "service", None):
        raise ValueError(f"{target!r} does not set a service name")
    return cls


def build_manager(name: str, run_dir: RunDir, config: Config) -> Manager:
    core = config.llm_core(name)
    if core is not None:
        from aios.managers.llm.core import LLMCore
        return LLMCore(name, run_dir, config, core)
    spec = config.manager(name)
    if spec is None:
        raise ValueError(f"no manager named {name!r} in the configuration")
    cls = load_manager_class(spec.target)
    return cls(name, run_dir, config, spec.options, spec.capacity)
