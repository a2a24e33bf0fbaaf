"""Keyword search over the RAM entries (BM25 over the radix tree), ranking by meaning (calibration, floor,
vector cache) and the fusion of the two."""
from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest

from aios.managers.base import OpError
from aios.managers.memory.bm25 import BM25, count_in_text, count_in_tree, query_terms, tokenize
from aios.managers.memory.fusion import BM25_SURE, fuse
from aios.managers.memory.meaning import FLOOR_Z, Calibration, VectorCache
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


def _kw(*scores_by_id: tuple[str, float]) -> list[dict]:
    return [{"id": i, "score": sc, "ranking": "bm25", "content": i.upper()} for i, sc in scores_by_id]


def _mn(*hits: tuple[str, float, float]) -> list[dict]:
    return [{"id": i, "score": sim, "z": z, "ranking": "embedding", "content": i.upper()} for i, sim, z in hits]


def test_the_more_confident_ranking_leads_and_the_other_only_fills() -> None:
    """Keywords matched only common words (low scores) while meaning is sure: meaning's hits come first,
    in its order, and the keyword hits only fill the places left. (Rank fusion put the junk first.)"""
    junk = _kw(("a", 2.1), ("b", 1.9), ("c", 1.5))
    meaning = _mn(("c", 0.61, 4.2), ("d", 0.55, 3.9))
    hits, how = fuse(junk, meaning, limit=10)
    assert how["led_by"] == "embedding" and how["confidence"]["embedding"] == 1.0
    assert [h["id"] for h in hits] == ["c", "d", "a", "b"]
    assert hits[0]["rankings"] == {"embedding": {"rank": 1, "score": 0.61, "z": 4.2}, "bm25": {"rank": 3, "score": 1.5}}
    assert hits[2]["rankings"] == {"bm25": {"rank": 1, "score": 2.1}} and "ranking" not in hits[2]
    assert "z" not in hits[0] and hits[0]["content"] == "C"
    # a rare word matched (a high BM25 score): keywords lead, meaning fills
    hits, how = fuse(_kw(("x", BM25_SURE), ("y", 3.0)), meaning, limit=3)
    assert how["led_by"] == "bm25" and [h["id"] for h in hits] == ["x", "y", "c"]
    # equally sure: keywords lead (a shared rare word is evidence one can check)
    hits, how = fuse(_kw(("x", BM25_SURE)), _mn(("d", 0.9, 9.0)), limit=5)
    assert how["led_by"] == "bm25" and [h["id"] for h in hits] == ["x", "d"]
    assert fuse([], [], limit=5) == ([], {"led_by": "bm25", "confidence": {"bm25": 0.0, "embedding": 0.0}})


def test_fusion_keeps_the_leaders_top_k_so_it_is_never_below_the_leader() -> None:
    """Whatever the inputs, the fused top k is the leading ranking's top k (when it has k hits)."""
    rng = random.Random(3)
    for _ in range(300):
        ids = [f"e{n}" for n in range(30)]
        kw = _kw(*[(i, rng.uniform(0.1, 20)) for i in rng.sample(ids, rng.randint(0, 20))])
        mn = _mn(*[(i, rng.uniform(-1, 1), rng.uniform(FLOOR_Z, 6)) for i in rng.sample(ids, rng.randint(0, 20))])
        k = rng.randint(1, 10)
        hits, how = fuse(kw, mn, limit=k)
        leader = sorted(kw if how["led_by"] == "bm25" else mn, key=lambda h: (-h["score"], h["id"]))
        assert [h["id"] for h in hits[:len(leader[:k])]] == [h["id"] for h in leader[:k]]
        assert len({h["id"] for h in hits}) == len(hits) == min(k, len({h["id"] for h in kw + mn}))


def test_fusion_is_the_same_whatever_order_the_hits_arrive_in() -> None:
    kw = _kw(("a", 3.0), ("b", 3.0), ("c", 3.0), ("d", 1.0))
    mn = _mn(("d", 0.5, 2.5), ("e", 0.5, 2.5), ("a", 0.4, 2.2))
    expected = fuse(kw, mn, limit=10)
    rng = random.Random(1)
    for _ in range(20):
        assert fuse(rng.sample(kw, len(kw)), rng.sample(mn, len(mn)), limit=10) == expected
    assert expected[1]["led_by"] == "embedding"
    assert [h["id"] for h in expected[0]] == ["d", "e", "a", "b", "c"]  # equal scores: by id


