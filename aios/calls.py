"""The call engine: one system call's life on the caller's side, written once, without I/O.

Agents (the sync and asyncio SDK clients), managers (`ctx.call`, a handler
calling another service) and the supervisor's readiness probe all make calls
the same way; only how they wait differs, so this module belongs to none of
them. `PendingCall` holds everything else: it builds the frames, decides
when to re-send the same request id (idempotent calls, while no answer comes),
when to retry under a new id (a retryable error), matches partial and final
replies, and turns an error reply into a typed exception. A driver loops:

    call = PendingCall(codec, header, args, ...)
    while True:
        step = call.step(time.monotonic())
        if isinstance(step, Send):   send step.frames on the socket
        elif isinstance(step, Wait): wait for a message until step.until; call.feed(msg) if one came
        else:                        return step (the final CallResult; errors were raised by step())

Received frames become typed replies in `decode` (through `aios.messages`); the
driver routes only replies whose id is `call.rid` to `feed` (the id changes
when the call is retried). `connection_lost()` is the driver's news
that the kernel connection dropped (the scheduler restarted): idempotent
calls are re-sent at once, and the others fail at once with an error that
says their outcome is unknown (not retryable: repeating them could do the
work twice), instead of waiting for their timeout. A re-sent request says
whether partials already arrived for it (`streamed`), so that the scheduler
resets the stream only if it must run the call again; one still running on
its manager it adopts instead (`aios.scheduler.adoption`).

What cannot be sent fails here, before anything is sent, with `InvalidArgument`
naming the argument: a value msgpack cannot carry (an object, an integer beyond
64 bits, a string with a lone surrogate), or a request bigger than the kernel
accepts (`[kernel] max_message_bytes`: the scheduler would drop the connection,
which the caller would see as a restart).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from aios import messages
from aios.errors import AIOSError, InvalidArgument, KernelError, KernelTimeout, error_from_body
from aios.protocol import Codec, ErrorCode, Frame, ProtocolError, Status, new_request_id, pack

log = logging.getLogger("aios.sdk")

DEFAULT_TIMEOUT_S = 120.0
#: after the call's own deadline, how long to wait for the kernel's DEADLINE_EXCEEDED verdict
#: (the kernel's clock for a request starts when it arrives, a little after ours)
DEADLINE_GRACE_S = 0.25
#: re-send intervals of an idempotent call that gets no answer: from `resend_interval`, doubling up to this
MAX_RESEND_INTERVAL_S = 8.0
#: backoff between retries after a retryable error: from `resend_interval`, doubling up to this
MAX_BACKOFF_S = 8.0

#: retryable errors the engine retries by itself (idempotent calls only): the kernel is busy, a
#: manager is restarting, or the kernel is being restarted, so the same call very likely succeeds in
#: a moment (and if the kernel does not come back, the client says so at the next send). Other retryable errors
#: (UNAVAILABLE: a service or its backend is down) go straight to the caller, who decides: retrying
#: them here would turn a prompt "it is down" into a wait for the whole timeout.
AUTO_RETRY = frozenset({ErrorCode.MANAGER_DIED.value, ErrorCode.OVERLOADED.value, ErrorCode.SHUTTING_DOWN.value})

PartialHandler = Callable[[Any], None]
_PARTIAL, _ERROR = Status.PARTIAL.value, Status.ERROR.value


@dataclass(slots=True)
class Incoming:
    """A verified reply from the scheduler: its typed header, and the body (decoded on first use)."""

    reply: messages.Reply
    message: Frame

    @property
    def id(self) -> str | None:
        return self.reply.id

    @property
    def body(self) -> Any:
        return self.message.body


@dataclass
class CallResult:
    """A call's outcome: the result, the final reply (with what the scheduler measured), the partials."""

    result: Any
    reply: messages.Reply
    partials: list[Any] = field(default_factory=list)

    @property
    def timing(self) -> messages.Timing | None:
        """How long the call waited and ran (None for answers the scheduler gives itself: `kernel` ops,
        refusals)."""
        return self.reply.timing


@dataclass(frozen=True, slots=True)
class Send:
    frames: list[bytes]


