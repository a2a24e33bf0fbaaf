"""Merging rankings that cannot be compared by score: reciprocal rank fusion.

BM25 scores (unbounded, corpus-dependent) and embedding similarities (cosine,
in [-1, 1]) live on different scales, so adding or comparing them is
meaningless. Reciprocal rank fusion (Cormack, Clarke and Buettcher, SIGIR
2009) uses ranks only: a hit's fused score is the sum over the rankings that
returned it of 1 / (k + rank), with k = 60 as in the paper. Every fused hit
says which rankings produced it and at what rank and score, so a caller can
always tell a keyword match from a match by meaning.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

RRF_K = 60


def fuse(rankings: Mapping[str, Sequence[Mapping[str, Any]]], limit: int, k: int = RRF_K) -> list[dict[str, Any]]:
    """Merge named rankings of hits (each a map with an "id", best first) into one list.

    Returns up to `limit` hits, best first: the fields of the hit as its first ranking
    gave it (without that ranking's "score" and "ranking"), plus "score" (the fused
    score) and "rankings": {name: {"rank": 1-based rank, "score": that ranking's score}}.
    Ties go to the hit that appeared in the earlier ranking, then the better rank there.
    """
    fused: dict[str, dict[str, Any]] = {}
    order: dict[str, tuple[int, int]] = {}
    for position, (name, hits) in enumerate(rankings.items()):
        for rank, hit in enumerate(hits, start=1):
            hit_id = hit["id"]
            entry = fused.get(hit_id)
            if entry is None:
                entry = {key: value for key, value in hit.items() if key not in ("score", "ranking", "rankings")}
                entry["score"] = 0.0
                entry["rankings"] = {}
                fused[hit_id] = entry
                order[hit_id] = (position, rank)
            if name in entry["rankings"]:
                continue  # a ranking that repeats a hit counts it once, at its best rank
            entry["rankings"][name] = {"rank": rank, "score": hit.get("score")}
            entry["score"] += 1.0 / (k + rank)
    best = sorted(fused.values(), key=lambda h: (-h["score"], order[h["id"]]))
    return best[:max(0, limit)]
