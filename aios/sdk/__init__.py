"""The Agent SDK: what agent programs import to make system calls to AIOS."""
from aios.sdk.client import AsyncClient, Client, connect, connect_async
from aios.sdk.engine import Reply
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
    "KernelTimeout", "KernelUnavailable", "NotFound", "PermissionDenied", "Reply", "connect", "connect_async",
]