@dataclass(frozen=True, slots=True)
class Wait:
    until: float


Step = Union[Send, Wait, CallResult]


class PendingCall:
    """One call in flight. `header` is the typed request (an agent's Request or a manager's Call);
    its `id` and `deadline` are set here for each attempt."""

    __slots__ = ("codec", "header", "body_raw", "idempotent", "on_partial", "where", "deadline", "resend_interval",
                 "_resend_every", "_backoff", "_send_at", "_fresh", "_reply", "_error", "partials", "attempts", "rid")

    def __init__(self, codec: Codec, header: messages.Request | messages.Call, args: dict[str, Any], *,
                 timeout: float, idempotent: bool, now: float, resend_interval: float = 1.0,
                 on_partial: PartialHandler | None = None, where: str = "the kernel",
                 max_message_bytes: int | None = None) -> None:
        self.codec = codec
        self.header = header
        self.body_raw = pack_arguments(args, f"{header.service}.{header.op}", max_message_bytes)
        self.idempotent = idempotent
        self.on_partial = on_partial
        self.where = where
        self.deadline = now + timeout
        self.resend_interval = resend_interval
        self._resend_every = resend_interval
        self._backoff = resend_interval
        self._send_at: float | None = now
        self._fresh = True
        self._reply: CallResult | None = None
        self._error: AIOSError | None = None
        self.partials: list[Any] = []
        self.attempts = 0
        self.rid = ""

    @property
    def what(self) -> str:
        return f"{self.header.service}.{self.header.op}"

    # --------------------------------------------------------------- driving
    def step(self, now: float) -> Step:
        if self._reply is not None:
            return self._reply
        if self._error is not None:
            err, self._error = self._error, None
            if not (self.idempotent and err.code in AUTO_RETRY) or now + self._backoff >= self.deadline:
                raise err
            log.info("retrying %s after %s", self.what, err.code)
            self._send_at = now + self._backoff
            self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
            self._fresh = True
        if self._send_at is not None and now >= self._send_at and now >= self.deadline:
            self._send_at = None  # too late to send again: wait out the grace for the kernel's verdict
        if self._send_at is not None and now >= self._send_at:
            remaining = self.deadline - now
            if self._fresh:
                self.rid = new_request_id()
                self.partials.clear()
                self._fresh = False
            elif self.attempts:
                log.info("no answer to %s yet; re-sending", self.what)
            self.attempts += 1
            self.header.id = self.rid
            self.header.deadline = remaining
            if isinstance(self.header, messages.Request):
                # a scheduler that must run it again from the start then resets the stream first
                self.header.streamed = bool(self.partials)
            try:
                header_raw = pack(self.header.to_header())
            except Exception as exc:  # a target (model or tool name) msgpack cannot carry
                raise InvalidArgument(ErrorCode.INVALID_ARGUMENT.value,
                                      f"{self.what}: {unsendable(self.header.to_header(), exc)}") from None
            if self.idempotent:
                self._send_at = now + min(self._resend_every, remaining)
                self._resend_every = min(self._resend_every * 2, MAX_RESEND_INTERVAL_S)
            else:
                self._send_at = None
            return Send(self.codec.encode_raw(header_raw, self.body_raw))
        end = self.deadline + DEADLINE_GRACE_S
        if now >= end:
            raise self._timeout()
        return Wait(min(self._send_at, end) if self._send_at is not None else end)

    def _timeout(self) -> KernelTimeout:
        return KernelTimeout("TIMEOUT", f"{self.what}: no answer from {self.where} within the timeout")

    def feed(self, msg: Incoming) -> None:
        """A reply for this call's current id (the driver checked `msg.id == self.rid`)."""
        status = msg.reply.status
        if status == _PARTIAL:
            if msg.reply.reset:
                self.partials.clear()
                body: Any = {"reset": True}
            else:
                body = msg.body
                self.partials.append(body)
            if self.on_partial is not None:
                self.on_partial(body)
            return
        if status == _ERROR:
            self._error = error_from_body(msg.body)
            self._send_at = None
            return
        self._reply = CallResult(msg.body, msg.reply, self.partials)

    def connection_lost(self, now: float) -> None:
        """The connection to the kernel dropped while this call was in flight."""
        if self._reply is not None or self._error is not None:
            return
        if self.idempotent:
            if self.attempts:
                self._send_at = now  # re-send the same id as soon as the connection is back
            return
        if self.attempts and self._send_at is None:
            self._error = KernelError(ErrorCode.UNAVAILABLE.value,
                                      f"{self.what}: the connection to {self.where} was lost while the call was in "
                                      "flight (the scheduler restarted or the kernel stopped); it may or may not "
                                      "have taken effect", retryable=False)


