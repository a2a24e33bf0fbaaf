"""The storage engine raises its own StorageError; the storage manager answers it as OpError, with
the same code and message, whether a handler raises it or its Deferred does when the batch ends."""
from __future__ import annotations

from typing import Any

import pytest

from aios.managers.base import Deferred, OpError
from aios.managers.storage.errors import StorageError
from aios.managers.storage.manager import StorageManager, engine_op
from aios.protocol import ErrorCode


class Handlers:
    @engine_op(None)
    def refused(self, args: Any, ctx: Any) -> dict:
        raise StorageError(ErrorCode.QUOTA_EXCEEDED, "agent 'a' would use too much")

    @engine_op(None)
    def later(self, args: Any, ctx: Any) -> Deferred:
        def finish() -> dict:
            raise StorageError(ErrorCode.NOT_FOUND, "no file 'x'")
        return Deferred(finish, token="the batch's token")

    @engine_op(None)
    def fine(self, args: Any, ctx: Any) -> Deferred:
        return Deferred(lambda: {"ok": True}, token=7)


def test_a_handlers_storage_error_is_answered_as_an_op_error() -> None:
    with pytest.raises(OpError) as info:
        Handlers().refused(None, None)
    assert info.value.code == ErrorCode.QUOTA_EXCEEDED and info.value.message == "agent 'a' would use too much"


def test_a_deferred_answers_its_storage_error_as_an_op_error_and_keeps_its_token() -> None:
    deferred = Handlers().later(None, None)
    assert isinstance(deferred, Deferred) and deferred.token == "the batch's token"
    with pytest.raises(OpError) as info:
        deferred.finish()
    assert info.value.code == ErrorCode.NOT_FOUND and info.value.message == "no file 'x'"
    ok = Handlers().fine(None, None)
    assert ok.token == 7 and ok.finish() == {"ok": True}


def test_every_storage_op_is_declared_with_engine_op() -> None:
    """A handler declared with plain `op` would answer a StorageError as INTERNAL: none is."""
    ops = {name: fn for name, fn in vars(StorageManager).items() if hasattr(fn, "__aios_op__")}
    assert len(ops) >= 15
    for name, fn in ops.items():
        assert getattr(fn, "__wrapped__", None) is not None, name


def test_storage_errors_name_a_protocol_code() -> None:
    assert StorageError("NOT_FOUND", "x").code is ErrorCode.NOT_FOUND
    with pytest.raises(ValueError):
        StorageError("NO_SUCH_CODE", "x")
