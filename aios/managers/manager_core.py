"""A manager's core: everything between a typed message from the scheduler and its answer, with no sockets.

The socket shell (`aios.managers.shell`) verifies frames, parses them into
typed messages (`aios.messages`) and hands each to `ManagerCore.handle`; it
says when the messages that arrived together have all been handled
(`end_of_batch`), when the socket was quiet (`housekeeping(idle=True)`) and
when the scheduler connection dropped (`connection_lost`). The core answers
through a `ManagerOutbox` with typed messages (`Reply`, `Yield`, `Ready`), from
whatever thread a handler ran on. Unit tests drive it the same way with a
list for an outbox (`tests/support/manager_harness.py`), as
`tests/support/core_harness.py` drives the scheduler's core.

What lives here:
- dispatch: validate the body with the op's model, run the handler inline (on
  the driving thread) or on the pool, turn what it returns or raises into the
  reply (`Preempt` into a `Yield`, `Deferred` into an answer at the batch's end);
- inline batches: deferred answers wait for `end_of_batch`, which calls the
  manager's `end_batch` hook once for all of them before any is answered;
- cancel: a running request's context is flagged and the manager told
  (`on_cancel`), a finished one's leftovers forgotten (`on_forget`);
- calls a handler makes (`ctx.call`): driven by the shared call engine
  (`aios.calls`), their replies routed back here by request id.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, Callable, Protocol, Union

from pydantic import BaseModel, ValidationError

from aios import messages
from aios.calls import Incoming, PendingCall, Send, Wait
from aios.errors import AIOSError
from aios.managers.base import (
    Deferred,
    OpError,
    OpSpec,
    Preempt,
    RequestContext,
    describe_validation,
    request_key,
)
from aios.protocol import Codec, ErrorCode, Frame, ProtocolError, Status, error_body, unpack

if TYPE_CHECKING:
    from aios.managers.base import Manager

log = logging.getLogger("aios.manager")

_OK, _ERROR, _PARTIAL = Status.OK.value, Status.ERROR.value, Status.PARTIAL.value
#: default time a handler's call may take when the request it serves has no deadline
DEFAULT_CALL_TIMEOUT_S = 300.0
#: how often a handler waiting on a call checks whether its own request was cancelled
CALL_POLL_S = 0.05
_LOST = object()  # put in a waiting call's inbox when the scheduler connection drops
#: a held batch closes after this long even if fewer dispatches came (a test hook must not hang a kernel)
HOLD_BATCH_MAX_S = 10.0

ToScheduler = Union[messages.Reply, messages.Yield, messages.Ready, messages.Heartbeat, messages.Disconnect]


class ManagerOutbox(Protocol):
    """Where the core's messages go: the shell's DEALER (a list in unit tests). Callable from any thread."""

    def send(self, msg: ToScheduler, body: Any = None) -> None: ...

    def send_frames(self, frames: list[bytes]) -> None:
        """A call's request, already signed by the call engine."""


class _Failed:
    """What a handler's exception becomes: the error reply's body."""

    __slots__ = ("body",)

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body


