"""Keyword search over the RAM entries (BM25 over the radix tree) and rank fusion."""
from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from aios.managers.base import OpError
from aios.managers.memory.bm25 import BM25, count_in_text, count_in_tree, query_terms, tokenize
from aios.managers.memory.fusion import fuse
from aios.managers.memory.radix import RadixTree
from aios.managers.memory.store import MemoryStore
from aios.protocol import ErrorCode


def test_tokenize_casefolds_and_splits_on_non_word_characters() -> None:
    assert tokenize("Hello, WORLD! Straße café_1 日本語-text x2") == [
        "hello", "world", "strasse", "café_1", "日本語", "text", "x2"]
    assert tokenize("  ...  ") == []
    assert query_terms("cat Cat dog CAT") == ("cat", "dog")


def test_counting_over_the_tree_equals_counting_each_text() -> None:
    """Words cut by edges (shared prefixes end mid-word) must be counted as whole words."""
    rng = random.Random(2)
    vocab = ["cat", "category", "cats", "dog", "Dogma", "é", "ÉCOLE", "日本", "x"]
    for _ in range(40):
        tree = RadixTree()
        texts: list[str] = []
        for _ in range(30):
            if texts and rng.random() < 0.6:  # extend a prefix of an earlier text, cut anywhere
                base = rng.choice(texts)
                base = base[:rng.randint(0, len(base))]
            else:
                base = ""
            words = rng.choices(vocab, k=rng.randint(0, 5))
            seps = rng.choices([" ", ", ", "-", "\n", ""], k=len(words))
            texts.append(base + "".join(w + s for w, s in zip(words, seps)))
        handles = {}
        for text in texts:
            handles.setdefault(text, tree.insert(text))
            if rng.random() < 0.2:
                tree.insert(text)  # duplicates count as separate entries
        terms = ("cat", "category", "dog", "dogma", "école", "日本")
        counts = count_in_tree(tree, terms)
        for text, handle in handles.items():
            expected = count_in_text(text, terms)
            if any(expected[0]):
                assert counts.matches[handle] == expected, text
            else:
                assert handle not in counts.matches
        assert counts.entries == len(tree)
        # total length over entries, duplicates included
        total = 0
        for handle in handles.values():
            total += count_in_text(tree.get(handle), terms)[1] * handle.refs
        assert counts.total_length == total


def reference_bm25(texts: dict[str, str], query: str, k1: float = 1.2, b: float = 0.75) -> dict[str, float]:
    """BM25 written out directly on whole texts, independently of the engine's code paths."""
    docs = {key: Counter(tokenize(text)) for key, text in texts.items()}
    lengths = {key: sum(c.values()) for key, c in docs.items()}
    n = len(docs)
    avgdl = sum(lengths.values()) / n
    scores: dict[str, float] = {}
    for term in dict.fromkeys(tokenize(query)):
        df = sum(1 for c in docs.values() if term in c)
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for key, c in docs.items():
            tf = c[term]
            if tf:
                scores[key] = scores.get(key, 0.0) + idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[key] / avgdl))
    return scores


def test_store_search_scores_equal_a_direct_bm25() -> None:
    store = MemoryStore(8 << 20)
    rng = random.Random(5)
    words = ["memory", "kernel", "agent", "tool", "schedule", "token", "model", "cache", "evict", "prefix"]
    texts: dict[str, str] = {}
    prefix = "Conversation log. "
    log = prefix
    for i in range(95):  # fewer than the largest search limit, so every match is returned
        if i % 3 == 0:  # a growing log: entries that share long prefixes
            log += " ".join(rng.choices(words, k=rng.randint(3, 12))) + ". "
            text = log
        else:
            text = " ".join(rng.choices(words, k=rng.randint(1, 30)))
        texts[store.add("agent", text).id] = text
    store.add("other", "memory memory memory kernel")  # another agent's entries change nothing
    for query in ["memory", "kernel cache", "evict prefix token", "nothing-matches", "Memory, MEMORY agent"]:
        expected = reference_bm25(texts, query)
        result = store.search("agent", query, limit=100)
        assert result["complete"] is True
        got = {hit["id"]: hit["score"] for hit in result["hits"]}
        assert got.keys() == expected.keys()
        for key, score in expected.items():
            assert got[key] == pytest.approx(score, rel=1e-9)
        scores = [hit["score"] for hit in result["hits"]]
        assert scores == sorted(scores, reverse=True)
        for hit in result["hits"]:
            assert hit["ranking"] == "bm25" and hit["source"] == "ram"
            assert hit["content"] == texts[hit["id"]]


