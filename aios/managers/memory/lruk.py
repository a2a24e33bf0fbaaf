"""LRU-K replacement (O'Neil, O'Neil and Weikum, SIGMOD 1993).

LRU evicts whatever was touched longest ago, so one scan over many entries
pushes out the entries an agent keeps coming back to. LRU-K looks at the K-th
most recent reference instead: the victim is the entry whose K-th most recent
reference is oldest (the largest "backward K-distance"). An entry referenced
fewer than K times has an infinite distance and goes first, and among those
the least recently used goes first. With K = 2 an entry touched once in a
scan loses to one touched twice, however long ago the scan was.

Correlated references: references closer together than `correlated_period`
(e.g. an add immediately followed by a read of the same entry by the same
task) count as one; an entry still inside that period is not chosen while
another candidate exists. The period defaults to 0 (every reference counts).

Retained history: `remove` returns an entry's history, and `reference` takes
it back when the entry returns (the memory manager keeps the histories of
recently evicted entries in `Ghosts` so that a swapped-in entry is not a stranger).

Victim selection is O(log n) amortised: a heap with lazy invalidation. An
entry's sort key (K-th reference time, last reference time) only ever grows,
so a reference does not touch the heap; when a stale key reaches the top it
is re-pushed with its current value, and the first top whose key is current
is the true minimum.

Times are whatever the caller passes (monotonic seconds in the store, small
integers in the tests); only their order and differences matter.
"""
from __future__ import annotations

import heapq
import itertools
import struct
import sys
from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

from aios.managers.memory.sizing import alloc, dict_bytes, list_bytes, obj_bytes

K_ = TypeVar("K_", bound=Hashable)
History = tuple[float, ...]  # (last reference, HIST(1), ..., HIST(j)) with j <= K

_NEVER = float("-inf")  # the K-th reference time of an entry with fewer than K references


class _State:
    __slots__ = ("hist", "last", "seq")

    def __init__(self, hist: list[float], last: float, seq: int) -> None:
        self.hist = hist  # uncorrelated reference times, most recent first, at most K
        self.last = last  # the most recent reference, correlated or not
        self.seq = seq  # identifies the one heap item that speaks for this entry