class ManagerCore:
    """One manager's request handling. `handle`, `end_of_batch`, `housekeeping` and `connection_lost`
    are called by the driving thread (the shell's socket loop); handlers on the pool post their
    answers through the same outbox."""

    def __init__(self, manager: "Manager", outbox: ManagerOutbox, codec: Codec, pool: Executor) -> None:
        self.manager = manager
        self.out = outbox
        self.codec = codec
        self.pool = pool
        self.loop_thread = threading.current_thread()
        self.active: dict[str, RequestContext] = {}
        self.calls: dict[str, queue.Queue[Any]] = {}
        self.lock = threading.Lock()
        self.deferred: list[tuple[RequestContext, Deferred]] = []
        self.log = manager.log
        # the batch-hold test hook (see hold_next_batch)
        self._hold_armed = 0
        self._hold = 0
        self._held = 0
        self._held_since: float | None = None
        manager._core = self

    # ------------------------------------------------------------------ view
    def running(self) -> list[messages.RunningEntry]:
        with self.lock:
            return [(c.client, c.id, c.target) for c in self.active.values()]

    def ready_message(self) -> messages.Ready:
        m = self.manager
        return messages.Ready(
            name=m.name, service=m.service, capacity=m.capacity, incarnation=m.incarnation,
            pid=os.getpid(), running=self.running(),
            ops={n: messages.OpInfo(s.idempotent, s.preemptible) for n, s in m.ops.items()},
            targets=list(m.targets), default=m.default_target, limits=dict(m.limits),
            idempotent_targets=list(m.idempotent_targets), health=m.health, detail=m.health_detail)

    # -------------------------------------------------------------- messages
    def handle(self, typed: messages.Message, raw: Frame) -> None:
        """A verified message from the scheduler (`raw` carries its body, decoded on first use)."""
        if isinstance(typed, messages.Dispatch):
            self.on_dispatch(typed, raw.body_raw)
        elif isinstance(typed, messages.Reply):
            waiter = self.calls.get(typed.id or "")
            if waiter is not None:
                waiter.put(Incoming(typed, raw))
        elif isinstance(typed, messages.Cancel):
            self.on_cancel(typed)
        elif isinstance(typed, messages.Reregister):
            self.out.send(self.ready_message())

    def on_cancel(self, c: messages.Cancel) -> None:
        key = request_key(c.id, c.client)
        with self.lock:
            ctx = self.active.get(key)
        if ctx is not None:
            ctx.cancelled.set()
            self.manager.on_cancel(ctx)
        else:
            self.manager.on_forget(key)

    def on_dispatch(self, d: messages.Dispatch, body_raw: bytes) -> None:
        m = self.manager
        ctx = RequestContext(
            id=d.id, client=d.client, agent=d.agent, op=d.op, attempt=d.attempt, resume=d.resume, slice=d.slice,
            target=d.target, caller=d.caller,
            deadline=time.monotonic() + d.deadline if d.deadline is not None else None, _core=self)
        spec = m.ops.get(d.op)
        if spec is None:
            return self.post(ctx, _ERROR, error_body(
                ErrorCode.UNKNOWN_OP, f"service {m.service!r} has no op {d.op!r}; ops: {sorted(m.ops)}"))
        try:
            body = _decode_body(body_raw)
            if not isinstance(body, dict):
                raise OpError(ErrorCode.INVALID_ARGUMENT, "the syscall body must be a map of arguments")
            args = spec.args_model.model_validate(body) if spec.args_model else body
        except (ProtocolError, OpError) as exc:
            return self.post(ctx, _ERROR, error_body(exc.code, exc.message))
        except ValidationError as exc:
            return self.post(ctx, _ERROR, error_body(ErrorCode.INVALID_ARGUMENT,
                                                     f"{m.service}.{d.op}: {describe_validation(exc)}"))
        with self.lock:
            self.active[ctx.key] = ctx
        if self._hold:
            self._held += 1
        inline = spec.inline
        if callable(inline):  # the op decides per request
            inline = self._outcome(ctx, lambda: spec.inline(args))  # type: ignore[operator]
        if isinstance(inline, _Failed):
            self._answer(ctx, inline)
        elif inline:
            self._run(spec, args, ctx)
        else:
            self.pool.submit(self._run, spec, args, ctx)

    # ------------------------------------------------------------- handlers
    def _run(self, spec: OpSpec, args: Any, ctx: RequestContext) -> None:
        result = self._outcome(ctx, lambda: spec.func(self.manager, args, ctx))
        if isinstance(result, Deferred):
            if threading.current_thread() is self.loop_thread:
                self.deferred.append((ctx, result))  # answered when its batch closes
                return
            # ran on the pool: a batch of its own, closed at once
            self._close_batch([(ctx, result)])
            return
        self._answer(ctx, result)

    def hold_next_batch(self, n: int) -> None:
        """Test hook: keep the next batch open until `n` dispatches are in it (at most HOLD_BATCH_MAX_S).

        Which requests arrive together depends on how busy the machine is; a test that needs a
        batch of N (group commit, one failure among many) arms this first, so the condition it
        tests holds on any machine. Reached through the `test_hold_batch` op, which the base
        declares only when the kernel runs with `AIOS_TEST_HOOKS=1`."""
        self._hold_armed = n

    def holding(self, now: float) -> bool:
        """True while the test hook keeps the current batch open (the driver then neither closes it
        nor runs housekeeping)."""
        if not self._hold:
            return False
        if self._held_since is None:
            if not self._held:
                return False  # nothing has arrived yet: nothing to hold
            self._held_since = now
        if self._held < self._hold and now - self._held_since < HOLD_BATCH_MAX_S:
            return True
        self.log.info("test hook: closing a held batch of %d dispatches", self._held)
        self._hold, self._held, self._held_since = 0, 0, None
        return False

    def end_of_batch(self) -> None:
        """The messages that arrived together have all been handled: close their batch."""
        if self._hold_armed:  # armed during this batch: hold the next one
            self._hold, self._held, self._held_since, self._hold_armed = self._hold_armed, 0, None, 0
        if self.deferred:
            deferred, self.deferred = self.deferred, []
            self._close_batch(deferred)

    def _close_batch(self, deferred: list[tuple[RequestContext, Deferred]]) -> None:
        try:
            self.manager.end_batch([d.token for _, d in deferred])
        except Exception:  # noqa: BLE001 - each deferred request's finish() reports what it lost
            self.log.exception("end_batch failed")
        for ctx, d in deferred:
            self._answer(ctx, self._outcome(ctx, d.finish))

    def housekeeping(self, idle: bool) -> None:
        try:
            self.manager.housekeeping(idle)
        except Exception:  # noqa: BLE001 - upkeep must not take the socket loop down
            self.log.exception("housekeeping failed")

    def _outcome(self, ctx: RequestContext, call: Callable[[], Any]) -> Any:
        """What `call()` returns, or, if it raises, `_Failed` with the error reply the exception becomes."""
        try:
            return call()
        except OpError as exc:
            return _Failed(error_body(exc.code, exc.message, exc.retryable))
        except ValidationError as exc:
            return _Failed(error_body(ErrorCode.INVALID_ARGUMENT, describe_validation(exc)))
        except Exception as exc:
            self.log.exception("op %s failed", ctx.op)
            return _Failed(error_body(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"))

    def _answer(self, ctx: RequestContext, result: Any) -> None:
        with self.lock:
            self.active.pop(ctx.key, None)
        if isinstance(result, _Failed):
            self.post(ctx, _ERROR, result.body, final=True)
        elif isinstance(result, Preempt):
            self.out.send(messages.Yield(ctx.id, ctx.client, affinity=result.affinity, tokens=ctx.tokens))
        else:
            if isinstance(result, BaseModel):
                result = result.model_dump(mode="json")
            self.post(ctx, _OK, result, final=True)

    def post(self, ctx: RequestContext, status: str, body: Any, final: bool = True) -> None:
        """Send a partial or final reply for `ctx` (from any thread)."""
        self.out.send(messages.Reply(ctx.id, status, client=ctx.client, tokens=ctx.tokens if final else 0), body)

    def cancel_all(self) -> None:
        """The manager is stopping: tell every running handler."""
        with self.lock:
            running = list(self.active.values())
        for ctx in running:
            ctx.cancelled.set()

    # ---------------------------------------------------------------- calls
    def connection_lost(self) -> None:
        """The scheduler connection dropped: calls in flight re-send or fail, as the engine decides."""
        for inbox in list(self.calls.values()):
            inbox.put(_LOST)

    def service_call(self, ctx: RequestContext, service: str, op_name: str, args: dict[str, Any],
                     target: str | None, timeout: float | None, idempotent: bool) -> Any:
        """`ctx.call`: a call made on a pool thread, on behalf of `ctx`'s agent, within its deadline."""
        if threading.current_thread() is self.loop_thread:
            # the reply would arrive on the socket this thread is blocked from reading
            raise OpError(ErrorCode.INTERNAL, f"{self.manager.service}.{ctx.op} is an inline op: it cannot call "
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
                                  f"{service}.{op_name}: {exc.message}", exc.retryable) from None
                if isinstance(step, Send):
                    if call.rid != rid:
                        self.calls.pop(rid, None)
                        rid = call.rid
                        self.calls[rid] = inbox
                    self.out.send_frames(step.frames)
                elif isinstance(step, Wait):
                    wait = max(0.0, min(step.until - time.monotonic(), CALL_POLL_S))
                    try:
                        msg = inbox.get(timeout=wait)
                    except queue.Empty:
                        continue
                    if msg is _LOST:
                        call.connection_lost(time.monotonic())
                    elif msg.id == call.rid:
                        call.feed(msg)
                else:
                    return step.result
        finally:
            self.calls.pop(rid, None)


def _decode_body(body_raw: bytes) -> Any:
    """A request's arguments, decoded strictly (as `protocol.Frame.body` does)."""
    try:
        return unpack(body_raw) if body_raw else {}
    except Exception as exc:  # msgpack raises many types on hostile input
        raise ProtocolError(ErrorCode.BAD_FRAME, f"body is not valid msgpack: {exc}") from exc
