"""The memory manager's engine: per-agent entries in RAM, within a byte budget.

No sockets here: the manager process wraps a `MemoryStore` and gives it a
`Backing` that reaches the storage service. Two modes:

- **RAM only** (`backing=None`): RAM holds every entry; the budget is a hard
  limit, and a write that does not fit fails with QUOTA_EXCEEDED.
- **Write-through** (`backing` given): every add, update and delete is first
  written to the backing (the storage service) and only then applied in RAM,
  so a killed manager loses nothing acknowledged, and RAM is a budgeted cache.
  When the accounted bytes pass `high_water` x budget the store evicts whole
  entries, chosen by LRU-K, until they are below `low_water` x budget.
  Eviction writes nothing (the backing already has the entry); a read, an
  update or a search that needs an entry not in RAM loads it back (swap-in).

Why these choices:

- *One LRU-K across all agents.* The budget is one pool of the manager's RAM
  and eviction costs only latency (nothing is lost), so the victim is the entry
  least likely to be used again whoever owns it; per-agent pools would keep an
  idle agent's entries in RAM while a busy agent thrashes. (Fairness of
  *admission* is the access manager's business.)
- *One radix tree per agent.* Sharing across agents would save more when agents
  use the same prompts, but an agent could then learn whether another agent
  stored a given text by watching the stored-bytes figure grow or not (the
  deduplication side channel of shared storage). Agents are isolated.
- *Search with a backing goes to the backing.* The storage service indexes every
  entry (FTS5, bm25) and, being written through, is never behind RAM. Merging its
  hits with a BM25 over the RAM subset would mix two scales (different corpus
  statistics for N, df and avgdl), duplicate every hit that is in both, and still
  need the backing for the cold entries; one ranking over everything is both
  complete and consistent. The hits it returns are admitted into RAM like reads.
  The RAM ranking serves RAM-only mode (where RAM holds everything) and, marked
  incomplete, a backing whose search is missing or temporarily unavailable.
  Each hit says which ranking produced it ("ranking": "bm25", "source": "ram" or
  "storage"); merging with a ranking by meaning is fusion.py's job.
- *Bytes are counted as RAM, not as text.* `object_bytes` sums allocator-rounded
  `sys.getsizeof` of every object the store keeps (entry objects, ids, timestamps,
  packed metadata, radix nodes and labels, containers, LRU-K state, retained
  histories), kept up to date incrementally; `accounted_bytes`, what the budget
  counts, is that times the RSS measured per object byte under eviction churn
  (sizing.RSS_SLACK = 1.2). sizing.py gives the measurements against tracemalloc
  and RSS; `python -m aios.bench.memory_engine calibrate` reproduces them.

Concurrency: one lock guards all RAM state; it is never held while the backing
is called. Writes to one entry, and loads of it, are serialised by one of 64
striped locks (stripe first, then the RAM lock), so a load cannot bring back an
entry that a concurrent delete just removed, and RAM applies updates in the order
the backing received them. A search admits the backing's hits only if no write
happened meanwhile (a global write counter), for the same reason.

What an entry may hold is limits.py's (checked before anything is written);
what an entry is to callers and to the backing is records.py's.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from aios.managers.base import OpError
from aios.managers.memory.bm25 import BM25, count_in_tree, keyword_terms, query_terms
from aios.managers.memory.limits import (BUDGET_KEY, MIB, Limits, check_agent, check_content, check_id, check_limit,
                                         pack_loaded, pack_metadata, unpack)
from aios.managers.memory.lruk import LRUK, Ghosts
from aios.managers.memory.radix import RadixTree
from aios.managers.memory.records import Backing, MemoryRecord, new_id
from aios.managers.memory.sizing import RSS_SLACK, dict_bytes, obj_bytes, utf8_len
from aios.protocol import ErrorCode

__all__ = ["BUDGET_KEY", "Backing", "Limits", "MIN_BUDGET_BYTES", "MemoryRecord", "MemoryStore", "new_id"]

log = logging.getLogger("aios.memory")

MIN_BUDGET_BYTES = 64 * 1024


class _Entry:
    __slots__ = ("id", "space", "handle", "meta", "created", "updated")

    def __init__(self, entry_id: str, space: _Space, handle: Any, meta: bytes | None,
                 created: float, updated: float) -> None:
        self.id = entry_id
        self.space = space
        self.handle = handle
        self.meta = meta  # packed with msgpack: one small bytes object instead of a dict of objects
        self.created = created
        self.updated = updated


class _Space:
    """One agent's entries in RAM."""

    __slots__ = ("name", "tree", "entries", "charged")

    def __init__(self, name: str) -> None:
        self.name = name
        self.tree = RadixTree()
        self.entries: dict[str, _Entry] = {}
        self.charged = 0  # the variable part of this space last added to the store's total


