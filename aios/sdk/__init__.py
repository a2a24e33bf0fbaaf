"""The Agent SDK: what agent programs import to make system calls to AIOS."""
from aios.sdk.client import AsyncClient, Client, connect, connect_async
from aios.calls import CallResult
from aios.sdk.errors import (
    AIOSError,
    InvalidArgument,
    KernelError,
    KernelNotRunning,
    KernelTimeout,
    KernelUnavailable,
    NotFound,
    PermissionDenied,
)

__all__ = [
    "AIOSError", "AsyncClient", "Client", "InvalidArgument", "KernelError", "KernelNotRunning",
    "KernelTimeout", "KernelUnavailable", "NotFound", "PermissionDenied", "CallResult", "connect", "connect_async",
]


def __getattr__(name: str) -> object:
    """`aios.sdk.Reply` was renamed `CallResult` (one name, one meaning: `aios.messages.Reply` is the
    wire message). The old name keeps working, with a DeprecationWarning."""
    if name == "Reply":
        import warnings

        warnings.warn("aios.sdk.Reply is deprecated; use aios.sdk.CallResult", DeprecationWarning, stacklevel=2)
        return CallResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