class LRUK(Generic[K_]):
    """Tracks references to keys and names the LRU-K victim."""

    def __init__(self, k: int = 2, correlated_period: float = 0.0, key_bytes: int = 0) -> None:
        """key_bytes: RAM a removed key keeps alive while a stale heap item still refers to it
        (counted in `nbytes` until the item is discarded)."""
        if k < 1:
            raise ValueError("k must be at least 1")
        if correlated_period < 0:
            raise ValueError("correlated_period must not be negative")
        self.k = k
        self.correlated_period = correlated_period
        self._states: dict[K_, _State] = {}
        self._heap: list[tuple[float, float, int, K_]] = []
        self._seq = itertools.count()
        # Per tracked key: the state object, its history list (K slots), K+1 floats and the
        # seq int; plus the heap's 4-tuple (sizes as sys.getsizeof reports them; see sizing.py).
        self._key_bytes = (obj_bytes(_State([], 0.0, 0)) + alloc(sys.getsizeof([0.0] * k))
                           + (k + 1) * obj_bytes(1.5) + obj_bytes(10 ** 9))
        self._item_bytes = obj_bytes((1.0, 1.0, 10 ** 9, None))
        self._orphan_bytes = key_bytes

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: object) -> bool:
        return key in self._states

    @property
    def nbytes(self) -> int:
        """RAM held by the tracker (O(1))."""
        orphans = len(self._heap) - len(self._states)  # each live key has exactly one heap item
        return (len(self._states) * self._key_bytes + dict_bytes(self._states)
                + list_bytes(self._heap) + len(self._heap) * self._item_bytes + orphans * self._orphan_bytes)

    def _sort_key(self, st: _State) -> tuple[float, float]:
        return (st.hist[self.k - 1] if len(st.hist) >= self.k else _NEVER, st.last)

    def reference(self, key: K_, now: float, history: History | None = None) -> None:
        """Record a reference to `key` at time `now` (a new key starts being tracked;
        `history` restores what `remove` returned for it earlier)."""
        st = self._states.get(key)
        if st is None:
            fresh = not history
            st = _State([now], now, 0) if fresh else _State(list(history[1:self.k + 1]), history[0], 0)
            st.seq = next(self._seq)
            self._states[key] = st
            heapq.heappush(self._heap, (*self._sort_key(st), st.seq, key))
            if fresh:
                return
        if now - st.last > self.correlated_period:
            # A new, uncorrelated reference. The correlated burst that ended at `last` is
            # collapsed into one reference: older history moves forward by its length.
            burst = st.last - st.hist[0]
            st.hist = [now] + [t + burst for t in st.hist[: self.k - 1]]
        st.last = now
        # No heap push: the key only grew; pop-time re-validation catches up.

    def remove(self, key: K_) -> History:
        """Stop tracking `key`; return its history (for `reference(..., history=)` later)."""
        st = self._states.pop(key)
        if len(self._heap) > 2 * len(self._states) + 64:
            self._rebuild()
        return (st.last, *st.hist)

    def victim(self, now: float, exclude: object = None) -> K_ | None:
        """The key LRU-K would evict now (not removed: call `remove`), never `exclude`;
        None if there is no other key. Keys inside their correlated period are passed
        over unless nothing else is left."""
        held: list[tuple[float, float, int, K_]] = []
        found: K_ | None = None
        heap = self._heap
        while heap:
            item = heap[0]
            st = self._states.get(item[3])
            if st is None or st.seq != item[2]:
                heapq.heappop(heap)  # removed or superseded
                continue
            current = self._sort_key(st)
            if current != item[:2]:
                st.seq = next(self._seq)
                heapq.heapreplace(heap, (*current, st.seq, item[3]))
                continue
            if (exclude is not None and item[3] == exclude) or (
                    self.correlated_period and now - st.last <= self.correlated_period):
                held.append(heapq.heappop(heap))
                continue
            found = item[3]
            break
        if found is None:
            for item in held:  # all in their correlated period: take the best one anyway
                if exclude is None or item[3] != exclude:
                    found = item[3]
                    break
        for item in held:
            heapq.heappush(heap, item)
        return found

    def order(self, now: float) -> list[K_]:
        """All keys, first victim first (for tests and diagnostics; O(n log n))."""
        ranked = sorted(self._states.items(), key=lambda kv: (*self._sort_key(kv[1]), kv[1].seq))
        if self.correlated_period:
            ranked.sort(key=lambda kv: now - kv[1].last <= self.correlated_period)  # stable
        return [key for key, _ in ranked]

    def _rebuild(self) -> None:
        self._heap = [(*self._sort_key(st), st.seq, key) for key, st in self._states.items()]
        heapq.heapify(self._heap)


class Ghosts:
    """Retained histories ("ghosts"): the LRU-K histories of recently evicted entries, by key, within
    a byte limit, oldest dropped first (O'Neil's retained information).

    One string key and one bytes value per entry (about 150 bytes; a tuple key and
    a tuple of floats took 370).
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._packed: OrderedDict[str, bytes] = OrderedDict()
        self.item_bytes = 0  # keys and values, kept up to date

    def __len__(self) -> int:
        return len(self._packed)

    @property
    def nbytes(self) -> int:
        """RAM held, allocator rounding included (O(1))."""
        return self.item_bytes + alloc(sys.getsizeof(self._packed))

    def keep(self, key: str, history: History) -> None:
        packed = struct.pack(f"{len(history)}d", *history)
        self.take(key)
        self._packed[key] = packed
        self.item_bytes += obj_bytes(key) + obj_bytes(packed)
        while self.item_bytes > self.limit_bytes and self._packed:
            old_key, old_packed = self._packed.popitem(last=False)
            self.item_bytes -= obj_bytes(old_key) + obj_bytes(old_packed)

    def take(self, key: str) -> History | None:
        """The history kept for `key`, forgetting it (None if there is none)."""
        packed = self._packed.pop(key, None)
        if packed is None:
            return None
        self.item_bytes -= obj_bytes(key) + obj_bytes(packed)
        return struct.unpack(f"{len(packed) // 8}d", packed)

    def audit_bytes(self) -> int:
        """`item_bytes` recomputed from scratch (for tests)."""
        return sum(obj_bytes(key) + obj_bytes(packed) for key, packed in self._packed.items())
