"""What a Python object really costs in RAM, for the memory manager's budget.

The memory budget (`[memory] budget_mb`) must bound the manager's real RSS,
not the length of the strings it holds: a 20-character note costs far more
than 20 bytes once its str header, the node that holds it, the dict slot that
finds it and its LRU-K history are counted. Every structure of the engine
therefore reports its size as the sum of `alloc(sys.getsizeof(obj))` over
the objects it owns, maintained incrementally as it changes.

Measured here (CPython 3.11.7, x86-64, `python -m aios.bench.memory_engine calibrate`):
- `sys.getsizeof` matches tracemalloc's per-object figure exactly (it includes
  the 16-byte GC header of GC-tracked objects; a 4-slot object is 64 bytes,
  a dict with 1..5 keys 184 bytes: a 64-byte object plus a separately
  allocated 120-byte key table).
- tracemalloc counts requested sizes; the allocators round them up. pymalloc
  serves requests up to 512 bytes in 16-byte size classes; larger ones go to
  glibc malloc, which adds an 8-byte chunk header and rounds to 16. `alloc`
  applies exactly these rules.
- RSS adds what neither sees: pymalloc pool headers and partly used pools,
  malloc arenas and fragmentation after frees. Filling a store with no frees,
  RSS growth was 0.98 to 1.06 x the object bytes; but a store that evicts
  continuously (written 10x its budget, entries freed in LRU-K order, not in
  allocation order) peaked at 1.21 to 1.26 x its object bytes, and stayed
  near 1.2 x after `malloc_trim`. `RSS_SLACK` = 1.2 turns object bytes into
  the bytes the budget counts, so that eviction keeps the real RSS growth,
  fragmentation included, near the high-water mark rather than 25% above it.
  (`python -m aios.bench.memory_engine calibrate` and `... rss` reproduce
  these figures.)
"""
from __future__ import annotations

import sys

PYMALLOC_LIMIT = 512  # bytes; larger requests go to the system malloc
RSS_SLACK = 1.2  # RSS per byte of live objects under eviction churn (measured above)
_EMPTY_DICT = sys.getsizeof({})


def alloc(nbytes: int) -> int:
    """Bytes an allocation of `nbytes` really takes (size-class or malloc-chunk rounding)."""
    if nbytes <= PYMALLOC_LIMIT:
        return (nbytes + 15) & ~15
    return max(32, (nbytes + 8 + 15) & ~15)


def obj_bytes(obj: object) -> int:
    """RAM taken by one object that is a single allocation (str, bytes, float, int, tuple, slotted object)."""
    return alloc(sys.getsizeof(obj))


def dict_bytes(d: dict | None) -> int:
    """RAM taken by a dict: its object and, when it has one of its own, its key table."""
    if d is None:
        return 0
    size = sys.getsizeof(d)
    if size <= _EMPTY_DICT:
        return alloc(size)
    return alloc(_EMPTY_DICT) + alloc(size - _EMPTY_DICT)


def list_bytes(lst: list) -> int:
    """RAM taken by a list: its object (56 bytes with GC header) and its item array."""
    size = sys.getsizeof(lst)
    base = sys.getsizeof([])
    return alloc(base) + (alloc(size - base) if size > base else 0)


def char_key_bytes(ch: str) -> int:
    """Cost of a one-character dict key: CPython caches the Latin-1 ones, others are new objects."""
    return 0 if ord(ch) < 256 else obj_bytes(ch)


def utf8_len(text: str) -> int:
    """Length of `text` in UTF-8 (O(1) for ASCII text, which CPython flags)."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))