def _vectors(rng: np.random.Generator, n: int, common: np.ndarray, dims: int = 32) -> np.ndarray:
    """Vectors that share one dominant direction, like mean-pooled hidden states do."""
    return common + rng.normal(size=(n, dims))


def test_meaning_floor_drops_what_is_no_closer_than_generic_text() -> None:
    """Raw cosines are all high (a shared direction); after calibration an unrelated query finds
    nothing, and an entry close to the query clears the floor."""
    rng = np.random.default_rng(7)
    common = np.full(32, 4.0)
    calibration = Calibration("m", _vectors(rng, 64, common))
    notes = _vectors(rng, 3, common)
    peanut = _vectors(rng, 1, common)[0]
    raw = notes @ peanut / (np.linalg.norm(notes, axis=1) * np.linalg.norm(peanut))
    assert raw.min() > 0.8  # what made every entry a hit before
    candidates = [(f"n{i}", calibration.project(v)) for i, v in enumerate(notes)]
    assert calibration.rank(peanut, candidates, limit=10) == []
    near = notes[1] + 0.3 * rng.normal(size=32)  # a query close to note 1
    hits = calibration.rank(near, candidates, limit=10)
    assert [h.key for h in hits] == ["n1"] and hits[0].z >= FLOOR_Z
    assert calibration.rank(near, candidates, limit=10, floor_z=-1e9)[0].key == "n1"


def test_meaning_ties_are_broken_by_key_and_dimensions_must_match() -> None:
    rng = np.random.default_rng(2)
    calibration = Calibration("m", _vectors(rng, 16, np.full(32, 1.0)))
    q = rng.normal(size=32)
    same = calibration.project(q)
    hits = calibration.rank(q, [("b", same), ("a", same), ("c", same)], limit=10)
    assert [h.key for h in hits] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="16 dimensions"):
        calibration.project([0.0] * 16)
    with pytest.raises(ValueError):
        Calibration("m", [[1.0, 2.0]] * 3)  # too few to calibrate on


def test_vector_cache_keeps_the_model_and_version_with_each_vector() -> None:
    cache = VectorCache(1 << 20)
    vec = np.ones(8, dtype=np.float32)
    cache.put("a", "e1", 1.0, "gemma", vec)
    assert cache.get("a", "e1", 1.0, "gemma") is vec
    assert cache.get("a", "e1", 1.0, "minilm") is None  # another model: recompute, never mix
    assert cache.get("a", "e1", 2.0, "gemma") is None  # the entry changed
    assert cache.get("b", "e1", 1.0, "gemma") is None
    small = VectorCache(2 * (32 + VectorCache.ITEM_OVERHEAD))
    for n in range(3):
        small.put("a", f"e{n}", 1.0, "m", np.ones(8, dtype=np.float32))
    assert len(small) == 2 and small.get("a", "e0", 1.0, "m") is None and small.bytes <= small.budget


def test_empty_content_is_refused() -> None:
    store = MemoryStore(1 << 20)
    for content in ["", "   ", "\n\t"]:
        with pytest.raises(OpError) as err:
            store.add("a", content)
        assert err.value.code is ErrorCode.INVALID_ARGUMENT and "empty" in err.value.message
    e = store.add("a", "kept")
    with pytest.raises(OpError) as err:
        store.update("a", e.id, content="")
    assert err.value.code is ErrorCode.INVALID_ARGUMENT
    assert store.get("a", e.id).content == "kept"


def test_a_keyword_hit_must_share_more_than_function_words_with_the_query() -> None:
    """A question is full of "what", "is", "the": sharing only those is no match (it was, before)."""
    store = MemoryStore(1 << 20)
    ids = [store.add("a", text).id for text in ["The harbour opens at dawn.", "What is the tide table for today?",
                                                 "Paris is the capital of France."]]
    assert store.search("a", "What is the name of the ship?")["hits"] == []
    assert [h["id"] for h in store.search("a", "What is the capital of France?")["hits"]] == [ids[2]]
    assert {h["id"] for h in store.search("a", "What is the")["hits"]} == set(ids)  # only function words: kept
