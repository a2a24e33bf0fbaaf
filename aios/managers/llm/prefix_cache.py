"""A radix tree of token prefixes whose KV state can be reused (SGLang's RadixAttention idea).

Why: agents re-send their whole conversation on every step, and many share a
long system prompt and tool descriptions.  Measured here (Gemma 3 270M, two
cores): prefill runs at about 900-1000 tokens/s and decoding at about 100, so
a 500-token prompt costs as much as 50 generated tokens.  A request whose
prompt starts with a cached prefix restores that prefix's KV state instead
of computing it and prefills only the rest.

What is cached: the backend's saved sequence state (opaque bytes) for the
first `length` tokens of some earlier prompt.  Values are bytes, not cells
pinned in the model's KV cache, so the cache never competes with running
generations for KV cells and its size is a plain RAM budget
(`budget_bytes`), evicted least recently used first.

Two rules come from the model, not from this module:
- Reuse happens only at multiples of `chunk`: the backend prefills in
  fixed-boundary chunks, and only KV computed over the same chunk
  boundaries is bit-identical to what a fresh prefill would compute
  (measured: the KV of a prefix depends on how the prompt was split into
  decode calls).  So every stored length is a multiple of `chunk`, and a
  match is rounded down to one.
- An entry may serve a *shorter* prefix of itself (restored, then cut) only
  if it is at most `truncate_limit` tokens long.  Sliding-window attention
  layers keep only the last window of positions in a saved state, so a long
  snapshot lacks what a shorter prefix needs; such entries serve only
  prompts that contain them whole.

Pure Python and thread-safe (one lock); the llama.cpp backend calls it from
its decode thread and `stats()` may be read from any thread.
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

_clock = itertools.count(1)


@dataclass(eq=False)
class Entry:
    """One cached prefix: its tokens (a multiple of the chunk) and the saved state."""

    tokens: tuple[int, ...] = field(repr=False)
    payload: Any = field(repr=False)
    size: int
    truncatable: bool
    node: "_Node" = field(repr=False)
    last_used: int = field(default_factory=lambda: next(_clock))
    hits: int = 0

    @property
    def length(self) -> int:
        return len(self.tokens)


class _Node:
    """A radix-tree node: `edge` is the run of tokens from the parent to here."""

    __slots__ = ("edge", "children", "parent", "entry", "depth")

    def __init__(self, edge: tuple[int, ...], parent: "_Node | None", depth: int) -> None:
        self.edge = edge
        self.children: dict[int, _Node] = {}
        self.parent = parent
        self.entry: Entry | None = None
        self.depth = depth  # tokens from the root to the end of this node's edge

    def subtree_entries(self) -> Iterator[Entry]:
        stack = [self]
        while stack:
            node = stack.pop()
            if node.entry is not None:
                yield node.entry
            stack.extend(node.children.values())


def _common(a: Sequence[int], b: Sequence[int], start_b: int = 0) -> int:
    """Length of the common prefix of `a` and `b[start_b:]`."""
    n = min(len(a), len(b) - start_b)
    i = 0
    while i < n and a[i] == b[start_b + i]:
        i += 1
    return i


class PrefixCache:
    def __init__(self, budget_bytes: int, chunk: int, truncate_limit: int | None = None) -> None:
        if budget_bytes < 0:
            raise ValueError("prefix cache budget must be >= 0 bytes")
        if chunk < 1:
            raise ValueError("prefix cache chunk must be >= 1 token")
        self.budget_bytes = budget_bytes
        self.chunk = chunk
        self.truncate_limit = truncate_limit
        self._root = _Node((), None, 0)
        self._entries: dict[int, Entry] = {}  # id(entry) -> entry
        self._lock = threading.Lock()
        self.bytes = 0
        self.peak_bytes = 0
        self.lookups = self.hits = self.tokens_reused = 0
        self.inserts = self.evictions = self.refused = 0

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------ queries
    def lookup(self, tokens: Sequence[int]) -> tuple[Entry, int] | None:
        """The best cached prefix for a prompt: (entry, usable tokens), or None.

        `usable` is a multiple of the chunk, at most len(tokens) - 1 (the last
        prompt token is always computed: its logits give the first sampled
        token), and when it is shorter than the entry the caller cuts the
        restored state to `usable` tokens.
        """
        limit = (len(tokens) - 1) // self.chunk * self.chunk
        with self._lock:
            self.lookups += 1
            best: tuple[Entry, int] | None = None

            def consider(entry: Entry, shared: int) -> None:
                nonlocal best
                if shared >= entry.length and entry.length <= limit:
                    usable = entry.length  # contained whole: no cut
                elif entry.truncatable:
                    usable = min(shared, limit) // self.chunk * self.chunk
                else:
                    return
                if usable <= 0:
                    return
                if best is None or usable > best[1] or (usable == best[1] and entry.last_used > best[0].last_used):
                    best = (entry, usable)

            node = self._root
            i = 0
            below: _Node | None = None  # subtree whose entries share exactly `i` tokens
            while True:
                if node.entry is not None:
                    consider(node.entry, i)
                child = node.children.get(tokens[i]) if i < len(tokens) else None
                if child is None:
                    below = node
                    break
                k = _common(child.edge, tokens, i)
                if k < len(child.edge):
                    i += k
                    below = child
                    break
                node = child
                i += k
            if limit > 0:  # every entry below the point where the prompt leaves the tree shares `i` tokens
                for entry in below.subtree_entries():
                    consider(entry, i)
            if best is None:
                return None
            entry, usable = best
            entry.last_used = next(_clock)
            entry.hits += 1
            self.hits += 1
            self.tokens_reused += usable
            return best

    # ---------------------------------------------------------------- updates
    def insert(self, tokens: Sequence[int], payload: Any, size: int) -> bool:
        """Cache the state of the prefix `tokens` (length a multiple of the chunk).

        Returns False when nothing new was stored: the prefix is already
        cached, a longer cached entry can serve it, or it does not fit in the
        budget at all.
        """
        key = tuple(tokens)
        if not key or len(key) % self.chunk:
            raise ValueError(f"prefix length {len(key)} is not a positive multiple of the chunk ({self.chunk})")
        truncatable = self.truncate_limit is None or len(key) <= self.truncate_limit
        with self._lock:
            if size > self.budget_bytes:
                self.refused += 1
                return False
            node = self._node_for(key)
            if node.entry is not None:
                node.entry.last_used = next(_clock)
                return False
            for other in node.subtree_entries():
                if other.truncatable:  # a longer entry that can be cut to this one already serves it
                    other.last_used = next(_clock)
                    self._prune(node)
                    return False
            entry = Entry(key, payload, size, truncatable, node)
            node.entry = entry
            self._entries[id(entry)] = entry
            self.bytes += size
            self.inserts += 1
            if truncatable:  # it can serve every shorter prefix of itself: those entries are redundant
                anc = node.parent
                while anc is not None:
                    if anc.entry is not None:
                        self._remove(anc.entry)
                    anc = anc.parent
            while self.bytes > self.budget_bytes:
                victim = min((e for e in self._entries.values() if e is not entry), key=lambda e: e.last_used)
                self._remove(victim)
                self.evictions += 1
            self.peak_bytes = max(self.peak_bytes, self.bytes)
            return True

    def clear(self) -> None:
        with self._lock:
            for entry in list(self._entries.values()):
                self._remove(entry)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes, "budget_bytes": self.budget_bytes,
                    "peak_bytes": self.peak_bytes, "chunk_tokens": self.chunk,
                    "cached_tokens": sum(e.length for e in self._entries.values()),
                    "lookups": self.lookups, "hits": self.hits, "tokens_reused": self.tokens_reused,
                    "inserts": self.inserts, "evictions": self.evictions, "refused": self.refused}

    def entries(self) -> list[Entry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.last_used)

    # -------------------------------------------------------------- internals
    def _node_for(self, key: tuple[int, ...]) -> _Node:
        """The node ending exactly at `key`, splitting an edge or adding a leaf as needed."""
        node = self._root
        i = 0
        while i < len(key):
            child = node.children.get(key[i])
            if child is None:
                leaf = _Node(key[i:], node, len(key))
                node.children[key[i]] = leaf
                return leaf
            k = _common(child.edge, key, i)
            if k < len(child.edge):  # split the edge at k
                mid = _Node(child.edge[:k], node, node.depth + k)
                node.children[key[i]] = mid
                child.edge = child.edge[k:]
                child.parent = mid
                mid.children[child.edge[0]] = child
                child = mid
            node = child
            i += k
        return node

    def _remove(self, entry: Entry) -> None:
        del self._entries[id(entry)]
        self.bytes -= entry.size
        node = entry.node
        node.entry = None
        entry.payload = None
        self._prune(node)

    def _prune(self, node: _Node) -> None:
        """Drop entry-less leaves up the path so the tree holds only what the entries need."""
        while node.parent is not None and node.entry is None and not node.children:
            parent = node.parent
            del parent.children[node.edge[0]]
            node = parent
