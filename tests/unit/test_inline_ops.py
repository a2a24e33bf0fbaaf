"""Inline ops (`@op(..., inline=True)`) as declared, without a manager running (how they run is
tested through the process tree in tests/system/test_inline_ops.py)."""
from __future__ import annotations

import pytest

from aios.managers.base import op


def test_an_inline_op_cannot_be_preemptible() -> None:
    with pytest.raises(ValueError, match="inline op cannot be preemptible"):
        op(None, inline=True, preemptible=True)
