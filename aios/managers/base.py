"""What every manager process shares (after ZeroMQ's Paranoid Pirate worker).

A manager is written by declaring its ops, never by touching sockets:

    class EchoArgs(BaseModel):
        text: str

    class EchoManager(Manager):
        service = "echo"
        capacity = 4

        class Options(BaseModel):          # its settings, validated at aios-start
            shout: bool = False

        @op(EchoArgs, idempotent=True)
        def echo(self, args: EchoArgs, ctx: RequestContext) -> dict:
            return {"text": args.text.upper() if self.options.shout else args.text}

The base connects a DEALER to the scheduler's backend under an unguessable
routing id, announces READY(service, capacity, incarnation, ops, targets),
heartbeats (saying how many requests it runs), validates each request's
body with the op's pydantic model, runs handlers on a pool of `capacity`
threads (so the socket loop keeps heartbeating while a long handler runs),
and turns exceptions into error replies. Handlers may stream partial
replies (`ctx.partial`), hand a preemptible request back to the scheduler by
returning `Preempt`, and call other services on behalf of the same agent
(`ctx.call`), which the scheduler queues and charges like the agent's own.

Quick ops that never block may be declared `inline`: they run on the socket
thread itself, in arrival order, with no hand-off to the pool (a hand-off and
the reply's way back cost a small op about as much as its work: the storage
manager measured 2,300 small writes/s through the pool, 3,400 inline). The
requests that arrive together form a batch, closed by the `end_batch` hook
before their replies go out; an inline handler may return `Deferred` to be
answered only then, which is how the storage manager commits the writes of a
batch in one transaction (4,600 writes/s). Upkeep that should not delay an
answer goes in the `housekeeping` hook: it runs on the socket thread after a
batch's replies went out, and when the socket was quiet for a poll interval
(the storage manager applies its full-text index log there).
"""
from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import zmq
from pydantic import BaseModel, ConfigDict, ValidationError
from zmq.utils.monitor import recv_monitor_message

from aios import messages
from aios.config import Config, ManagerSpec
from aios.protocol import Codec, ErrorCode, Message, ProtocolError, Status, error_body
from aios.rundir import RunDir
from aios.sockets import dealer
from aios.zmqio import NOBLOCK, recv_multipart, send_multipart

log = logging.getLogger("aios.manager")

_OK, _ERROR = Status.OK.value, Status.ERROR.value
#: default time a handler's call may take when the request it serves has no deadline
DEFAULT_CALL_TIMEOUT_S = 300.0
#: how often a handler waiting on a call checks whether its own request was cancelled
CALL_POLL_S = 0.05
_LOST = object()  # put in a waiting call's inbox when the scheduler connection drops
#: most messages read from the scheduler before the loop looks at its other sockets and clocks
MAX_BATCH_MESSAGES = 256


class OpError(Exception):
    """Raise from a handler to answer with a specific error code."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message


@dataclass(frozen=True)
class Preempt:
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
    inline: bool | Callable[[Any], bool] = False


@dataclass(frozen=True)
class Deferred:
    """Returned by an inline handler whose answer is known only once its batch ends.

    Once the batch's last request is handled, the base calls the manager's
    `end_batch(tokens)` with the `token` of each deferred request, then
    `finish()` for each; what `finish` returns (or raises) is the reply.
    """

    finish: Callable[[], Any]
    token: Any = None


def op(args_model: type[BaseModel] | None = None, *, name: str | None = None,
       idempotent: bool = False, preemptible: bool = False,
       inline: bool | Callable[[Any], bool] = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a method as a syscall handler.

    idempotent: safe to run again if its manager dies mid-way (the scheduler re-queues it).
    preemptible: the handler honours `ctx.slice` and may return `Preempt`.
    inline: run on the socket thread, never on the pool: only for handlers that take well
        under a millisecond or so and never wait (no `ctx.call`, no `Preempt`); may return `Deferred`.
        A function of the validated arguments decides per request (e.g. small writes inline,
        large ones on the pool).
    """
    if inline is not False and preemptible:
        raise ValueError("an inline op cannot be preemptible: it runs on the socket thread")

    def mark(func: Callable[..., Any]) -> Callable[..., Any]:
        func.__aios_op__ = OpSpec(name or func.__name__, func, args_model, idempotent, preemptible,  # type: ignore[attr-defined]
                                  inline)
        return func

    return mark


