"""Limits, argument checks and units that the storage engine's parts share (engine.py, files.py, records.py)."""
from __future__ import annotations

from .errors import invalid

MiB = 1 << 20
MAX_LIST_LIMIT = 10_000
MAX_SEARCH_LIMIT = 100
SNIPPET_TOKENS = 16


def mb(n: int) -> str:
    """A byte count in the configuration's MB, for messages that name the setting."""
    return f"{n / MiB:g}"


def seconds(ns: int) -> float:
    return ns / 1e9


def int_arg(value: object, what: str, low: int, high: int | None = None) -> int:
    """`value` if it is an integer in range, else StorageError(INVALID_ARGUMENT) naming `what`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid(f"{what} must be an integer, not {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise invalid(f"{what} must be {bound}, not {value}")
    return value