_ENTRY_BYTES = obj_bytes(_Entry("", None, None, None, 0.0, 0.0))  # type: ignore[arg-type]
_SPACE_FIXED_BYTES = obj_bytes(_Space("")) + obj_bytes(RadixTree())  # + name, tree nodes, entries dict


def _entry_bytes(e: _Entry) -> int:
    size = _ENTRY_BYTES + obj_bytes(e.id) + obj_bytes(e.created)
    if e.updated is not e.created:
        size += obj_bytes(e.updated)
    if e.meta is not None:
        size += obj_bytes(e.meta)
    return size


class MemoryStore:
    """Per-agent memory entries in RAM within `budget_bytes`. Thread-safe."""

    def __init__(self, budget_bytes: int, *, k: int = 2, high_water: float = 0.8, low_water: float = 0.7,
                 correlated_period: float = 0.0, backing: Backing | None = None,
                 on_evict: Callable[[list[tuple[str, str]]], None] | None = None,
                 limits: Limits = Limits(), retained_fraction: float = 0.1, bm25: BM25 = BM25(),
                 clock: Callable[[], float] = time.time, ticker: Callable[[], float] = time.monotonic) -> None:
        """
        budget_bytes: RAM the store may account for ([memory] budget_mb x 2**20).
        k, correlated_period: LRU-K parameters (see lruk.py).
        high_water, low_water: with a backing, eviction starts above high_water x budget
            and stops below low_water x budget (fractions, 0 < low < high <= 1).
        backing: where entries persist; None runs RAM-only with a hard budget.
        on_evict: told the (agent, id) pairs evicted, after the fact, outside the lock.
        retained_fraction: share of the budget that may hold the LRU-K histories of
            evicted entries (so a swapped-in entry keeps its past references).
        clock: wall clock for created/updated; ticker: monotonic clock for LRU-K.
        """
        if budget_bytes < MIN_BUDGET_BYTES:
            raise ValueError(f"memory budget {budget_bytes} bytes is below the minimum {MIN_BUDGET_BYTES} "
                             f"({BUDGET_KEY})")
        if not 0.0 < low_water < high_water <= 1.0:
            raise ValueError(f"need 0 < low_water < high_water <= 1, got {low_water} and {high_water}")
        if on_evict is not None and backing is None:
            raise ValueError("on_evict needs a backing: without one nothing is ever evicted")
        self.budget_bytes = budget_bytes
        self.high_bytes = int(budget_bytes * high_water)
        self.low_bytes = int(budget_bytes * low_water)
        self.limits = limits
        self.max_content_bytes = min(limits.max_content_bytes, budget_bytes // 16)
        self._backing = backing
        self._on_evict = on_evict
        self._bm25 = bm25
        self._clock = clock
        self._ticker = ticker
        self._lock = threading.Lock()
        self._stripes = [threading.Lock() for _ in range(64)]
        self._spaces: dict[str, _Space] = {}
        self._bytes = 0  # spaces, trees and entries; the rest is computed on demand
        self._lru: LRUK[_Entry] | None = (LRUK(k, correlated_period, key_bytes=_ENTRY_BYTES + obj_bytes(new_id()))
                                          if backing is not None else None)
        # evicted entries' LRU-K histories, by "agent\0id"
        self._ghosts = Ghosts(int(budget_bytes * retained_fraction))
        self._writes = 0
        self.counters = {"evictions": 0, "swap_ins": 0, "hits": 0, "misses": 0, "quota_rejections": 0,
                         "searches_ram": 0, "searches_backing": 0, "backing_search_failures": 0}

    # ================================================================ ops
    def add(self, agent: str, content: str, metadata: dict[str, Any] | None = None, *,
            entry_id: str | None = None, via: Any = None) -> MemoryRecord:
        """Store a new entry; return it (with its id).

        `entry_id` names the new entry (the SDK makes one for each add; without one the store makes
        one). An add naming an entry the agent already has is that same add run again (its manager
        died under the first run, or the call was re-sent after a scheduler restart): it returns the
        entry and stores nothing, so repeating an add never makes a copy. If that entry holds other
        content or metadata, the id was reused for a different entry, and the add is refused.
        """
        check_agent(agent)
        self._check_content(content)
        meta = pack_metadata(metadata, self.limits)
        if entry_id is None:
            record, victims = self._add(agent, new_id(), content, meta, via)
            self._notify(victims)
            return record
        check_id(entry_id)
        with self._stripe(agent, entry_id):  # one run of the same add at a time
            stored = self._stored(agent, entry_id, via)
            if stored is None:
                record, victims = self._add(agent, entry_id, content, meta, via)
        if stored is None:
            self._notify(victims)
            return record
        if stored.content != content or stored.metadata != unpack(meta):
            raise OpError(ErrorCode.INVALID_ARGUMENT,
                          f"memory entry {entry_id!r} already exists with other content: an add's id must name "
                          f"a new entry (leave the id out and one is made)")
        return stored

    def _stored(self, agent: str, entry_id: str, via: Any) -> MemoryRecord | None:
        """The agent's entry `entry_id` if it exists, in RAM or in the backing (not brought into RAM)."""
        with self._lock:
            entry = self._find(agent, entry_id)
            if entry is not None:
                return self._record(entry)
        if self._backing is None:
            return None
        try:
            return self._load(agent, entry_id, via)
        except OpError as exc:
            if exc.code == ErrorCode.NOT_FOUND:
                return None
            raise

    def _add(self, agent: str, entry_id: str, content: str, meta: bytes | None,
             via: Any) -> tuple[MemoryRecord, list[tuple[str, str]]]:
        """Store a new entry: in the backing, then in RAM. Returns it and what was evicted for it."""
        now = self._clock()
        record = MemoryRecord(entry_id, content, unpack(meta), now, now)
        if self._backing is not None:
            self._backing.put(agent, record, via)
        with self._lock:
            entry = self._place(agent, record.id, content, meta, now, now)
            self._writes += 1
            if self._lru is None:
                self._enforce_budget(lambda: self._drop(entry))
                return record, []
            self._reference(entry)
            return record, self._make_room(entry)

    def get(self, agent: str, entry_id: str, *, via: Any = None) -> MemoryRecord:
        """The agent's entry, from RAM or (swap-in) from the backing."""
        check_agent(agent)
        check_id(entry_id)
        with self._lock:
            entry = self._find(agent, entry_id)
            if entry is not None:
                self.counters["hits"] += 1
                self._reference(entry)
                return self._record(entry)
            if self._backing is None:
                raise self._not_found(entry_id)
        with self._stripe(agent, entry_id):
            with self._lock:  # another thread may have brought it back while we waited
                entry = self._find(agent, entry_id)
                if entry is not None:
                    self.counters["hits"] += 1
                    self._reference(entry)
                    return self._record(entry)
                self.counters["misses"] += 1
            record = self._load(agent, entry_id, via)
            victims = self._admit([record], agent) if utf8_len(record.content) <= self.max_content_bytes else []
        self._notify(victims)
        return record

    def update(self, agent: str, entry_id: str, *, content: str | None = None,
               metadata: dict[str, Any] | None = None, via: Any = None) -> MemoryRecord:
        """Replace the content and/or the metadata (the whole map) of an entry."""
        check_agent(agent)
        check_id(entry_id)
        if content is None and metadata is None:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "nothing to update: give content, metadata or both")
        if content is not None:
            self._check_content(content)
        meta = pack_metadata(metadata, self.limits) if metadata is not None else None
        if self._backing is None:
            with self._lock:
                entry = self._find(agent, entry_id)
                if entry is None:
                    raise self._not_found(entry_id)
                old = (entry.space.tree.get(entry.handle), entry.meta, entry.updated)
                new_content = content if content is not None else old[0]
                new_meta = meta if metadata is not None else entry.meta
                self._place(agent, entry_id, new_content, new_meta, entry.created,
                            max(self._clock(), entry.created))
                self._writes += 1
                self._enforce_budget(lambda: self._place(agent, entry_id, old[0], old[1], entry.created, old[2]))
                return self._record(entry)
        with self._stripe(agent, entry_id):
            with self._lock:
                entry = self._find(agent, entry_id)
                current = self._record(entry) if entry is not None else None
            if current is None:
                current = self._load(agent, entry_id, via)
                swapped_in = True
            else:
                swapped_in = False
            new_content = content if content is not None else current.content
            new_meta = meta if metadata is not None else pack_loaded(current.metadata)
            record = MemoryRecord(entry_id, new_content, unpack(new_meta), current.created,
                            max(self._clock(), current.created))
            self._backing.put(agent, record, via)
            with self._lock:
                entry = self._place(agent, entry_id, new_content, new_meta, record.created, record.updated)
                self._writes += 1
                self.counters["swap_ins"] += swapped_in
                self._reference(entry)
                victims = self._make_room(entry)
        self._notify(victims)
        return record

    def delete(self, agent: str, entry_id: str, *, via: Any = None) -> None:
        """Remove an entry (from the backing first, then from RAM)."""
        check_agent(agent)
        check_id(entry_id)
        if self._backing is None:
            with self._lock:
                entry = self._find(agent, entry_id)
                if entry is None:
                    raise self._not_found(entry_id)
                self._drop(entry)
                self._writes += 1
            return
        with self._stripe(agent, entry_id):
            existed = self._backing.delete(agent, entry_id, via)
            with self._lock:
                entry = self._find(agent, entry_id)
                if entry is not None:
                    self._drop(entry)
                self._ghosts.take(self._ghost_key(agent, entry_id))
                self._writes += 1
        if not existed and entry is None:
            raise self._not_found(entry_id)

    def list(self, agent: str, *, offset: int = 0, limit: int = 100, via: Any = None) -> dict[str, Any]:
        """Summaries of the agent's entries (no content), oldest first: {"entries", "total", "offset"}."""
        check_agent(agent)
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "offset must be an integer >= 0")
        check_limit(limit, self.limits.max_list_limit, "limit")
        if self._backing is not None:
            entries, total = self._backing.list(agent, offset, limit, via)
            return {"entries": entries, "total": total, "offset": offset}
        with self._lock:
            space = self._spaces.get(agent)
            if space is None:
                return {"entries": [], "total": 0, "offset": offset}
            items = sorted(space.entries.values(), key=lambda e: (e.created, e.id))
            page = [{"id": e.id, "metadata": unpack(e.meta), "created": e.created, "updated": e.updated,
                     "size": space.tree.text_bytes(e.handle)} for e in items[offset:offset + limit]]
        return {"entries": page, "total": len(items), "offset": offset}

    def search(self, agent: str, query: str, *, limit: int = 10, via: Any = None) -> dict[str, Any]:
        """Keyword search: {"hits": [...], "complete": bool, "note"?: str}. A hit contains a query
        word other than a function word ("the", "what": bm25.FUNCTION_WORDS), unless the query has
        only those.

        Each hit is an entry (to_dict) plus "score", "ranking" ("bm25") and "source"
        ("storage" or "ram"). "complete" is False when only the entries in RAM could
        be ranked although others exist (the backing could not search)."""
        check_agent(agent)
        terms = keyword_terms(self.check_query(query))
        if '"' not in query and "*" not in query:  # else the caller wrote storage's query syntax: leave it
            query = " ".join(terms)
        check_limit(limit, self.limits.max_search_limit, "limit")
        note: str | None = None
        if self._backing is not None:
            writes_before = self._writes
            try:
                found = self._backing.search(agent, query, limit, via)
            except OpError as exc:
                if not exc.code.retryable:
                    raise
                found = None
                with self._lock:
                    self.counters["backing_search_failures"] += 1
                note = f"storage search failed ({exc.code.value}: {exc.message}); ranked the entries in RAM only"
            if found is not None:
                with self._lock:
                    self.counters["searches_backing"] += 1
                hits = [{**record.to_dict(), "score": score, "ranking": "bm25", "source": "storage"}
                        for record, score in found[:limit]]
                if writes_before == self._writes:  # else a hit may be stale: return it, don't cache it
                    victims = self._admit([r for r, _ in found[:limit]
                                           if utf8_len(r.content) <= self.max_content_bytes], agent,
                                          if_writes=writes_before)
                    self._notify(victims)
                return {"hits": hits, "complete": True}
            if note is None:
                note = "the storage service cannot search; ranked the entries in RAM only"
        with self._lock:
            self.counters["searches_ram"] += 1
            space = self._spaces.get(agent)
            hits = []
            if space is not None:
                counts = count_in_tree(space.tree, terms)
                matches = counts.matches
                docs = [(e, *matches[e.handle]) for e in space.entries.values() if e.handle in matches]
                avgdl = counts.total_length / counts.entries if counts.entries else 0.0
                for entry, score in self._bm25.rank(terms, docs, counts.entries, avgdl, limit,
                                                    tiebreak=lambda e: e.id):
                    self._reference(entry)
                    hits.append({**self._record(entry).to_dict(), "score": score, "ranking": "bm25",
                                 "source": "ram"})
        result: dict[str, Any] = {"hits": hits, "complete": self._backing is None}
        if note:
            result["note"] = note
        return result

    def check_query(self, query: str) -> tuple[str, ...]:
        """A search query is a string of at most `max_query_chars` with a word in it; its terms."""
        if not isinstance(query, str) or not query.strip():
            raise OpError(ErrorCode.INVALID_ARGUMENT, "query must be a non-empty string")
        if len(query) > self.limits.max_query_chars:
            raise OpError(ErrorCode.TOO_LARGE, f"query is {len(query)} characters; the limit is "
                                               f"{self.limits.max_query_chars}")
        terms = query_terms(query)
        if not terms:
            raise OpError(ErrorCode.INVALID_ARGUMENT, "query has no words to search for")
        return terms

    def stats(self, agent: str | None = None) -> dict[str, Any]:
        """Figures for the whole store, or for one agent's entries in RAM."""
        with self._lock:
            if agent is not None:
                space = self._spaces.get(agent)
                if space is None:
                    return {"agent": agent, "entries_in_ram": 0, "raw_bytes": 0, "stored_bytes": 0,
                            "compression_ratio": None, "accounted_bytes": 0}
                tree = space.tree
                return {"agent": agent, "entries_in_ram": len(space.entries), "raw_bytes": tree.raw_bytes,
                        "stored_bytes": tree.stored_bytes,
                        "compression_ratio": _ratio(tree.raw_bytes, tree.stored_bytes),
                        "accounted_bytes": int(self._space_bytes(space) * RSS_SLACK)}
            raw = sum(s.tree.raw_bytes for s in self._spaces.values())
            stored = sum(s.tree.stored_bytes for s in self._spaces.values())
            return {
                "mode": "ram-only" if self._backing is None else "write-through",
                "budget_bytes": self.budget_bytes, "high_water_bytes": self.high_bytes,
                "low_water_bytes": self.low_bytes, "accounted_bytes": self.accounted_bytes(),
                "object_bytes": self.object_bytes(),
                "entries_in_ram": sum(len(s.entries) for s in self._spaces.values()),
                "agents_in_ram": len(self._spaces), "raw_bytes": raw, "stored_bytes": stored,
                "compression_ratio": _ratio(raw, stored), "retained_histories": len(self._ghosts),
                **self.counters,
            }

    def audit(self) -> dict[str, int]:
        """Recompute the running byte total from scratch and check every tree (for tests)."""
        with self._lock:
            total = 0
            for space in self._spaces.values():
                tree_figures = space.tree.audit()
                assert tree_figures["nbytes"] == space.tree.nbytes, "tree byte count drifted"
                assert tree_figures["handle_count"] == len(space.entries), "tree and entries disagree"
                total += self._space_bytes(space)
            return {"bytes": total, "running_bytes": self._bytes, "ghost_bytes": self._ghosts.audit_bytes(),
                    "running_ghost_bytes": self._ghosts.item_bytes}

    def is_resident(self, agent: str, entry_id: str) -> bool:
        """Whether the entry is in RAM now (for tests and diagnostics)."""
        with self._lock:
            return self._find(agent, entry_id) is not None

    def object_bytes(self) -> int:
        """RAM the store's objects take now, allocator rounding included (O(1))."""
        lru = self._lru.nbytes if self._lru is not None else 0
        return self._bytes + dict_bytes(self._spaces) + lru + self._ghosts.nbytes

    def accounted_bytes(self) -> int:
        """What the budget counts: object bytes times the measured RSS per object byte
        (allocator fragmentation under eviction churn; sizing.RSS_SLACK)."""
        return int(self.object_bytes() * RSS_SLACK)

    # =========================================================== internals
    def _find(self, agent: str, entry_id: str) -> _Entry | None:
        space = self._spaces.get(agent)
        return space.entries.get(entry_id) if space is not None else None

    def _stripe(self, agent: str, entry_id: str) -> threading.Lock:
        return self._stripes[hash((agent, entry_id)) & 63]

    def _record(self, entry: _Entry) -> MemoryRecord:
        return MemoryRecord(entry.id, entry.space.tree.get(entry.handle), unpack(entry.meta), entry.created,
                      entry.updated)

    def _space_bytes(self, space: _Space) -> int:
        return (_SPACE_FIXED_BYTES + obj_bytes(space.name) + space.tree.nbytes + dict_bytes(space.entries)
                + sum(_entry_bytes(e) for e in space.entries.values()))

    def _recharge(self, space: _Space) -> None:
        variable = space.tree.nbytes + dict_bytes(space.entries)
        self._bytes += variable - space.charged
        space.charged = variable

    def _place(self, agent: str, entry_id: str, content: str, meta: bytes | None, created: float,
               updated: float) -> _Entry:
        """Put an entry into RAM, replacing the one with the same id if present."""
        space = self._spaces.get(agent)
        if space is None:
            space = self._spaces[agent] = _Space(agent)
            self._bytes += _SPACE_FIXED_BYTES + obj_bytes(agent)
        entry = space.entries.get(entry_id)
        if entry is None:
            entry = _Entry(entry_id, space, space.tree.insert(content), meta, created, updated)
            space.entries[entry_id] = entry
        else:
            self._bytes -= _entry_bytes(entry)
            old = entry.handle
            entry.handle = space.tree.insert(content)  # before removing the old text: shared nodes stay
            space.tree.remove(old)
            entry.meta, entry.created, entry.updated = meta, created, updated
        self._bytes += _entry_bytes(entry)
        self._recharge(space)
        return entry

    def _drop(self, entry: _Entry) -> None:
        """Take an entry out of RAM (and out of LRU-K, returning nothing)."""
        space = entry.space
        if self._lru is not None and entry in self._lru:
            self._lru.remove(entry)
        space.tree.remove(entry.handle)
        del space.entries[entry.id]
        self._bytes -= _entry_bytes(entry)
        # LRU-K's heap may still hold this object until its stale item is discarded: let it
        # hold only the bare entry, not the text (LRUK counts those leftovers).
        entry.handle = entry.meta = None
        self._recharge(space)
        if not space.entries:
            del self._spaces[space.name]
            self._bytes -= _SPACE_FIXED_BYTES + obj_bytes(space.name) + space.charged

    def _reference(self, entry: _Entry) -> None:
        if self._lru is None:
            return
        history = None
        if entry not in self._lru:
            history = self._ghosts.take(self._ghost_key(entry.space.name, entry.id))
        self._lru.reference(entry, self._ticker(), history)

    def _enforce_budget(self, undo: Callable[[], object]) -> None:
        """RAM-only mode: the write just applied must fit in the budget, else undo it."""
        used = self.accounted_bytes()
        if used > self.budget_bytes:
            undo()
            self.counters["quota_rejections"] += 1
            raise OpError(ErrorCode.QUOTA_EXCEEDED,
                          f"memory is full: this write would take the memory manager to {used} bytes, over its "
                          f"budget of {self.budget_bytes} bytes ({BUDGET_KEY} = {self.budget_bytes / MIB:g}); "
                          f"delete entries, or raise the budget, or configure a storage service to evict to")

    def _make_room(self, keep: _Entry | None) -> list[tuple[str, str]]:
        """Above high water, evict LRU-K victims (never `keep`) until below low water."""
        victims: list[tuple[str, str]] = []
        if self._lru is None or self.accounted_bytes() <= self.high_bytes:
            return victims
        now = self._ticker()
        while self.accounted_bytes() > self.low_bytes:
            entry = self._lru.victim(now, exclude=keep)
            if entry is None:
                break
            key = (entry.space.name, entry.id)
            history = self._lru.remove(entry)
            self._drop(entry)
            self._ghosts.keep(self._ghost_key(*key), history)
            victims.append(key)
        self.counters["evictions"] += len(victims)
        return victims

    @staticmethod
    def _ghost_key(agent: str, entry_id: str) -> str:
        return agent + "\0" + entry_id

    def _load(self, agent: str, entry_id: str, via: Any) -> MemoryRecord:
        assert self._backing is not None
        record = self._backing.get(agent, entry_id, via)
        if record is None:
            raise self._not_found(entry_id)
        if not isinstance(record, MemoryRecord) or record.id != entry_id or not isinstance(record.content, str):
            raise OpError(ErrorCode.INTERNAL, f"the storage service returned a malformed memory entry for {entry_id!r}")
        return record

    def _admit(self, records: list[MemoryRecord], agent: str, if_writes: int | None = None) -> list[tuple[str, str]]:
        """Bring entries read from the backing into RAM (swap-in); resident ones are just referenced."""
        with self._lock:
            if if_writes is not None and if_writes != self._writes:
                return []
            entry = None
            for record in records:
                entry = self._find(agent, record.id)
                if entry is None:
                    entry = self._place(agent, record.id, record.content, pack_loaded(record.metadata),
                                        record.created, record.updated)
                    self.counters["swap_ins"] += 1
                self._reference(entry)
            return self._make_room(entry)

    def _notify(self, victims: list[tuple[str, str]]) -> None:
        if victims and self._on_evict is not None:
            try:
                self._on_evict(victims)
            except Exception:  # a notification must not fail the write that caused it
                log.exception("on_evict callback failed")

    # ---------------------------------------------------------- validation
    def _not_found(self, entry_id: str) -> OpError:
        return OpError(ErrorCode.NOT_FOUND, f"no memory entry {entry_id!r} for this agent")

    def _check_content(self, content: str) -> None:
        check_content(content, self.max_content_bytes, self.limits, self.budget_bytes)


def _ratio(raw: int, stored: int) -> float | None:
    return round(raw / stored, 3) if stored else None