def request_key(rid: str, client: bytes) -> str:
    """A request's identity on a manager (ids are unique per caller connection); a string,
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
    caller: str | None = None  # service of the manager that made this call; None when an agent did
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: int = 0  # service units consumed in this run (LLM tokens), reported to the policy
    _manager: "Manager | None" = field(default=None, repr=False)

    def partial(self, body: Any) -> None:
        """Stream a partial reply to the caller now."""
        if self._manager is not None:
            self._manager._post(self, {"status": Status.PARTIAL.value}, body)

    def call(self, service: str, op: str, /, *, target: str | None = None, timeout: float | None = None,
             idempotent: bool = False, **args: Any) -> Any:
        """Call another service on behalf of this request's agent; return its result.

        The call goes through the scheduler (queued, scheduled and charged like
        the agent's own), within this request's deadline. Failures raise
        `OpError` with the callee's code, so an unhandled one becomes this
        request's error. A call that would form a cycle (a service waiting on
        itself) is refused with CALL_CYCLE. `idempotent=True` lets it be
        re-sent when no answer comes and retried after a retryable error,
        like an agent's idempotent call.
        """
        if self._manager is None:
            raise OpError(ErrorCode.INTERNAL, "this request context cannot make calls")
        return self._manager._service_call(self, service, op, args, target, timeout, idempotent)

    @property
    def key(self) -> str:
        return request_key(self.id, self.client)


@dataclass(frozen=True)
class _Failed:
    body: dict[str, Any]  # error_body(...)


class _NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Manager:
    """Base class of every manager. Subclasses set `service`, `capacity` and declare ops.

    `Options` is the pydantic model of the manager's settings (the options of
    its configuration entry); `self.options` is the validated instance.
    `targets`, `default_target`, `limits` and `idempotent_targets` are what
    READY announces (set them in `setup`): the named resources this manager
    serves, whether it serves requests that name none, per-target concurrency
    limits, and the targets whose requests are safe to repeat whatever the op.
    """

    service: ClassVar[str]
    capacity: ClassVar[int] = 1
    #: threads for the ops that run on the pool; None: `capacity` (every request in hand may need one).
    #: A manager whose common ops run inline can hold more requests than it needs threads.
    pool_threads: ClassVar[int | None] = None
    Options: ClassVar[type[BaseModel]] = _NoOptions

    def __init__(self, name: str, run_dir: RunDir, config: Config, options: BaseModel | None = None,
                 capacity: int | None = None) -> None:
        self.name = name
        self.run_dir = run_dir
        self.config = config
        self.options: Any = options if options is not None else self.Options()
        if capacity is not None:
            self.capacity = capacity  # type: ignore[misc]
        self.log = logging.getLogger(f"aios.{name}")
        self.incarnation = f"{os.getpid()}-{int(time.time() * 1000)}"
        # An unguessable routing id per incarnation: nobody can claim it to receive this manager's work.
        self.identity = f"{name}.{secrets.token_hex(8)}".encode()
        self.ops: dict[str, OpSpec] = self.op_specs()
        self.targets: list[str] = []
        self.default_target = False
        self.limits: dict[str, int] = {}
        self.idempotent_targets: list[str] = []
        self.health = "ok"
        self.health_detail = ""
        self._stopping = threading.Event()
        self._active: dict[str, RequestContext] = {}
        self._calls: dict[str, "queue.Queue[Any]"] = {}
        self._lock = threading.Lock()

    @classmethod
    def default_memory_limit_mb(cls, options: Any, config: Config) -> int | None:
        """The resident memory above which the supervisor kills and restarts this manager, when its
        configuration sets none (`memory_limit_mb`). None: no limit."""
        return None

    @classmethod
    def op_specs(cls) -> dict[str, OpSpec]:
        specs: dict[str, OpSpec] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                spec = getattr(attr, "__aios_op__", None)
                if isinstance(spec, OpSpec):
                    specs[spec.name] = spec
        return specs

    # ------------------------------------------------------------- hooks
    def setup(self) -> None:
        """Acquire resources (load a model, open a database) before READY."""

    def teardown(self) -> None:
        """Release resources on the way out."""

    def on_cancel(self, ctx: RequestContext) -> None:
        """A running request was cancelled (agent gone, deadline): `ctx.cancelled` is already set."""

    def end_batch(self, tokens: list[Any]) -> None:
        """The requests that arrived together have all been handled: finish what inline handlers
        deferred (e.g. commit their writes); `tokens` are their `Deferred.token`s.

        Runs on the socket thread, before any `Deferred` is finished; a handler that ran on the
        pool and returned `Deferred` gets a batch of its own, closed on its pool thread. An
        exception here is logged, and each deferred request's `finish` decides its reply.
        (Closing batches on a thread of their own, so that the socket thread reads the next
        batch meanwhile, measured slower: 3,500-3,800 small writes/s against 4,700, the two
        threads handing the GIL to each other costing more than the overlap gains.)"""

    def on_forget(self, key: str) -> None:
        """A request that is not running here was cancelled: drop anything kept for it
        (e.g. a preempted generation's saved context). `key` is `RequestContext.key`."""

    def housekeeping(self, idle: bool) -> None:
        """Deferred upkeep, on the socket thread: after each batch of requests once their replies
        have gone out (`idle` False: keep it short, the next batch waits meanwhile), and when no
        message came for a poll interval (`idle` True). An exception here is logged."""

    # ------------------------------ the kernel around it: configuration rules, the standard `status` op
    @classmethod
    def check_kernel(cls, spec: ManagerSpec, options: Any, config: Config) -> list[str]:
        """Problems with how this manager fits the rest of the configuration, for rules that span
        managers (memory keeps its entries in storage, so `[storage]` must be on): one line each,
        naming its place in the file (`spec.where`). Run for every configured manager once its
        options validated (`aios.managers.runner.resolve_managers`: `aios config check`, start).
        Default: none."""
        return []

    @classmethod
    def complete_options(cls, spec: ManagerSpec, options: Any, config: Config) -> Any:
        """The validated options completed from the whole configuration, decided once where every
        manager is visible (which LLM core serves requests that name no model), so that a running
        manager never reads its siblings' settings. Default: unchanged."""
        return options

    class StatusArgs(BaseModel):
        """`per_target`: the scheduler's view of this manager's targets ({target: {limit, running,
        queued}}); `aios status` passes it in, as only the scheduler knows what is queued."""

        model_config = ConfigDict(extra="forbid")
        per_target: dict[str, dict[str, int]] | None = None

    @op(StatusArgs, idempotent=True)
    def status(self, args: "Manager.StatusArgs", ctx: RequestContext) -> dict[str, Any]:
        """The op every manager answers, for `aios status -v`: its figures (`status_figures`, with
        `per_target` when given) and "summary", the one line that describes them (`status_line`)."""
        figures = dict(self.status_figures())
        if args.per_target is not None:
            figures["per_target"] = args.per_target
        try:
            summary = self.status_line(figures)
        except (KeyError, TypeError, ValueError, AttributeError):  # figures of an unexpected shape
            self.log.exception("status_line failed; showing the generic line")
            summary = Manager.status_line(self, figures)
        return {**figures, "summary": summary}

    def status_figures(self) -> dict[str, Any]:
        """This manager's own figures (`aios status --json -v`); never an agent's data. Default: none."""
        return {}

    def status_line(self, figures: dict[str, Any]) -> str:
        """`figures` as one line: what an operator needs at a glance, not every counter."""
        return f"{self.service} service, capacity {self.capacity}; ops: {', '.join(sorted(self.ops))}"

    # -------------------------------------------------------------- loop
    def serve(self) -> None:
        k = self.config.kernel
        self.codec = Codec(self.run_dir.load_key())
        self.zctx = zmq.Context()
        self._results = self.zctx.socket(zmq.PULL)
        self._results.bind(f"inproc://results-{id(self)}")
        self._local = threading.local()
        self._loop_thread = threading.current_thread()
        self._deferred: list[tuple[RequestContext, Deferred]] = []
        self.pool = ThreadPoolExecutor(max_workers=min(self.pool_threads or self.capacity, self.capacity),
                                       thread_name_prefix=self.name)
        self.sock = dealer(self.zctx, self.run_dir, self.config, role="manager", identity=self.identity)
        # The connection monitor tells us at once when the scheduler goes away and comes back, so we
        # re-register within milliseconds of its restart instead of after a heartbeat expiry.
        monitor = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(self.run_dir.backend_endpoint(self.config))
        hb_interval, hb_expiry = k.heartbeat_interval_s, k.heartbeat_interval_s * k.heartbeat_liveness
        last_heard = last_beat = time.monotonic()
        self._send_ready()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._results, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        self.log.info("serving %s (capacity %d, ops %s)", self.service, self.capacity, sorted(self.ops))
        disconnected = False
        while not self._stopping.is_set():
            events = dict(poller.poll(int(hb_interval * 250)))
            now = time.monotonic()
            if monitor in events:
                while True:
                    try:
                        event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
                    except zmq.Again:
                        break
                    if event == zmq.EVENT_DISCONNECTED:
                        disconnected = True
                        for inbox in list(self._calls.values()):
                            inbox.put(_LOST)  # calls in flight: re-send or fail, as the engine decides
                    elif event == zmq.EVENT_CONNECTED and disconnected:
                        disconnected = False
                        self.log.info("scheduler connection back; announcing READY")
                        self._send_ready()
                        last_heard = last_beat = now
            if self._results in events:
                while True:
                    try:
                        frames = recv_multipart(self._results, NOBLOCK)
                    except zmq.Again:
                        break
                    self._send_frames(frames)
            if self.sock in events:
                # Everything already queued is one batch (bounded, so heartbeats keep their rhythm).
                for _ in range(MAX_BATCH_MESSAGES):
                    try:
                        frames = recv_multipart(self.sock, NOBLOCK)
                    except zmq.Again:
                        break
                    last_heard = now
                    self._on_message(frames)
                if self._deferred:
                    self._finish_deferred()
                self._housekeeping(False)
            elif not events:
                self._housekeeping(True)
            if now - last_heard > hb_expiry:
                # The scheduler went quiet (restarting?): announce ourselves again.
                self.log.warning("no word from the scheduler for %.1fs; re-announcing", now - last_heard)
                self._send_ready()
                last_heard = last_beat = now
            elif now - last_beat >= hb_interval:
                # Beat on a fixed rhythm even while replies flow: it lists the requests running here,
                # which is how the scheduler's view of our capacity heals after it restarts or
                # cancels a handler that is still winding down.
                self._send_frames(self._encode(messages.Heartbeat(running=self._running())))
                last_beat = now
        self.sock.disable_monitor()
        monitor.close(0)
        self._shutdown()

    def stop(self) -> None:
        self._stopping.set()

    def _housekeeping(self, idle: bool) -> None:
        try:
            self.housekeeping(idle)
        except Exception:  # noqa: BLE001 - upkeep must not take the socket loop down
            self.log.exception("housekeeping failed")

    def _running(self) -> list[messages.RunningEntry]:
        with self._lock:
            return [(c.client, c.id, c.target) for c in self._active.values()]

    def _encode(self, msg: Any, body: Any = None) -> list[bytes]:
        return self.codec.encode(msg.to_header(), body)

    def _send_frames(self, frames: list[bytes]) -> None:
        try:
            send_multipart(self.sock, frames, NOBLOCK)
        except zmq.Again:
            self.log.warning("scheduler not accepting messages; dropped one")

    def ready_message(self) -> messages.Ready:
        return messages.Ready(
            name=self.name, service=self.service, capacity=self.capacity, incarnation=self.incarnation,
            pid=os.getpid(), running=self._running(),
            ops={n: messages.OpInfo(s.idempotent, s.preemptible) for n, s in self.ops.items()},
            targets=list(self.targets), default=self.default_target, limits=dict(self.limits),
            idempotent_targets=list(self.idempotent_targets),
            health=self.health, detail=self.health_detail)

    def _send_ready(self) -> None:
        self._send_frames(self._encode(self.ready_message()))

    def set_health(self, health: str, detail: str = "") -> None:
        """Report "ok" or "degraded" (with why) to the scheduler; `aios status` shows it."""
        if (health, detail) != (self.health, self.health_detail):
            self.health, self.health_detail = health, detail
            if hasattr(self, "sock"):
                self._post_frames(self._encode(self.ready_message()))

    def _shutdown(self) -> None:
        self._send_frames(self._encode(messages.Disconnect("stopping")))
        for ctx in list(self._active.values()):
            ctx.cancelled.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.teardown()
        self.sock.close(0)
        self._results.close(0)
        self.zctx.term()

    # ---------------------------------------------------------- messages
    def _on_message(self, frames: list[bytes]) -> None:
        try:
            msg = self.codec.decode(frames)
            typed = messages.parse(msg.header, messages.FROM_SCHEDULER_TO_MANAGER)
        except ProtocolError as exc:
            self.log.warning("rejected frame from scheduler: %s", exc.message)
            return
        if isinstance(typed, messages.Dispatch):
            self._on_dispatch(typed, msg)
        elif isinstance(typed, messages.Reply):
            waiter = self._calls.get(typed.id or "")
            if waiter is not None:
                waiter.put(msg)
        elif isinstance(typed, messages.Cancel):
            key = request_key(typed.id, typed.client)
            with self._lock:
                ctx = self._active.get(key)
            if ctx is not None:
                ctx.cancelled.set()
                self.on_cancel(ctx)
            else:
                self.on_forget(key)
        elif isinstance(typed, messages.Reregister):
            self._send_ready()

    def _on_dispatch(self, d: messages.Dispatch, msg: Message) -> None:
        ctx = RequestContext(
            id=d.id, client=d.client, agent=d.agent, op=d.op, attempt=d.attempt, resume=d.resume, slice=d.slice,
            target=d.target, caller=d.caller,
            deadline=time.monotonic() + d.deadline if d.deadline is not None else None, _manager=self)
        spec = self.ops.get(d.op)
        if spec is None:
            return self._post(ctx, {"status": _ERROR}, error_body(
                ErrorCode.UNKNOWN_OP, f"service {self.service!r} has no op {d.op!r}; ops: {sorted(self.ops)}"))
        try:
            body = msg.body
            if not isinstance(body, dict):
                raise OpError(ErrorCode.INVALID_ARGUMENT, "the syscall body must be a map of arguments")
            args = spec.args_model.model_validate(body) if spec.args_model else body
        except (ProtocolError, OpError) as exc:
            return self._post(ctx, {"status": _ERROR}, error_body(exc.code, exc.message))
        except ValidationError as exc:
            return self._post(ctx, {"status": _ERROR},
                              error_body(ErrorCode.INVALID_ARGUMENT, f"{self.service}.{d.op}: {describe_validation(exc)}"))
        with self._lock:
            self._active[ctx.key] = ctx
        inline = spec.inline
        if callable(inline):  # the op decides per request
            inline = self._outcome(ctx, lambda: spec.inline(args))  # type: ignore[operator]
        if isinstance(inline, _Failed):
            self._answer(ctx, inline)
        elif inline:
            self._run(spec, args, ctx)
        else:
            self.pool.submit(self._run, spec, args, ctx)

    def _run(self, spec: OpSpec, args: Any, ctx: RequestContext) -> None:
        result = self._outcome(ctx, lambda: spec.func(self, args, ctx))
        if isinstance(result, Deferred):
            if threading.current_thread() is self._loop_thread:
                self._deferred.append((ctx, result))  # answered when its batch closes
                return
            # ran on the pool: a batch of its own, closed at once
            self._close_batch([(ctx, result)])
            return
        self._answer(ctx, result)

    def _finish_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        self._close_batch(deferred)

    def _close_batch(self, deferred: list[tuple[RequestContext, Deferred]]) -> None:
        try:
            self.end_batch([d.token for _, d in deferred])
        except Exception:  # noqa: BLE001 - each deferred request's finish() reports what it lost
            self.log.exception("end_batch failed")
        for ctx, d in deferred:
            self._answer(ctx, self._outcome(ctx, d.finish))

    def _outcome(self, ctx: RequestContext, call: Callable[[], Any]) -> Any:
        """What `call()` returns, or, if it raises, `_Failed` with the error reply the exception becomes."""
        try:
            return call()
        except OpError as exc:
            return _Failed(error_body(exc.code, exc.message))
        except ValidationError as exc:
            return _Failed(error_body(ErrorCode.INVALID_ARGUMENT, describe_validation(exc)))
        except Exception as exc:
            self.log.exception("op %s failed", ctx.op)
            return _Failed(error_body(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))

    def _answer(self, ctx: RequestContext, result: Any) -> None:
        header: dict[str, Any]
        if isinstance(result, _Failed):
            header, body = {"status": _ERROR}, result.body
        elif isinstance(result, Preempt):
            header, body = {"yield": result.affinity}, None
        else:
            if isinstance(result, BaseModel):
                result = result.model_dump(mode="json")
            header, body = {"status": _OK}, result
        with self._lock:
            self._active.pop(ctx.key, None)
        self._post(ctx, header, body, final=True)

    def _post(self, ctx: RequestContext, header: dict[str, Any], body: Any, final: bool = False) -> None:
        """Send a reply (or yield) for `ctx` from any thread."""
        if "yield" in header:
            msg: Any = messages.Yield(ctx.id, ctx.client, affinity=header["yield"], tokens=ctx.tokens)
        else:
            msg = messages.Reply(ctx.id, header["status"], client=ctx.client, tokens=ctx.tokens if final else 0)
        self._post_frames(self._encode(msg, body))

    def _post_frames(self, frames: list[bytes]) -> None:
        """Hand frames to the socket loop (only that thread touches the DEALER)."""
        if threading.current_thread() is self._loop_thread:
            self._send_frames(frames)
            return
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._local.push = self.zctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"inproc://results-{id(self)}")
        sock.send_multipart(frames)

    # ------------------------------------------------------------- calls
    def _service_call(self, ctx: RequestContext, service: str, op_name: str, args: dict[str, Any],
                      target: str | None, timeout: float | None, idempotent: bool) -> Any:
        from aios.sdk.engine import PendingCall, Send, Wait
        from aios.sdk.errors import AIOSError

        if threading.current_thread() is self._loop_thread:
            # the reply would arrive on the socket this thread is blocked from reading
            raise OpError(ErrorCode.INTERNAL, f"{self.service}.{ctx.op} is an inline op: it cannot call "
                                              f"{service}.{op_name} (declare it without inline=True)")
        now = time.monotonic()
        left = (ctx.deadline - now) if ctx.deadline is not None else DEFAULT_CALL_TIMEOUT_S
        timeout = left if timeout is None else min(timeout, left)
        if timeout <= 0:
            raise OpError(ErrorCode.DEADLINE_EXCEEDED, f"no time left to call {service}.{op_name}")
        header = messages.Call(id="", service=service, op=op_name, parent=ctx.id, parent_client=ctx.client,
                               target=target)
        call = PendingCall(self.codec, header, args, timeout=timeout, idempotent=idempotent, now=now,
                           where="the scheduler")
        inbox: queue.Queue[Any] = queue.Queue()
        rid = ""
        try:
            while True:
                if ctx.cancelled.is_set():
                    raise OpError(ErrorCode.CANCELLED, f"cancelled while waiting for {service}.{op_name}")
                try:
                    step = call.step(time.monotonic())
                except AIOSError as exc:
                    raise OpError(exc.code if exc.code in ErrorCode.__members__ else ErrorCode.DEADLINE_EXCEEDED,
                                  f"{service}.{op_name}: {exc.message}") from None
                if isinstance(step, Send):
                    if call.rid != rid:
                        self._calls.pop(rid, None)
                        rid = call.rid
                        self._calls[rid] = inbox
                    self._post_frames(step.frames)
                elif isinstance(step, Wait):
                    wait = max(0.0, min(step.until - time.monotonic(), CALL_POLL_S))
                    try:
                        msg = inbox.get(timeout=wait)
                    except queue.Empty:
                        continue
                    if msg is _LOST:
                        call.connection_lost(time.monotonic())
                    elif msg.header.get("id") == call.rid:
                        call.feed(msg)
                else:
                    return step.result
        finally:
            self._calls.pop(rid, None)


def describe_validation(exc: ValidationError) -> str:
    """Pydantic's errors as one line: `field.path: problem; ...` (first five)."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ())) or "arguments"
        msg = str(err.get("msg"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        parts.append(f"{where}: {msg}")
    more = len(exc.errors()) - 5
    return "invalid arguments: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
