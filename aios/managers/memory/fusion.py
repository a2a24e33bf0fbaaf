"""Merging the keyword ranking (BM25) and the ranking by meaning: the more confident one leads.

Reciprocal rank fusion (summing 1 / (60 + rank) over the rankings), used here
before, did worse than its better input when one ranking returns junk for a
query: the junk pulls the other ranking's right answer down, because rank
fusion cannot see that it is junk. On aios/bench/recall_set.py (in process,
default model) it gave recall@5 0.79 where meaning alone gave 0.875, while
keywords still matched on function words; on a public conversation benchmark
it fell below keywords alone. The floors (store.py for keywords, meaning.py
for meaning) remove most junk, and with them rank fusion ties here (0.875),
but it still offers no guarantee: it lost a question to meaning alone when
the vectors were slightly degraded with noise, where this scheme did not.

So each ranking says how sure it is for this query, on a scale that means the
same from one query to the next, and the surer one leads: its hits come first,
in its order, and the other ranking's hits follow (those not already listed),
so the other one fills the places the leader leaves empty rather than taking
places from it. A hit listed by both says so.

- Keyword confidence: the best BM25 score over `BM25_SURE` (capped at 1). A
  BM25 score adds up the query terms an entry contains, each weighted by how
  rare it is (idf = ln(N / df), roughly): a word found in one entry of
  thousands is worth 6 to 8, a word most entries share little (and function
  words do not count at all: store.py). 12 is "a rare word or two" (on the
  recall set the best keyword hit scored 5 to 13 for questions that share a
  word with their answer, 3.4 to 5 for paraphrased ones, whose hits are
  coincidences). N is every record in storage's index, so in a store of a
  few dozen entries no word is rare enough to make keywords sure and meaning
  leads whenever it found something above its floor.
- Meaning confidence: how far the best hit's z-score (meaning.py) is above
  the floor, over the distance from the floor to `MEANING_SURE_Z` (capped at 1).
- Ties go to the keyword ranking: a shared rare word is evidence one can check.

Measured through the kernel (`aios bench recall`, default model, 808 turns,
160 questions): recall@5 keywords 0.500, meaning 0.875, fused 0.875 (keywords
led 29 searches, meaning 131): equal to the better input, which is what
following the surer ranking can promise where one input is at least as good
on nearly every question (here meaning: 1.0 on the questions sharing a word
with their answer, like keywords, and 0.75 on the paraphrased ones, where
keywords find nothing). With the meaning vectors degraded by added noise
(in process, same set), fused stays at or above the better input and beats
both where they are close (0.74 against 0.70 and 0.50); it falls below
keywords alone only when the vectors are close to random (meaning then still
finds "hits" above its floor and sometimes leads; rank fusion does better
there). Deterministic: the same hits in, the same list out, whatever
the order they arrived in (ties within a ranking are broken by id).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from aios.managers.memory.meaning import FLOOR_Z

#: the BM25 score at which the keyword ranking is taken as sure (one or two rare words matched)
BM25_SURE = 12.0
#: the z-score at which the ranking by meaning is taken as sure
MEANING_SURE_Z = 3.5


def keyword_confidence(hits: Sequence[Mapping[str, Any]]) -> float:
    """0..1 from the best BM25 score (hits best first)."""
    if not hits:
        return 0.0
    return max(0.0, min(1.0, float(hits[0]["score"]) / BM25_SURE))


def meaning_confidence(hits: Sequence[Mapping[str, Any]], floor_z: float = FLOOR_Z) -> float:
    """0..1 from the best hit's z-score (hits best first, each with "z")."""
    if not hits:
        return 0.0
    return max(0.0, min(1.0, (float(hits[0]["z"]) - floor_z) / (MEANING_SURE_Z - floor_z)))


def _in_order(hits: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The hits best first by score, ties by id: the order does not depend on how they arrived."""
    return sorted(hits, key=lambda h: (-float(h["score"]), str(h["id"])))


def fuse(keyword: Sequence[Mapping[str, Any]], meaning: Sequence[Mapping[str, Any]], limit: int,
         floor_z: float = FLOOR_Z) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Merge the two rankings (hits: maps with "id" and "score"; meaning's also with "z").

    Returns (hits, how): up to `limit` hits, each the fields of the hit as the leading ranking
    gave it (else as the other did), without "ranking", plus "rankings": {name: {"rank",
    "score"[, "z"]}} for every ranking that returned it; and how = {"led_by": "bm25" or
    "embedding", "confidence": {"bm25": c, "embedding": c}}.
    """
    ranked = {"bm25": _in_order(keyword), "embedding": _in_order(meaning)}
    confidence = {"bm25": round(keyword_confidence(ranked["bm25"]), 4),
                  "embedding": round(meaning_confidence(ranked["embedding"], floor_z), 4)}
    leader = "bm25" if confidence["bm25"] >= confidence["embedding"] else "embedding"
    other = "embedding" if leader == "bm25" else "bm25"
    places: dict[str, dict[str, Any]] = {}
    for name in (leader, other):
        for rank, hit in enumerate(ranked[name], start=1):
            entry = places.get(str(hit["id"]))
            if entry is None:
                entry = {k: v for k, v in hit.items() if k not in ("ranking", "rankings", "z")}
                entry["rankings"] = {}
                places[str(hit["id"])] = entry
            if name in entry["rankings"]:
                continue  # a ranking that repeats a hit counts it once, at its best rank
            entry["rankings"][name] = {"rank": rank, "score": hit.get("score")}
            if "z" in hit:
                entry["rankings"][name]["z"] = hit["z"]
    hits = list(places.values())[:max(0, limit)]  # dicts keep insertion order: leader's first
    return hits, {"led_by": leader, "confidence": confidence}
