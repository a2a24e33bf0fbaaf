"""Typed exceptions of a failed system call, one per kind of failure a caller handles differently.

Raised by the call engine (`aios.calls`) to every caller: agents (re-exported as `aios.sdk.errors`),
managers making calls (`ctx.call`) and the supervisor's probe."""
from __future__ import annotations

from typing import Any

from aios.protocol import ErrorCode


class AIOSError(Exception):
    """Base of every SDK error. `code` is the kernel's error code, `retryable` its advice."""

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


class KernelUnavailable(AIOSError):
    """No kernel is running at the run directory (never started, stopped, or its files are gone),
    or it stopped while a call was in flight. Retryable: a kernel started there later serves calls."""


#: the older name of KernelUnavailable
KernelNotRunning = KernelUnavailable


class KernelTimeout(AIOSError):
    """No answer within the call's timeout (or the kernel's deadline passed)."""


class PermissionDenied(AIOSError):
    """The access manager (or a person) refused the operation."""


class InvalidArgument(AIOSError):
    """The call itself is wrong: unknown service/op/model, bad arguments, malformed or oversized frame."""


class NotFound(AIOSError):
    """The named object does not exist."""


class KernelError(AIOSError):
    """The kernel could not complete a valid call (manager died, unavailable, internal error)."""


_BY_CODE: dict[str, type[AIOSError]] = {
    ErrorCode.DEADLINE_EXCEEDED.value: KernelTimeout,
    ErrorCode.DENIED.value: PermissionDenied,
    ErrorCode.NOT_FOUND.value: NotFound,
    ErrorCode.BAD_FRAME.value: InvalidArgument,
    ErrorCode.BAD_SIGNATURE.value: InvalidArgument,
    ErrorCode.TOO_LARGE.value: InvalidArgument,
    ErrorCode.UNKNOWN_SERVICE.value: InvalidArgument,
    ErrorCode.UNKNOWN_OP.value: InvalidArgument,
    ErrorCode.UNKNOWN_TARGET.value: InvalidArgument,
    ErrorCode.INVALID_ARGUMENT.value: InvalidArgument,
}


def error_from_body(body: Any) -> AIOSError:
    """Turn an error reply body {"error": {code, message, retryable}} into an exception."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return KernelError(ErrorCode.INTERNAL.value, f"malformed error reply: {body!r:.200}")
    code = str(err.get("code", ErrorCode.INTERNAL.value))
    cls = _BY_CODE.get(code, KernelError)
    return cls(code, str(err.get("message", "")), bool(err.get("retryable", False)))
