"""The memory manager's engine (MemoryStore): ops, scoping, limits, budget, eviction, swap-in.

`DictBacking` below is a test sink standing in for the storage service (which is
another manager process): it keeps written-through entries in a dict so that
evicted entries can be loaded back. It is not part of the kernel.
"""
from __future__ import annotations

import gc
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from aios.bench.memory_backings import SqliteBacking
from aios.bench.memory_workloads import conversation_logs, distinct_notes, templated_notes
from aios.managers.base import OpError
from aios.managers.memory.store import BUDGET_KEY, MemoryStore, MemoryRecord
from aios.memory_ids import new_entry_id
from aios.protocol import ErrorCode

KIB = 1024


class DictBacking:
    """Test sink: entries written through to a dict (see the module docstring)."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], MemoryRecord] = {}
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.fail_put: OpError | None = None
        self.fail_search: OpError | None = None
        self.searchable = False
        self.hold_get: threading.Event | None = None  # when set, get waits for it (race tests)
        self.hold_search: threading.Event | None = None
        self.in_get = threading.Event()
        self.in_search = threading.Event()

    def put(self, agent: str, record: MemoryRecord, via: Any) -> None:
        if self.fail_put is not None:
            raise self.fail_put
        with self.lock:
            self.calls.append(("put", record.id))
            self.records[(agent, record.id)] = record

    def get(self, agent: str, entry_id: str, via: Any) -> MemoryRecord | None:
        with self.lock:
            self.calls.append(("get", entry_id))
            record = self.records.get((agent, entry_id))
        self.in_get.set()
        if self.hold_get is not None:
            assert self.hold_get.wait(10)
        return record

    def delete(self, agent: str, entry_id: str, via: Any) -> bool:
        with self.lock:
            self.calls.append(("delete", entry_id))
            return self.records.pop((agent, entry_id), None) is not None

    def list(self, agent: str, offset: int, limit: int, via: Any) -> tuple[list[dict[str, Any]], int]:
        with self.lock:
            mine = sorted((r for (a, _), r in self.records.items() if a == agent), key=lambda r: (r.created, r.id))
        return [r.summary() for r in mine[offset:offset + limit]], len(mine)

    def search(self, agent: str, query: str, limit: int, via: Any) -> list[tuple[MemoryRecord, float]] | None:
        if self.fail_search is not None:
            raise self.fail_search
        if not self.searchable:
            return None
        words = set(query.lower().split())
        with self.lock:
            found = [(r, float(sum(w in words for w in r.content.lower().split())))
                     for (a, _), r in self.records.items() if a == agent]
        self.in_search.set()
        if self.hold_search is not None:
            assert self.hold_search.wait(10)
        return sorted([f for f in found if f[1] > 0], key=lambda f: -f[1])[:limit]


def op_error(code: ErrorCode, fn: Any, *args: Any, **kwargs: Any) -> OpError:
    with pytest.raises(OpError) as err:
        fn(*args, **kwargs)
    assert err.value.code is code, err.value.message
    return err.value


def assert_accounting_consistent(store: MemoryStore) -> None:
    figures = store.audit()
    assert figures["bytes"] == figures["running_bytes"]
    assert figures["ghost_bytes"] == figures["running_ghost_bytes"]


def push_out(store: MemoryStore, agent: str, entry_id: str) -> None:
    """Write fillers, each referenced twice (so LRU-K ranks them above any entry used before
    them), until `entry_id` is evicted."""
    for n in range(20000):
        if not store.is_resident(agent, entry_id):
            return
        store.get(agent, store.add(agent, f"filler {n} " + "x" * 300).id)
    raise AssertionError("the entry was never evicted")


# ------------------------------------------------------------------ basic ops
TEXTS = ["  padded with white space  ", "plain text", "Grüße 日本語 😀👍🏽 e\u0301", "nul\x00byte", "line\nbreaks\r\n\ttabs", "x" * 20000]


def test_entries_round_trip_exactly_with_metadata_and_timestamps() -> None:
    clock = iter(range(1000, 2000)).__next__
    store = MemoryStore(4 << 20, clock=lambda: float(clock()))
    made = [store.add("a", text, {"i": i, "tag": "t", "ok": True, "f": 1.5, "none": None})
            for i, text in enumerate(TEXTS)]
    for i, (record, text) in enumerate(zip(made, TEXTS)):
        got = store.get("a", record.id)
        assert got.content == text
        assert got.metadata == {"i": i, "tag": "t", "ok": True, "f": 1.5, "none": None}
        assert got.created == got.updated == record.created
    assert made[0].created < made[1].created
    assert len({r.id for r in made}) == len(made)
    assert store.get("a", made[0].id).metadata is not store.get("a", made[0].id).metadata  # copies
    assert_accounting_consistent(store)


def test_ids_are_unguessable() -> None:
    store = MemoryStore(1 << 20)
    ids = [store.add("a", "same").id for _ in range(200)]
    assert len(set(ids)) == 200
    for entry_id in ids:
        assert len(entry_id) == 25 and all(c.isalnum() or c in "-_" for c in entry_id)  # time + 84 random bits


def test_update_replaces_content_or_metadata_and_keeps_created() -> None:
    ticks = iter(range(1, 100))
    store = MemoryStore(1 << 20, clock=lambda: float(next(ticks)))
    record = store.add("a", "first version", {"v": 1})
    updated = store.update("a", record.id, content="second version")
    assert (updated.content, updated.metadata, updated.created) == ("second version", {"v": 1}, record.created)
    assert updated.updated > record.updated
    updated = store.update("a", record.id, metadata={"v": 2, "extra": "x"})
    assert (updated.content, updated.metadata) == ("second version", {"v": 2, "extra": "x"})
    updated = store.update("a", record.id, metadata={})
    assert store.get("a", record.id).metadata == {}
    op_error(ErrorCode.INVALID_ARGUMENT, store.update, "a", record.id)
    op_error(ErrorCode.NOT_FOUND, store.update, "a", "unknown-id", content="x")
    assert_accounting_consistent(store)


def test_delete_removes_and_frees() -> None:
    store = MemoryStore(4 << 20)
    keep = store.add("a", "kept entry")
    empty = store.object_bytes()
    ids = [store.add("a", text).id for text in templated_notes(200)]
    assert store.object_bytes() > empty
    for entry_id in ids:
        store.delete("a", entry_id)
        op_error(ErrorCode.NOT_FOUND, store.get, "a", entry_id)
    op_error(ErrorCode.NOT_FOUND, store.delete, "a", ids[0])
    # what is left is the kept entry, plus the capacity CPython dicts keep after deletions
    assert store.object_bytes() - empty < 20 * KIB
    assert store.get("a", keep.id).content == "kept entry"
    store.delete("a", keep.id)
    assert store.stats()["agents_in_ram"] == 0
    assert store.object_bytes() < 2 * KIB  # the empty agent space is dropped too
    assert_accounting_consistent(store)


def test_list_pages_through_summaries_oldest_first() -> None:
    ticks = iter(range(1, 100))
    store = MemoryStore(1 << 20, clock=lambda: float(next(ticks)))
    ids = [store.add("a", f"entry {i} é", {"i": i}).id for i in range(7)]
    page = store.list("a", offset=2, limit=3)
    assert page["total"] == 7 and page["offset"] == 2
    assert [e["id"] for e in page["entries"]] == ids[2:5]
    assert page["entries"][0] == {"id": ids[2], "metadata": {"i": 2}, "created": 3.0, "updated": 3.0,
                                  "size": len("entry 2 é".encode())}
    assert store.list("a", offset=7)["entries"] == []
    assert store.list("nobody") == {"entries": [], "total": 0, "offset": 0}
    op_error(ErrorCode.INVALID_ARGUMENT, store.list, "a", offset=-1)
    op_error(ErrorCode.INVALID_ARGUMENT, store.list, "a", limit=0)
    op_error(ErrorCode.INVALID_ARGUMENT, store.list, "a", limit=1001)


# ------------------------------------------------------------------- scoping
@pytest.mark.parametrize("backed", [False, True])
def test_an_agent_cannot_reach_another_agents_entries(backed: bool) -> None:
    store = MemoryStore(1 << 20, backing=DictBacking() if backed else None)
    secret = store.add("alice", "alice's secret plan", {"owner": "alice"})
    op_error(ErrorCode.NOT_FOUND, store.get, "bob", secret.id)
    op_error(ErrorCode.NOT_FOUND, store.update, "bob", secret.id, content="overwritten")
    op_error(ErrorCode.NOT_FOUND, store.delete, "bob", secret.id)
    assert store.list("bob")["entries"] == []
    assert store.search("bob", "secret plan")["hits"] == []
    assert store.get("alice", secret.id).content == "alice's secret plan"
    assert store.stats("bob")["entries_in_ram"] == 0


# ---------------------------------------------------------------- validation
def test_bad_arguments_are_refused_with_actionable_messages() -> None:
    store = MemoryStore(1 << 20)
    op_error(ErrorCode.INVALID_ARGUMENT, store.add, "a", b"bytes")  # type: ignore[arg-type]
    op_error(ErrorCode.INVALID_ARGUMENT, store.add, "a", "lone \ud800 surrogate")
    op_error(ErrorCode.INVALID_ARGUMENT, store.add, "", "no agent")
    too_big = op_error(ErrorCode.TOO_LARGE, store.add, "a", "x" * (store.max_content_bytes + 1))
    assert BUDGET_KEY in too_big.message and str(store.max_content_bytes) in too_big.message
    store.add("a", "x" * store.max_content_bytes)  # exactly the limit is fine
    assert "é" * (store.max_content_bytes // 2) and store.add("a", "é" * (store.max_content_bytes // 2))
    op_error(ErrorCode.TOO_LARGE, store.add, "a", "é" * (store.max_content_bytes // 2 + 1))  # UTF-8 bytes count

    op_error(ErrorCode.INVALID_ARGUMENT, store.add, "a", "t", ["not", "a", "map"])  # type: ignore[arg-type]
    op_error(ErrorCode.INVALID_ARGUMENT, store.add, "a", "t", {"": 1})
    op_error(ErrorCode.INVALID_ARGUMENT, store.add, "a", "t", {"k" * 65: 1})
    op_error(ErrorCode.INVALID_ARGUMENT, store.add, "a", "t", {1: 1})  # type: ignore[dict-item]
    op_error(ErrorCode.INVALID_ARGUMENT, store.add, "a", "t", {"nested": {"a": 1}})
    op_error(ErrorCode.INVALID_ARGUMENT, store.add, "a", "t", {"list": [1]})
    op_error(ErrorCode.INVALID_ARGUMENT, store.add, "a", "t", {"nan": float("nan")})
    op_error(ErrorCode.INVALID_ARGUMENT, store.add, "a", "t", {"big": 2 ** 70})
    op_error(ErrorCode.TOO_LARGE, store.add, "a", "t", {f"k{i}": i for i in range(33)})
    op_error(ErrorCode.TOO_LARGE, store.add, "a", "t", {"long": "v" * 1025})
    op_error(ErrorCode.TOO_LARGE, store.add, "a", "t", {f"k{i}": "v" * 1000 for i in range(5)})  # > 4096 packed
    assert store.add("a", "t", {f"k{i}": i for i in range(32)}).metadata["k31"] == 31

    for bad_id in ["", "has space", "x" * 65, "slash/", 5]:
        op_error(ErrorCode.INVALID_ARGUMENT, store.get, "a", bad_id)
    op_error(ErrorCode.NOT_FOUND, store.get, "a", "A" * 25)


def test_tiny_budgets_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="budget"):
        MemoryStore(1000)
    with pytest.raises(ValueError):
        MemoryStore(1 << 20, high_water=0.7, low_water=0.8)
    with pytest.raises(ValueError):
        MemoryStore(1 << 20, on_evict=lambda victims: None)  # nothing is evicted without a backing


# ---------------------------------------------------------------- compression
def test_sharing_shows_in_the_stats() -> None:
    store = MemoryStore(32 << 20)
    for log in conversation_logs(conversations=4, turns=20):
        store.add("chat", log)
    for note in templated_notes(300):
        store.add("notes", note)
    for note in distinct_notes(300):
        store.add("control", note)
    chat, notes, control = (store.stats(a) for a in ("chat", "notes", "control"))
    assert chat["compression_ratio"] > 5  # each transcript repeats the ones before it
    assert 1.05 < notes["compression_ratio"] < chat["compression_ratio"]
    assert control["compression_ratio"] < 1.05
    # what counts against the budget is RAM, overheads included: more than the stored text ...
    assert chat["accounted_bytes"] > chat["stored_bytes"]
    # ... yet still far below the raw text when prefixes are shared
    assert chat["raw_bytes"] / chat["accounted_bytes"] > 3
    total = store.stats()
    assert total["raw_bytes"] == chat["raw_bytes"] + notes["raw_bytes"] + control["raw_bytes"]
    assert total["stored_bytes"] == chat["stored_bytes"] + notes["stored_bytes"] + control["stored_bytes"]


@pytest.mark.parametrize("backed", [False, True])
def test_object_bytes_match_what_tracemalloc_sees(backed: bool) -> None:
    backing = DictBacking() if backed else None
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = MemoryStore(1 << 30, backing=backing)
        for n, text in enumerate(distinct_notes(3000, lo_words=3, hi_words=60)):
            store.add(f"agent-{n % 3}", text, {"n": n} if n % 2 else None)
        if backing is not None:
            backing.records.clear()  # only the store's own objects are left
            backing.calls.clear()
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # at least the exact sizes, at most the allocator's rounding (and LRU-K's spare floats) above them
    assert traced * 0.98 <= store.object_bytes() <= traced * 1.3, (store.object_bytes(), traced)


# -------------------------------------------------------- RAM-only hard limit
def test_ram_only_budget_is_a_hard_limit() -> None:
    budget = 256 * KIB
    store = MemoryStore(budget)
    kept: dict[str, str] = {}
    texts = distinct_notes(5000, lo_words=20, hi_words=80)
    with pytest.raises(OpError) as err:
        for text in texts:
            kept[store.add("a", text).id] = text
            assert store.accounted_bytes() <= budget
    assert err.value.code is ErrorCode.QUOTA_EXCEEDED
    assert BUDGET_KEY in err.value.message and str(budget) in err.value.message
    assert store.accounted_bytes() <= budget
    stats = store.stats()
    assert stats["evictions"] == 0 and stats["quota_rejections"] == 1 and stats["entries_in_ram"] == len(kept)
    for entry_id, text in kept.items():  # nothing was lost
        assert store.get("a", entry_id).content == text
    # an update that would not fit is refused and leaves the entry as it was
    victim_id, victim_text = next(iter(kept.items()))
    op_error(ErrorCode.QUOTA_EXCEEDED, store.update, "a", victim_id, content="y" * store.max_content_bytes)
    assert store.get("a", victim_id).content == victim_text
    assert_accounting_consistent(store)
    # deleting makes room again
    for entry_id in list(kept)[:20]:
        store.delete("a", entry_id)
    store.add("a", "fits again")


# ------------------------------------------------------ eviction and swap-in
def test_writing_ten_times_the_budget_evicts_within_it_and_loses_nothing() -> None:
    budget = 256 * KIB
    backing = DictBacking()
    evicted: list[tuple[str, str]] = []
    store = MemoryStore(budget, backing=backing, on_evict=evicted.extend)
    written = 0
    expected: dict[tuple[str, str], str] = {}
    texts = iter(distinct_notes(100000, lo_words=5, hi_words=150))
    n = 0
    while written < 10 * budget:
        agent = f"agent-{n % 3}"
        text = next(texts) if n % 4 else "Shared opening of a transcript. " * 4 + next(texts)
        record = store.add(agent, text, {"n": n})
        expected[(agent, record.id)] = text
        written += len(text.encode())
        n += 1
        assert store.accounted_bytes() <= store.high_bytes  # after every write
    stats = store.stats()
    assert stats["evictions"] > 0 and stats["evictions"] == len(evicted)
    assert stats["entries_in_ram"] < len(expected)
    assert not any(store.is_resident(*key) for key in evicted[:50] if evicted.count(key) == 1)
    # every entry reads back exactly; the evicted ones come back through the backing
    swap_ins = stats["swap_ins"]
    loaded = 0
    for (agent, entry_id), text in expected.items():
        resident = store.is_resident(agent, entry_id)
        record = store.get(agent, entry_id)
        assert record.content == text and record.metadata["n"] >= 0
        loaded += not resident
        assert store.accounted_bytes() <= store.high_bytes
    assert loaded > 0 and store.stats()["swap_ins"] == swap_ins + loaded
    assert_accounting_consistent(store)


def test_lru_k_keeps_the_entries_used_twice_through_a_scan() -> None:
    """Hot entries are read once after being written (two references); a scan of entries
    written once follows. LRU would evict the hot entries first (their last use is the
    oldest); LRU-2 evicts the scan first."""
    backing = DictBacking()
    store = MemoryStore(256 * KIB, backing=backing)
    hot = [store.add("a", f"hot entry {i} " + "h" * 400).id for i in range(10)]
    for entry_id in hot:
        store.get("a", entry_id)
    scan = []
    while store.stats()["evictions"] == 0:
        scan.append(store.add("a", f"scan entry {len(scan)} " + "s" * 400).id)
    evicted_first = store.stats()["evictions"]
    assert all(store.is_resident("a", entry_id) for entry_id in hot)
    assert not store.is_resident("a", scan[0])  # the oldest scan entries went
    assert sum(not store.is_resident("a", e) for e in scan) == evicted_first
    # K = 1 (plain LRU) on the same sequence evicts the hot entries first
    lru = MemoryStore(256 * KIB, backing=DictBacking(), k=1)
    hot1 = [lru.add("a", f"hot entry {i} " + "h" * 400).id for i in range(10)]
    for entry_id in hot1:
        lru.get("a", entry_id)
    i = 0
    while lru.stats()["evictions"] == 0:
        lru.add("a", f"scan entry {i} " + "s" * 400)
        i += 1
    assert not lru.is_resident("a", hot1[0])


def test_an_evicted_entry_keeps_its_history_when_it_comes_back() -> None:
    store = MemoryStore(256 * KIB, backing=DictBacking())
    first = store.add("a", "first " + "f" * 400).id
    store.get("a", first)  # two references
    push_out(store, "a", first)
    assert store.stats()["retained_histories"] > 0
    store.get("a", first)  # swap-in: its two earlier references come back with it
    assert store.is_resident("a", first)
    assert store._lru is not None and len(store._lru._states[store._find("a", first)].hist) == 2


def test_update_and_delete_of_evicted_entries() -> None:
    backing = DictBacking()
    store = MemoryStore(256 * KIB, backing=backing)
    target = store.add("a", "target text", {"v": 1})
    push_out(store, "a", target.id)
    updated = store.update("a", target.id, metadata={"v": 2})  # loads the content it keeps
    assert (updated.content, updated.metadata, updated.created) == ("target text", {"v": 2}, target.created)
    assert backing.records[("a", target.id)].metadata == {"v": 2}
    push_out(store, "a", target.id)  # evicted again (it now has two references)
    store.delete("a", target.id)
    assert ("a", target.id) not in backing.records
    op_error(ErrorCode.NOT_FOUND, store.get, "a", target.id)
    op_error(ErrorCode.NOT_FOUND, store.delete, "a", target.id)


def test_a_failed_write_through_changes_nothing() -> None:
    backing = DictBacking()
    store = MemoryStore(1 << 20, backing=backing)
    record = store.add("a", "original")
    backing.fail_put = OpError(ErrorCode.UNAVAILABLE, "storage is restarting")
    op_error(ErrorCode.UNAVAILABLE, store.add, "a", "new")
    op_error(ErrorCode.UNAVAILABLE, store.update, "a", record.id, content="changed")
    backing.fail_put = None
    assert store.get("a", record.id).content == "original"
    assert store.stats()["entries_in_ram"] == 1 and len(backing.records) == 1


def test_list_comes_from_the_backing_when_there_is_one() -> None:
    backing = DictBacking()
    store = MemoryStore(256 * KIB, backing=backing)
    ids = [store.add("a", f"entry {i} " + "z" * 500).id for i in range(300)]
    assert store.stats()["evictions"] > 0
    listed = store.list("a", offset=0, limit=1000)
    assert listed["total"] == 300 and [e["id"] for e in listed["entries"]] == ids


# -------------------------------------------------------------- search paths
def test_search_goes_to_the_backing_and_brings_hits_back() -> None:
    backing = DictBacking()
    backing.searchable = True
    store = MemoryStore(256 * KIB, backing=backing)
    needle = store.add("a", "the needle entry").id
    push_out(store, "a", needle)
    result = store.search("a", "needle")
    assert result["complete"] is True
    assert [(h["id"], h["source"], h["ranking"]) for h in result["hits"]] == [(needle, "storage", "bm25")]
    assert result["hits"][0]["content"] == "the needle entry"
    assert store.is_resident("a", needle)  # swapped in
    assert store.stats()["searches_backing"] == 1


def test_search_falls_back_to_ram_when_the_backing_cannot_search() -> None:
    backing = DictBacking()
    store = MemoryStore(1 << 20, backing=backing)
    entry = store.add("a", "findable words").id
    result = store.search("a", "findable")
    assert result["complete"] is False and "cannot search" in result["note"]
    assert [h["id"] for h in result["hits"]] == [entry] and result["hits"][0]["source"] == "ram"
    backing.searchable = True
    backing.fail_search = OpError(ErrorCode.UNAVAILABLE, "storage restarting")
    result = store.search("a", "findable")
    assert result["complete"] is False and "UNAVAILABLE" in result["note"]
    assert [h["id"] for h in result["hits"]] == [entry]
    backing.fail_search = OpError(ErrorCode.DENIED, "no")
    op_error(ErrorCode.DENIED, store.search, "a", "findable")  # not retryable: reported as is


def test_search_through_an_fts5_backing(tmp_path: Path) -> None:
    backing = SqliteBacking(tmp_path / "memory.db", fts=True)
    try:
        store = MemoryStore(256 * KIB, backing=backing)
        ids = {store.add("a", text).id: text for text in ["cats purr", "dogs bark at cats", "birds sing"]}
        store.add("b", "cats of another agent")
        hits = store.search("a", "cats")["hits"]
        assert {h["id"] for h in hits} == {i for i, t in ids.items() if "cats" in t}
        assert all(h["source"] == "storage" and h["content"] == ids[h["id"]] for h in hits)
    finally:
        backing.close()


# ----------------------------------------------------------------- concurrency
def test_a_load_cannot_resurrect_an_entry_deleted_meanwhile() -> None:
    """get(X) of an evicted X is loading it when delete(X) arrives: the delete waits for the
    load (same entry stripe), then removes X from the backing and from RAM."""
    backing = DictBacking()
    store = MemoryStore(256 * KIB, backing=backing)
    target = store.add("a", "doomed").id
    push_out(store, "a", target)
    backing.hold_get = threading.Event()
    backing.in_get.clear()
    reader = threading.Thread(target=store.get, args=("a", target))
    reader.start()
    assert backing.in_get.wait(10)
    deleter = threading.Thread(target=store.delete, args=("a", target))
    deleter.start()
    deleter.join(0.2)
    assert deleter.is_alive() and ("delete", target) not in backing.calls  # waiting for the stripe
    backing.hold_get.set()
    reader.join(10)
    deleter.join(10)
    assert not store.is_resident("a", target)
    backing.hold_get = None
    op_error(ErrorCode.NOT_FOUND, store.get, "a", target)


def test_search_hits_are_not_cached_when_a_write_happened_meanwhile() -> None:
    backing = DictBacking()
    backing.searchable = True
    store = MemoryStore(256 * KIB, backing=backing)
    target = store.add("a", "needle in memory").id
    push_out(store, "a", target)
    backing.hold_search = threading.Event()
    results: list[dict] = []
    searcher = threading.Thread(target=lambda: results.append(store.search("a", "needle")))
    searcher.start()
    assert backing.in_search.wait(10)
    store.delete("a", target)  # deleted after storage answered the search
    backing.hold_search.set()
    searcher.join(10)
    assert results[0]["hits"][0]["id"] == target  # the search saw it (it ran first) ...
    assert not store.is_resident("a", target)  # ... but does not bring a deleted entry back
    op_error(ErrorCode.NOT_FOUND, store.get, "a", target)


@pytest.mark.timeout(60)
def test_concurrent_writers_and_readers_keep_every_entry_exact() -> None:
    backing = DictBacking()
    store = MemoryStore(256 * KIB, backing=backing)
    final: dict[str, dict[str, str | None]] = {}
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        agent = f"agent-{w % 2}"
        mine: dict[str, str | None] = {}
        try:
            for i in range(300):
                text = f"worker {w} write {i} " + "w" * (i % 50) * 10
                if i % 5 == 4 and mine:
                    entry_id = list(mine)[i % len(mine)]
                    if mine[entry_id] is not None:
                        store.delete(agent, entry_id)
                        mine[entry_id] = None
                elif i % 3 == 2 and mine:
                    entry_id = list(mine)[(i * 7) % len(mine)]
                    if mine[entry_id] is not None:
                        mine[entry_id] = store.update(agent, entry_id, content=text).content
                else:
                    mine[store.add(agent, text).id] = text
                for entry_id, expected in list(mine.items())[-3:]:
                    if expected is not None:
                        assert store.get(agent, entry_id).content == expected
                if i % 50 == 0:
                    store.search(agent, f"worker {w}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        final[agent + f"/{w}"] = mine

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert not errors, errors[0]
    assert store.stats()["evictions"] > 0
    for key, mine in final.items():
        agent = key.split("/")[0]
        for entry_id, expected in mine.items():
            if expected is None:
                op_error(ErrorCode.NOT_FOUND, store.get, agent, entry_id)
            else:
                assert store.get(agent, entry_id).content == expected
                assert backing.records[(agent, entry_id)].content == expected
    assert store.accounted_bytes() <= store.high_bytes
    assert_accounting_consistent(store)


# ----------------------------------------------------------- adds that name their entry
@pytest.mark.parametrize("backed", [True, False])
def test_an_add_naming_an_entry_it_already_stored_is_the_same_add(backed: bool) -> None:
    """The SDK names each new entry, so a repeated add (its manager died under the first run, or it
    was re-sent) finds the entry instead of adding a copy; reusing an id for other content is refused."""
    backing = DictBacking() if backed else None
    store = MemoryStore(1 << 20, backing=backing)
    entry_id = new_entry_id()
    first = store.add("a", "the boat leaves at nine", {"pier": 3}, entry_id=entry_id)
    assert first.id == entry_id
    assert store.add("a", "the boat leaves at nine", {"pier": 3}, entry_id=entry_id) == first
    assert store.list("a")["total"] == 1
    if backing is not None:
        assert [c for c in backing.calls if c[0] == "put"] == [("put", entry_id)]  # stored once
    err = op_error(ErrorCode.INVALID_ARGUMENT, store.add, "a", "something else", entry_id=entry_id)
    assert "already exists" in err.message
    op_error(ErrorCode.INVALID_ARGUMENT, store.add, "a", "x", entry_id="not an id!")
    # the id names an entry of this agent only: another agent's add with it is its own entry
    assert store.add("b", "bob's note", entry_id=entry_id).content == "bob's note"


def test_an_add_repeated_by_a_new_manager_finds_the_entry_the_first_run_stored() -> None:
    """The first run stored the entry in the backing and then its manager died: the re-run, in a
    manager with nothing in RAM, returns the stored entry and writes nothing."""
    backing = DictBacking()
    entry_id = new_entry_id()
    first = MemoryStore(1 << 20, backing=backing).add("a", "kept once", entry_id=entry_id)
    again = MemoryStore(1 << 20, backing=backing)  # the restarted manager
    backing.calls.clear()
    assert again.add("a", "kept once", entry_id=entry_id) == first
    assert backing.calls == [("get", entry_id)] and len(backing.records) == 1


def test_concurrent_runs_of_the_same_add_store_it_once() -> None:
    backing = DictBacking()
    store = MemoryStore(1 << 20, backing=backing)
    entry_id = new_entry_id()
    backing.hold_get = threading.Event()
    results: list[MemoryRecord] = []
    runs = [threading.Thread(target=lambda: results.append(store.add("a", "once", entry_id=entry_id)))
            for _ in range(2)]
    for t in runs:
        t.start()
    assert backing.in_get.wait(10)
    backing.hold_get.set()
    for t in runs:
        t.join(10)
    assert len(results) == 2 and results[0] == results[1]
    assert [c for c in backing.calls if c[0] == "put"] == [("put", entry_id)]


def test_the_memory_manager_declares_add_safe_to_repeat_and_refuses_to_rerun_an_add_without_an_id() -> None:
    """The scheduler re-runs an idempotent op whose manager died under it. An add that names its entry
    is safe to run again; one that names none may have stored it before the death, so its re-run is
    answered MANAGER_DIED, not retryable (the caller cannot tell whether it took effect)."""
    from aios.managers.memory.manager import MemoryManager
    from tests.support.manager_harness import ManagerHarness

    h = ManagerHarness(MemoryManager, options=MemoryManager.Options(storage=False, semantic="off"))
    try:
        assert h.manager.ops["add"].idempotent
        entry_id = new_entry_id()
        h.dispatch("r1", "add", {"content": "kept", "id": entry_id}, attempt=2)
        h.dispatch("r2", "add", {"content": "kept"}, attempt=2)
        h.dispatch("r3", "add", {"content": "fresh"}, attempt=1)
        answers = {a.msg.id: a for a in h.wait_for(3)}
        assert answers["r1"].status == "ok" and answers["r1"].body["id"] == entry_id
        err = answers["r2"].body["error"]
        assert (err["code"], err["retryable"]) == ("MANAGER_DIED", False) and "may or may not" in err["message"]
        assert answers["r3"].status == "ok" and answers["r3"].body["id"] != entry_id
    finally:
        h.close()
