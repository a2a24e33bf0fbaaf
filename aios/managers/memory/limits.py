"""What a memory entry may hold, checked before anything is written.

- content: a string with something besides white space (else no search could
  find it), of at most min(1 MiB, budget/16) UTF-8 bytes. An entry is a
  note or a transcript, not a file (files go to storage). Reading an entry makes
  transient copies outside the budget (the rebuilt string, the reply frame), and
  one entry should not flush the cache: 1/16 of the budget keeps both small.
- metadata: a map of at most 32 names (1..64 characters) to scalars (None, bool,
  int, finite float, string of at most 1024 characters), at most 4096 bytes packed.
  Small and flat so it costs little per entry and maps onto any storage schema;
  anything bigger belongs in the content. The store keeps it packed with msgpack:
  one small bytes object instead of a dict of objects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack

from aios.managers.base import OpError
from aios.managers.memory.sizing import utf8_len
from aios.memory_ids import ENTRY_ID
from aios.protocol import ErrorCode

BUDGET_KEY = "[memory] budget_mb"
MIB = 1024 * 1024
_INT_MIN, _INT_MAX = -(2 ** 63), 2 ** 64 - 1  # what msgpack (and SQLite, mostly) can carry


@dataclass(frozen=True)
class Limits:
    max_content_bytes: int = MIB
    max_metadata_keys: int = 32
    max_metadata_key_chars: int = 64
    max_metadata_str_chars: int = 1024
    max_metadata_bytes: int = 4096
    max_list_limit: int = 1000
    max_search_limit: int = 100
    max_query_chars: int = 1000


def check_agent(agent: str) -> None:
    if not isinstance(agent, str) or not agent:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "agent must be a non-empty string")


def check_id(entry_id: str) -> None:
    if not isinstance(entry_id, str) or not ENTRY_ID.fullmatch(entry_id):
        raise OpError(ErrorCode.INVALID_ARGUMENT,
                      "id must be 1 to 64 characters of letters, digits, '-' and '_'")


def check_limit(limit: int, most: int, name: str) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= most:
        raise OpError(ErrorCode.INVALID_ARGUMENT, f"{name} must be an integer from 1 to {most}")


def check_content(content: str, max_bytes: int, limits: Limits, budget_bytes: int) -> None:
    """`content` is text of at most `max_bytes` UTF-8 bytes (the error explains where the bound comes from)."""
    if not isinstance(content, str):
        raise OpError(ErrorCode.INVALID_ARGUMENT, "content must be a string")
    if not content.strip():
        raise OpError(ErrorCode.INVALID_ARGUMENT, "content is empty: an entry must hold some text (white space "
                                                  "alone cannot be found by any search)")
    try:
        size = utf8_len(content) if content.isascii() else len(content.encode("utf-8"))
    except UnicodeEncodeError:
        raise OpError(ErrorCode.INVALID_ARGUMENT, "content is not valid Unicode text (lone surrogate)") from None
    if size > max_bytes:
        raise OpError(ErrorCode.TOO_LARGE,
                      f"content is {size} bytes; an entry may hold at most {max_bytes} bytes "
                      f"(the smaller of {limits.max_content_bytes} bytes and 1/16 of the memory "
                      f"budget, {BUDGET_KEY} = {budget_bytes / MIB:g})")


def pack_metadata(metadata: dict[str, Any] | None, lim: Limits) -> bytes | None:
    """Validate metadata and pack it (None for no metadata)."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise OpError(ErrorCode.INVALID_ARGUMENT, "metadata must be a map of names to values")
    if len(metadata) > lim.max_metadata_keys:
        raise OpError(ErrorCode.TOO_LARGE,
                      f"metadata has {len(metadata)} names; the limit is {lim.max_metadata_keys}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not 1 <= len(key) <= lim.max_metadata_key_chars:
            raise OpError(ErrorCode.INVALID_ARGUMENT,
                          f"metadata names must be strings of 1 to {lim.max_metadata_key_chars} characters; "
                          f"got {str(key)[:80]!r}")
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, int):
            if not _INT_MIN <= value <= _INT_MAX:
                raise OpError(ErrorCode.INVALID_ARGUMENT, f"metadata.{key}: integer out of the 64-bit range")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise OpError(ErrorCode.INVALID_ARGUMENT, f"metadata.{key}: numbers must be finite")
        elif isinstance(value, str):
            if len(value) > lim.max_metadata_str_chars:
                raise OpError(ErrorCode.TOO_LARGE, f"metadata.{key} is {len(value)} characters; the limit is "
                                                   f"{lim.max_metadata_str_chars}")
        else:
            raise OpError(ErrorCode.INVALID_ARGUMENT,
                          f"metadata.{key}: values must be null, booleans, numbers or strings, not "
                          f"{type(value).__name__}")
    if not metadata:
        return None
    try:
        packed = msgpack.packb(metadata, use_bin_type=True)
    except (UnicodeEncodeError, ValueError, TypeError) as exc:
        raise OpError(ErrorCode.INVALID_ARGUMENT, f"metadata cannot be stored: {exc}") from None
    if len(packed) > lim.max_metadata_bytes:
        raise OpError(ErrorCode.TOO_LARGE,
                      f"metadata packs to {len(packed)} bytes; the limit is {lim.max_metadata_bytes}")
    return packed


def pack_loaded(metadata: dict[str, Any] | None) -> bytes | None:
    """Pack metadata that was validated when it was written (read back from the backing)."""
    return msgpack.packb(metadata, use_bin_type=True) if metadata else None


def unpack(meta: bytes | None) -> dict[str, Any]:
    return msgpack.unpackb(meta, raw=False) if meta is not None else {}
