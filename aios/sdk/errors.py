"""The SDK's typed exceptions (defined in `aios.errors`, which managers and the supervisor share)."""
from aios.errors import (
    AIOSError,
    InvalidArgument,
    KernelError,
    KernelNotRunning,
    KernelTimeout,
    KernelUnavailable,
    NotFound,
    PermissionDenied,
    error_from_body,
)

__all__ = ["AIOSError", "InvalidArgument", "KernelError", "KernelNotRunning", "KernelTimeout", "KernelUnavailable",
           "NotFound", "PermissionDenied", "error_from_body"]