#: the integers msgpack carries
_INT_RANGE = (-(2 ** 63), 2 ** 64 - 1)
#: how deep `unsendable` looks for the culprit (msgpack itself refuses deeper nesting)
_MAX_DEPTH = 256


def pack_arguments(args: dict[str, Any], what: str, max_bytes: int | None = None) -> bytes:
    """A call's arguments packed for the wire, or `InvalidArgument` naming the argument that cannot be
    sent (`what` is "service.op"), or saying the request is larger than the kernel accepts."""
    try:
        body_raw = pack(args)
    except Exception as exc:  # msgpack raises TypeError, OverflowError, ValueError, UnicodeEncodeError
        raise InvalidArgument(ErrorCode.INVALID_ARGUMENT.value, f"{what}: {unsendable(args, exc)}") from None
    if max_bytes is not None and len(body_raw) > max_bytes:
        raise InvalidArgument(ErrorCode.TOO_LARGE.value,
                              f"{what}: the request's arguments are {len(body_raw)} bytes encoded; the kernel "
                              f"accepts at most {max_bytes} bytes in one message ([kernel] max_message_bytes): "
                              "send the data in parts (storage.append), or raise the limit")
    return body_raw


def unsendable(args: Any, exc: BaseException) -> str:
    """Which argument msgpack could not pack, and why, for an error message (`exc` is what pack raised).
    Called only after packing failed, so the common path pays nothing for it."""
    found = _find_unsendable(args, "", 0)
    return found if found is not None else f"the arguments cannot be sent ({type(exc).__name__}: {exc})"


def _find_unsendable(value: Any, path: str, depth: int) -> str | None:
    if depth > _MAX_DEPTH:
        return f"argument {path!r} is nested more than {_MAX_DEPTH} levels deep"
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            found = _find_unsendable(key, f"{where} (its name)", depth + 1) or _find_unsendable(item, where, depth + 1)
            if found is not None:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _find_unsendable(item, f"{path}[{i}]", depth + 1)
            if found is not None:
                return found
        return None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return (f"argument {path!r} is not valid Unicode text: it holds a lone surrogate "
                    f"(U+{ord(value[err.start]):04X} at position {err.start})")
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
            return (f"argument {path!r} is the integer {value}, outside the range a call can carry "
                    f"(-2**63 to 2**64-1)")
        return None
    if value is None or isinstance(value, (bool, float, bytes, bytearray, memoryview)):
        return None
    return (f"argument {path!r} is of type {type(value).__name__}, which a call cannot carry: arguments are "
            "made of None, booleans, numbers, strings, bytes, lists and maps with string keys")


def match_id(msg: Incoming | None) -> str | None:
    """The request id a received reply answers (None for unreadable or anonymous replies)."""
    return msg.reply.id if msg is not None else None


def decode(codec: Codec, frames: list[bytes]) -> Incoming | None:
    """Verify and type a frame from the scheduler. A bad one is logged and dropped (it cannot be
    trusted to name its call); so is the scheduler's liveness probe (a heartbeat), which needs no
    answer: its only purpose is to fail at the scheduler when this caller is gone."""
    try:
        msg = codec.decode(frames)
        typed = messages.parse(msg.header, messages.TO_CALLER)
    except ProtocolError as exc:
        log.warning("dropped a reply: %s", exc.message)
        return None
    if not isinstance(typed, messages.Reply):
        return None
    if typed.id is None and typed.status == _ERROR:
        log.warning("the kernel rejected a frame: %s", msg.body)
    return Incoming(typed, msg)
