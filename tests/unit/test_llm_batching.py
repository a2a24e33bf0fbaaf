"""Batching and the prefix cache of the llama.cpp backend, without the model: the radix-tree prefix
cache as pure Python, and the backend's batching settings, checked before any model is loaded.
The backend on the real model is tested in tests/system/test_llm_batching.py."""
from __future__ import annotations

import random
from typing import Any

import pytest

from aios.managers.llm.backends.llamacpp import LlamaCppBackend
from aios.managers.llm.prefix_cache import PrefixCache


def test_prefix_cache_reuses_only_at_chunk_boundaries() -> None:
    c = PrefixCache(budget_bytes=10_000, chunk=4, truncate_limit=None)
    a = list(range(100, 112))  # 12 tokens: three chunks
    assert c.insert(a, b"A", 100)
    entry, usable = c.lookup(a + [1, 2, 3])  # contains the whole entry
    assert entry.payload == b"A" and usable == 12
    _, usable = c.lookup(a[:10] + [7, 7, 7, 7])  # shares 10 tokens: rounded down to the grid
    assert usable == 8
    _, usable = c.lookup(a)  # the same prompt: its last token must still be computed
    assert usable == 8
    assert c.lookup(a[:3] + [9] * 10) is None  # less than one chunk in common
    assert c.lookup([5] + a) is None
    with pytest.raises(ValueError):
        c.insert(a[:6], b"x", 10)  # not a multiple of the chunk


def test_prefix_cache_long_entries_serve_only_prompts_that_contain_them() -> None:
    """Past the sliding window a saved state cannot be cut to a shorter prefix."""
    c = PrefixCache(budget_bytes=10_000, chunk=4, truncate_limit=8)
    long = list(range(16))
    assert c.insert(long, b"L", 100)
    assert c.lookup(long[:12] + [99] * 8) is None  # would need cutting 16 -> 12
    assert c.lookup(long + [99])[1] == 16
    assert c.insert(long[:8], b"S", 50)  # a short one is kept beside it: it can be cut
    entry, usable = c.lookup(long[:6] + [99] * 8)
    assert entry.payload == b"S" and usable == 4
    entry, usable = c.lookup(long + [1])
    assert entry.payload == b"L" and usable == 16  # the longest usable match wins


def test_prefix_cache_keeps_one_entry_per_branch_when_entries_can_be_cut() -> None:
    c = PrefixCache(budget_bytes=10_000, chunk=2, truncate_limit=None)
    base = [1, 2, 3, 4]
    assert c.insert(base, b"base", 10)
    assert c.insert(base + [5, 6], b"longer", 10)  # serves everything `base` served
    assert [e.payload for e in c.entries()] == [b"longer"]
    assert not c.insert(base, b"again", 10)  # already served by the longer entry
    assert c.insert(base + [7, 8], b"branch", 10)  # a sibling branch is new
    assert len(c) == 2 and c.stats()["bytes"] == 20


def test_prefix_cache_budget_is_never_exceeded() -> None:
    rng = random.Random(7)
    budget = 1000
    c = PrefixCache(budget_bytes=budget, chunk=4, truncate_limit=16)
    for _ in range(500):
        n = 4 * rng.randint(1, 8)
        tokens = [rng.randint(0, 3) for _ in range(n)]
        c.insert(tokens, b"x", rng.randint(1, 1200))
        assert c.bytes <= budget and sum(e.size for e in c.entries()) == c.bytes
        c.lookup([rng.randint(0, 3) for _ in range(40)])
    s = c.stats()
    assert s["peak_bytes"] <= budget and s["evictions"] > 0 and s["refused"] > 0 and s["hits"] > 0


def test_prefix_cache_evicts_least_recently_used() -> None:
    c = PrefixCache(budget_bytes=30, chunk=2, truncate_limit=None)
    for i in range(3):
        c.insert([i, i], f"e{i}".encode(), 10)
    c.lookup([0, 0, 5])  # touch e0
    c.insert([9, 9], b"e9", 10)
    assert sorted(e.payload for e in c.entries()) == [b"e0", b"e2", b"e9"]


@pytest.mark.parametrize("options, names", [
    ({"max_batch": 0}, ["max_batch"]),
    ({"max_batch": 1000}, ["max_batch"]),
    ({"max_batch": "8"}, ["max_batch"]),
    ({"prefix_cache_mb": -1}, ["prefix_cache_mb"]),
    ({"prefix_cache_mb": 300, "ram_budget_mb": 256}, ["prefix_cache_mb", "ram_budget_mb"]),
    ({"prefix_cache_mb": 10 ** 9}, ["prefix_cache_mb", "RAM"]),
    ({"prefill_chunk": 0}, ["prefill_chunk"]),
    ({"prefill_chunk": 1024, "n_batch": 512}, ["prefill_chunk"]),
], ids=["max_batch-0", "max_batch-huge", "max_batch-str", "cache-negative", "cache-over-ram-budget",
        "cache-over-machine-ram", "chunk-0", "chunk-over-n_batch"])
def test_bad_settings_are_refused_naming_the_option(options: dict[str, Any], names: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        LlamaCppBackend(**options)  # checked before the model is loaded
    assert all(n in str(err.value) for n in names), str(err.value)
