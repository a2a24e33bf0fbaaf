"""Figures for the memory engine, in process: `python -m aios.bench.memory_engine [what ...]`.

(`aios bench memory` measures the memory manager through a real kernel instead.)

- compression: raw/stored bytes on the workloads of memory_workloads.py.
- speed: add, get, search and swap-in operations per second, in process.
- rss: the RSS growth of a process whose store, with a tiny budget, is written
  ten times its budget (write-through to a SQLite file, so evicted entries
  leave the process), compared with the budget; then every entry is read back
  and checked.
- index: RAM of an inverted index per byte of text vs the time of the scan
  bm25.py does instead.
- calibrate: the store's object bytes against what tracemalloc sees (exact
  object sizes) and against RSS growth with no frees, per workload (the
  figures under eviction churn come from `rss`).

`SqliteBacking` (memory_backings.py) stands in for the storage service in the
speed and RSS figures: evicted entries must leave this process for the RSS
figure to mean anything.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from aios.bench.memory_backings import NullBacking, SqliteBacking
from aios.bench.memory_workloads import TextGen, conversation_logs, distinct_notes, prompt_replays, templated_notes
from aios.managers.memory.store import MemoryStore

MIB = 1024 * 1024


# ------------------------------------------------------------------ compression
WORKLOADS: dict[str, tuple[str, Callable[[], Iterable[str]]]] = {
    "conversation": ("20 conversations x 30 turns; after each turn the whole transcript (shared "
                     "~1.1 kB system prompt + all turns so far) is stored as a new entry",
                     lambda: conversation_logs(20, 30)),
    "prompt_replay": ("600 prompts: one ~2.3 kB instruction + few-shot block, then a new 10-40 word question",
                      lambda: prompt_replays(600)),
    "templated_notes": ("2000 notes from one template over 8 projects, 20-80 words of free text each",
                        lambda: templated_notes(2000)),
    "distinct_notes": ("2000 unrelated notes of 20-120 words (control)", lambda: distinct_notes(2000)),
}


def compression() -> dict[str, Any]:
    out = {}
    for name, (description, make) in WORKLOADS.items():
        store = MemoryStore(1 << 34)
        for text in make():
            store.add("agent", text)
        s = store.stats()
        out[name] = {"workload": description, "entries": s["entries_in_ram"], "raw_bytes": s["raw_bytes"],
                     "stored_bytes": s["stored_bytes"], "ratio_raw_to_stored": s["compression_ratio"],
                     "accounted_bytes": s["accounted_bytes"],
                     "ratio_raw_to_accounted": round(s["raw_bytes"] / s["accounted_bytes"], 3)}
    return out


# ------------------------------------------------------------------------ speed
def _rate(n: int, fn: Callable[[int], Any]) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return round(n / (time.perf_counter() - start), 1)


def speed(entries: int = 5000) -> dict[str, Any]:
    texts = list(distinct_notes(entries, seed=11, lo_words=20, hi_words=120))
    store = MemoryStore(1 << 34)
    ids: list[str] = []
    add_rate = _rate(entries, lambda i: ids.append(store.add("agent", texts[i], {"n": i}).id))
    rng = random.Random(1)
    get_rate = _rate(20000, lambda i: store.get("agent", ids[rng.randrange(entries)]))
    gen = TextGen(12)
    queries = [" ".join(rng.sample(gen.words[:500], 2)) for _ in range(50)]
    stored_mb = store.stats()["stored_bytes"] / MIB
    search_rate = _rate(len(queries), lambda i: store.search("agent", queries[i], limit=10))
    conv = MemoryStore(1 << 34)
    for text in conversation_logs(20, 30):
        conv.add("agent", text)
    cs = conv.stats()
    conv_search = _rate(len(queries), lambda i: conv.search("agent", queries[i], limit=10))
    # swap-in: a write-through store 1/10 the size of the data, reading at random
    with tempfile.TemporaryDirectory() as tmp:
        backing = SqliteBacking(Path(tmp) / "b.db")
        small = MemoryStore(max(1 << 20, store.accounted_bytes() // 10), backing=backing)
        sids = [small.add("agent", t).id for t in texts]
        before = small.stats()["swap_ins"]
        swap_rate = _rate(5000, lambda i: small.get("agent", sids[rng.randrange(entries)]))
        swaps = small.stats()["swap_ins"] - before
        wt_add = _rate(2000, lambda i: small.add("agent", texts[i]))
        backing.close()
    return {"entries": entries, "add_per_s": add_rate, "get_per_s": get_rate,
            "search_per_s": search_rate, "search_stored_mb": round(stored_mb, 2),
            "search_ms_per_stored_mb": round(1000 / search_rate / stored_mb, 1),
            "conversation_search_per_s": conv_search,
            "conversation_raw_mb": round(cs["raw_bytes"] / MIB, 2),
            "conversation_stored_mb": round(cs["stored_bytes"] / MIB, 2),
            "write_through_get_per_s_mostly_swap_in": swap_rate, "swap_in_share": round(swaps / 5000, 3),
            "write_through_add_per_s": wt_add}


# ------------------------------------------------------------------- index cost
def index_cost(entries: int = 3000) -> dict[str, Any]:
    """Why bm25.py keeps no index: RAM of an inverted index (term -> {entry: tf}) per byte of
    text, against the time of scoring on the fly over the radix tree."""
    from collections import Counter

    from aios.managers.memory.bm25 import tokenize

    texts = list(distinct_notes(entries, seed=11, lo_words=40, hi_words=120))
    text_bytes = sum(len(t.encode()) for t in texts)
    gc.collect()
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    index: dict[str, dict[int, int]] = {}
    for i, text in enumerate(texts):
        for term, tf in Counter(tokenize(text)).items():
            index.setdefault(term, {})[i] = tf
    gc.collect()
    index_bytes = tracemalloc.get_traced_memory()[0] - start
    tracemalloc.stop()
    store = MemoryStore(1 << 34)
    for text in texts:
        store.add("agent", text)
    rng = random.Random(2)
    gen = TextGen(11)
    queries = [" ".join(rng.sample(gen.words[:300], 2)) for _ in range(30)]
    begin = time.perf_counter()
    for query in queries:
        store.search("agent", query)
    per_search = (time.perf_counter() - begin) / len(queries)
    stored_mb = store.stats()["stored_bytes"] / MIB
    return {"entries": entries, "text_bytes": text_bytes, "terms": len(index),
            "inverted_index_bytes": index_bytes,
            "inverted_index_bytes_per_text_byte": round(index_bytes / text_bytes, 2),
            "scan_ms_per_search": round(per_search * 1000, 1),
            "scan_ms_per_stored_mb": round(per_search * 1000 / stored_mb, 1)}


# -------------------------------------------------------------------------- rss
def rss_run(budget_mb: float = 8.0, factor: float = 10.0, seed: int = 5, check: bool = True) -> dict[str, Any]:
    """Write `factor` x budget of entries into a write-through store (in this process) and
    measure the RSS growth; then read back every entry and compare it with the text written.
    Run it in a fresh process.

    The harness keeps nothing per entry (that would grow the RSS it measures): texts are
    regenerated from the seed for the check, and ids are read back from the SQLite file."""
    import psutil

    proc = psutil.Process()
    budget = int(budget_mb * MIB)
    agents = [f"agent-{i}" for i in range(4)]

    corpus = TextGen(seed).paragraph(40000, 40000)  # ~250 kB; entries are slices of it

    def texts() -> Iterator[str]:
        rng = random.Random(seed)
        n = 0
        while True:
            length = rng.randint(60, 2000)
            start = rng.randrange(len(corpus) - length)
            body = corpus[start:start + length] + f" [{n}]"
            # a third are conversation-like: a shared 300-character opening
            yield ("Transcript. " + corpus[:300] + " " + body) if n % 3 == 0 else body
            n += 1

    with tempfile.TemporaryDirectory() as tmp:
        backing = SqliteBacking(Path(tmp) / "b.db")
        store = MemoryStore(budget, backing=backing)
        rng = random.Random(seed)
        queries = TextGen(seed + 1)
        gc.collect()
        idle = proc.memory_info().rss
        peak = idle
        peak_accounted = peak_objects = written = n = 0
        source = texts()
        while written < factor * budget:
            text = next(source)
            store.add(agents[n % len(agents)], text)
            written += len(text.encode())
            n += 1
            if n % 7 == 0:  # re-read an older entry now and then (mostly swap-ins)
                store.get(*backing.key_at(rng.randrange(n) + 1))
            if n % 100 == 0:
                store.search(agents[0], queries.paragraph(2, 2))
                peak = max(peak, proc.memory_info().rss)
            peak_accounted = max(peak_accounted, store.accounted_bytes())
            peak_objects = max(peak_objects, store.object_bytes())
        peak = max(peak, proc.memory_info().rss)
        writing_peak = peak - idle
        bad = 0
        if check:
            source = texts()
            for row in range(1, n + 1):
                if store.get(*backing.key_at(row)).content != next(source):
                    bad += 1
                if row % 100 == 0:
                    peak = max(peak, proc.memory_info().rss)
        peak = max(peak, proc.memory_info().rss)
        s = store.stats()
        backing.close()
    return {"budget_bytes": budget, "written_bytes": written, "entries": n,
            "idle_rss_bytes": idle, "peak_rss_growth_bytes": peak - idle,
            "rss_growth_over_budget": round((peak - idle) / budget, 3),
            "rss_growth_over_budget_while_writing": round(writing_peak / budget, 3),
            "peak_accounted_over_budget": round(peak_accounted / budget, 3),
            "rss_growth_while_writing_over_peak_object_bytes": round(writing_peak / peak_objects, 3),
            "evictions": s["evictions"], "swap_ins": s["swap_ins"], "entries_checked": n if check else 0,
            "mismatches": bad}


# -------------------------------------------------------------------- calibrate
def _calibrate_tracemalloc(name: str, texts: Callable[[], Iterator[str]], backing: bool) -> dict[str, Any]:
    gc.collect()
    tracemalloc.start()
    # with a backing that forgets, only the store's own objects stay (LRU-K state included)
    store = MemoryStore(1 << 34, backing=NullBacking() if backing else None)
    agents = ["agent-0", "agent-1", "agent-2"]
    gc.collect()
    start = tracemalloc.get_traced_memory()[0]
    for n, text in enumerate(texts()):  # each text is made here and owned by the store
        store.add(agents[n % 3], text, {"n": n, "kind": "note"} if n % 2 else None)
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - start
    tracemalloc.stop()
    objects = store.object_bytes()
    return {"workload": name, "write_through": backing, "entries": store.stats()["entries_in_ram"],
            "traced": traced, "object_bytes": objects, "object_bytes_over_traced": round(objects / traced, 3)}


def rss_static(workload: str, target_mb: float = 64.0) -> dict[str, Any]:
    """RSS growth of a RAM-only store filled to `target_mb` of objects (no frees): run in a fresh process."""
    import psutil

    proc = psutil.Process()
    lo, hi = {"short": (20, 120), "medium": (600, 2400), "long": (12000, 36000)}[workload]
    corpus = TextGen(3).paragraph(40000, 40000)
    rng = random.Random(3)
    store = MemoryStore(1 << 34)
    agents = ["agent-0", "agent-1", "agent-2"]
    gc.collect()
    idle = proc.memory_info().rss
    n = 0
    while store.object_bytes() < target_mb * MIB:
        length = rng.randint(lo, hi)
        start = rng.randrange(len(corpus) - length)
        store.add(agents[n % 3], corpus[start:start + length] + f" [{n}]", {"n": n} if n % 2 else None)
        n += 1
    gc.collect()
    growth = proc.memory_info().rss - idle
    return {"workload": f"{workload} entries ({lo}-{hi} characters), RAM only, no frees", "entries": n,
            "object_bytes": store.object_bytes(), "rss_growth": growth,
            "rss_growth_over_object_bytes": round(growth / store.object_bytes(), 3)}


def calibrate() -> dict[str, Any]:
    import subprocess
    rows = [
        _calibrate_tracemalloc("short notes (3-20 words)", lambda: distinct_notes(20000, 1, 3, 20), False),
        _calibrate_tracemalloc("short notes (3-20 words)", lambda: distinct_notes(20000, 1, 3, 20), True),
        _calibrate_tracemalloc("notes (100-400 words)", lambda: distinct_notes(2000, 2, 100, 400), False),
        _calibrate_tracemalloc("conversation logs", lambda: conversation_logs(20, 30), False),
    ]
    rss = []
    for workload in ("short", "medium", "long"):
        out = subprocess.run([sys.executable, "-m", "aios.bench.memory_engine", "_rss_static", workload],
                             capture_output=True, text=True, check=True)
        rss.append(json.loads(out.stdout))
    return {"tracemalloc": rows, "rss": rss}


def rss_subprocess(budget_mb: float = 8.0, factor: float = 10.0) -> dict[str, Any]:
    import subprocess
    out = subprocess.run([sys.executable, "-m", "aios.bench.memory_engine", "_rss_run", str(budget_mb),
                          str(factor)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aios.bench.memory_engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="*", default=["compression", "speed", "rss"],
                        help="compression, speed, rss, calibrate, index")
    parser.add_argument("--budget-mb", type=float, default=8.0, help="rss: the store's budget")
    parser.add_argument("--factor", type=float, default=10.0, help="rss: write this many times the budget")
    args = parser.parse_args(argv)
    if args.what and args.what[0] == "_rss_run":  # internal: run in a fresh process
        print(json.dumps(rss_run(float(args.what[1]), float(args.what[2]))))
        return
    if args.what and args.what[0] == "_rss_static":
        print(json.dumps(rss_static(args.what[1])))
        return
    results: dict[str, Any] = {}
    for what in args.what:
        if what == "compression":
            results["compression"] = compression()
        elif what == "speed":
            results["speed"] = speed()
        elif what == "rss":
            results["rss"] = rss_subprocess(args.budget_mb, args.factor)
        elif what == "calibrate":
            results["calibrate"] = calibrate()
        elif what == "index":
            results["index"] = index_cost()
        else:
            parser.error(f"unknown figure {what!r}")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
