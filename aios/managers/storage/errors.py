"""The storage engine's own errors.

The engine is a library below the storage manager's sockets: it knows nothing
of managers, so it does not raise their `OpError`. It raises `StorageError`,
which carries the `ErrorCode` the caller should see and a message written for
that caller; the storage manager turns it into `OpError` in one place
(manager.py, `engine_op`). Other users of the engine (the benchmarks, tests)
catch `StorageError` directly.

`StorageOpenError` is different: the database cannot be used at all (not
SQLite, not AIOS, too new, not creatable), so the manager cannot start; it has
no error code because no request is being answered.
"""
from __future__ import annotations

from aios.protocol import ErrorCode


class StorageError(Exception):
    """A storage operation failed: `code` says how (what the caller sees), `message` says why."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message


class StorageOpenError(Exception):
    """The database could not be opened (unreadable, not SQLite, not AIOS, too new)."""


def not_found(message: str) -> StorageError:
    return StorageError(ErrorCode.NOT_FOUND, message)


def invalid(message: str) -> StorageError:
    return StorageError(ErrorCode.INVALID_ARGUMENT, message)


def closed() -> StorageError:
    """What every call gets once `StorageEngine.close()` ran."""
    return StorageError(ErrorCode.UNAVAILABLE, "the storage engine is closed")