def test_ranking_on_a_small_example_worked_by_hand() -> None:
    store = MemoryStore(1 << 20)
    ids = {name: store.add("a", text).id for name, text in {
        "twice": "cat cat dog",     # same length as "once", the term twice
        "once": "cat dog dog",
        "long": "cat dog bird fish fish fish",  # the term once, in a longer entry
        "none": "dog bird fish",
    }.items()}
    hits = store.search("a", "cat")["hits"]
    assert [h["id"] for h in hits] == [ids["twice"], ids["once"], ids["long"]]  # tf, then length
    # a rarer term weighs more: "bird" is in 2 entries, "dog" in all 4
    hits = store.search("a", "bird dog")["hits"]
    assert {h["id"] for h in hits[:2]} == {ids["none"], ids["long"]}
    assert store.search("a", "cat", limit=1)["hits"][0]["id"] == ids["twice"]


def test_search_arguments_are_checked() -> None:
    store = MemoryStore(1 << 20)
    store.add("a", "text")
    for query in ["", "   ", "!!! ---", 7]:
        with pytest.raises(OpError) as err:
            store.search("a", query)  # type: ignore[arg-type]
        assert err.value.code is ErrorCode.INVALID_ARGUMENT
    with pytest.raises(OpError) as err:
        store.search("a", "x" * 1001)
    assert err.value.code is ErrorCode.TOO_LARGE
    for limit in [0, 101, True, 2.5]:
        with pytest.raises(OpError) as err:
            store.search("a", "text", limit=limit)  # type: ignore[arg-type]
        assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert store.search("nobody", "text") == {"hits": [], "complete": True}


def test_bm25_rank_ignores_documents_without_terms_and_breaks_ties_by_key() -> None:
    ranked = BM25().rank(("a",), [("k2", (1,), 3), ("k1", (1,), 3), ("k0", (0,), 3)], n=3, avgdl=3.0, limit=10)
    assert [key for key, _ in ranked] == ["k1", "k2"]
    assert ranked[0][1] == ranked[1][1] > 0


def test_fusion_merges_rankings_by_rank_and_says_which_produced_each_hit() -> None:
    bm25 = [{"id": "a", "score": 9.0, "ranking": "bm25", "content": "A"},
            {"id": "b", "score": 5.0, "ranking": "bm25", "content": "B"},
            {"id": "c", "score": 1.0, "ranking": "bm25", "content": "C"}]
    meaning = [{"id": "c", "score": 0.93, "content": "C"}, {"id": "d", "score": 0.90, "content": "D"}]
    fused = fuse({"bm25": bm25, "embedding": meaning}, limit=10)
    # RRF, k = 60: c = 1/63 + 1/61; a = 1/61; b = 1/62; d = 1/62 (tie: b came from the earlier ranking)
    assert [h["id"] for h in fused] == ["c", "a", "b", "d"]
    assert fused[0]["score"] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[0]["rankings"] == {"bm25": {"rank": 3, "score": 1.0}, "embedding": {"rank": 1, "score": 0.93}}
    assert fused[1]["rankings"] == {"bm25": {"rank": 1, "score": 9.0}}
    assert fused[3]["rankings"] == {"embedding": {"rank": 2, "score": 0.90}}
    assert fused[1]["content"] == "A" and "ranking" not in fused[1]
    assert len(fuse({"bm25": bm25, "embedding": meaning}, limit=2)) == 2
