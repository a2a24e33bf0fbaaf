"""`aios bench recall`: recall@k of memory search by keywords alone, by meaning alone, and merged.

A real kernel (the default llama.cpp core for `llm.embed`, storage, memory)
gets the conversations of aios/bench/recall_set.py, one agent per
conversation, every turn a memory entry. Then every question is searched
three times in its conversation's memory, with `rankings` ["bm25"],
["embedding"] and both (the default search), and a question counts as
recalled when the turn that answers it is among the first k hits.

Printed: the set (conversations, turns, questions by kind), recall@k for each
of the three overall and by kind of question, and whether the merged search
did at least as well as the better of its two inputs (the property the
fusion is designed to keep). `--json` prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aios.bench.common import Progress, temporary_kernel
from aios.bench.recall_set import CONVERSATIONS, Conversation, describe, recall_set

RANKINGS: dict[str, list[str] | None] = {"bm25": ["bm25"], "embedding": ["embedding"], "fused": None}


def _embed_all(client: Any, total: int) -> None:
    """Search until every entry of the agent has its vector (each search embeds a batch)."""
    for _ in range(total // 16 + 4):
        reply = client.call("memory", "search", query="warm up", limit=1, rankings=["embedding"])
        if reply.get("compared_by_meaning", 0) >= reply.get("candidates_by_meaning", 0):
            return
    raise RuntimeError(f"entries still not embedded after {total // 16 + 4} searches")


def measure(run_dir: Any, conversations: list[Conversation], k: int, progress: Progress) -> dict[str, Any]:
    """Load the conversations into memory and search every question by each ranking."""
    from aios.sdk import connect

    found = {name: {"keyword": 0, "paraphrase": 0} for name in RANKINGS}
    asked = {"keyword": 0, "paraphrase": 0}
    led_by = {"bm25": 0, "embedding": 0}
    for n, conv in enumerate(conversations, start=1):
        with connect(run_dir, agent=conv.name, timeout=300) as c:
            progress.update(f"conversation {n}/{len(conversations)}: adding {len(conv.turns)} turns")
            ids = [c.memory.add(turn)["id"] for turn in conv.turns]
            progress.update(f"conversation {n}/{len(conversations)}: embedding")
            _embed_all(c, len(ids))
            progress.update(f"conversation {n}/{len(conversations)}: {len(conv.questions)} questions")
            for q in conv.questions:
                asked[q.kind] += 1
                for name, rankings in RANKINGS.items():
                    args: dict[str, Any] = {"query": q.text, "limit": k}
                    if rankings is not None:
                        args["rankings"] = rankings
                    reply = c.call("memory", "search", **args)
                    if reply.get("compared_by_meaning", 0) < reply.get("candidates_by_meaning", 0):
                        raise RuntimeError(f"{conv.name}: a search compared only part of the entries by meaning")
                    if name == "fused":
                        led_by[reply.get("led_by", "bm25")] += 1
                    found[name][q.kind] += ids[q.answer] in [h["id"] for h in reply["hits"][:k]]
    total = sum(asked.values())
    recall = {name: round(sum(by_kind.values()) / total, 4) for name, by_kind in found.items()}
    by_kind = {name: {kind: round(hits / asked[kind], 4) if asked[kind] else None for kind, hits in kinds.items()}
               for name, kinds in found.items()}
    return {"k": k, "recall": recall, "recall_by_kind": by_kind, "fused_led_by": led_by,
            "fused_at_least_better_input": recall["fused"] >= max(recall["bm25"], recall["embedding"])}


def run(args: argparse.Namespace) -> int:
    progress = Progress("[bench recall]")
    conversations = recall_set(seed=args.seed, conversations=args.conversations)
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="aios-bench-recall-") as tmp:
            config = {"llm": [{"name": "llm-0", "backend": "llamacpp", "n_ctx": 1024}], "tools": {"enabled": False},
                      "storage": {"path": str(Path(tmp) / "storage.sqlite3")},
                      "memory": {"semantic_batch": 64, "semantic_candidates": 1000}}
            progress.update("starting a kernel with the default model, storage and memory", force=True)
            with temporary_kernel(config) as run_dir:
                out = measure(run_dir, conversations, args.k, progress)
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not trace back
        progress.done()
        print(f"aios bench recall: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    progress.done()
    out = {"set": {**describe(conversations), "seed": args.seed}, **out, "seconds": round(time.monotonic() - t0, 1)}
    if args.json:
        print(json.dumps(out))
        return 0
    s, r, kinds = out["set"], out["recall"], out["recall_by_kind"]
    print(f"aios bench recall: {s['conversations']} conversations, {s['turns']} turns, {s['questions']} questions "
          f"({s['keyword_questions']} sharing a word with the answer, {s['paraphrase_questions']} paraphrased), "
          f"seed {s['seed']}; default model's embeddings")
    print(f"{'recall@' + str(args.k):<12}{'all':>8}{'keyword':>10}{'paraphrase':>12}")
    for name in RANKINGS:
        print(f"{name:<12}{r[name]:>8.3f}{kinds[name]['keyword'] or 0:>10.3f}{kinds[name]['paraphrase'] or 0:>12.3f}")
    led = out["fused_led_by"]
    print(f"fused searches led by keywords {led['bm25']}, by meaning {led['embedding']}; fused "
          f"{'>=' if out['fused_at_least_better_input'] else '<'} the better input "
          f"({max(r['bm25'], r['embedding']):.3f}); {out['seconds']:.0f} s")
    return 0


def add_parser(kinds: Any) -> None:
    p = kinds.add_parser("recall", help="recall@k of memory search on generated conversations: keywords, "
                                        "meaning, and both merged (needs the default model)")
    p.add_argument("--k", type=int, default=5, help="hits that count (default 5)")
    p.add_argument("--conversations", type=int, default=CONVERSATIONS,
                   help=f"conversations of the set to use (default all {CONVERSATIONS})")
    p.add_argument("--seed", type=int, default=17, help="the set's seed (default 17)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
