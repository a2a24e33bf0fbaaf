"""Assertions about the errors a manager's code raises."""
from __future__ import annotations

from typing import Any, Callable

import pytest


def op_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The OpError that `fn(*args, **kwargs)` raises (the test fails if it raises none)."""
    from aios.managers.base import OpError
    with pytest.raises(OpError) as info:
        fn(*args, **kwargs)
    return info.value
