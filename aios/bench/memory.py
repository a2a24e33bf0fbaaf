"""`aios bench memory`: agents keeping conversation logs in kernel memory, under a budget that forces eviction.

N agent processes (default 16) each save their conversation log after every
turn (the transcript so far: a shared system prompt plus the turns, as
`aios.bench.memory_workloads.conversation_logs` generates it) and read back
earlier entries at random, through a real kernel with the memory and storage
managers. The memory budget (`--budget-mb`, default 16) is far below what the
agents write (about 115 MB raw, 7x the budget after compression), so entries are
evicted and swapped back in.

Printed: ops/s, p50/p99 latency, the compression ratio of what is in RAM
(raw bytes / stored bytes: shared prefixes are kept once), evictions and
swap-ins, and the memory manager's RSS growth over its idle RSS against the
budget. Goals: RSS growth never above 1.2x the budget; compression at least 2.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from aios.bench.common import Progress, run_closed_loop, temporary_kernel

GOAL_RSS_RATIO = 1.2
GOAL_COMPRESSION = 2.0


def _caller(run_dir: Any, turns: int) -> Callable[[int], tuple[Callable[[], None], Callable[[], None]]]:
    def make(index: int) -> tuple[Callable[[], None], Callable[[], None]]:
        from aios.bench.memory_workloads import conversation_logs
        from aios.sdk import Client
        client = Client(run_dir, agent=f"bench-{index}", timeout=120)
        logs = conversation_logs(conversations=1000, turns=turns, seed=100 + index)
        rng = random.Random(index)
        ids: list[str] = []
        state = {"n": 0}

        def call() -> None:
            state["n"] += 1
            if ids and state["n"] % 3 == 0:  # one read for every two writes, of any earlier entry
                client.memory.get(rng.choice(ids))
            else:
                ids.append(client.memory.add(next(logs))["id"])

        return call, client.close

    return make


class RssSampler:
    """Polls one process's RSS in a thread; `peak` is the highest seen."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        import psutil
        self.proc = psutil.Process(pid)
        self.every_s = every_s
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except Exception:  # noqa: BLE001 - the process went away: keep what we saw
                return

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(2)


def run(args: argparse.Namespace) -> int:
    progress = Progress("[bench memory]")
    budget = int(args.budget_mb * 1024 * 1024)
    try:
        with tempfile.TemporaryDirectory(prefix="aios-bench-memory-") as tmp:
            config = {"llm": [], "tools": {"enabled": False},
                      "storage": {"path": str(Path(tmp) / "storage.sqlite3"), "quota_mb": 4096},
                      "memory": {"budget_mb": args.budget_mb}}
            progress.update("starting a kernel with the memory and storage managers", force=True)
            with temporary_kernel(config) as run_dir:
                pid = next(p["pid"] for p in run_dir.read_state()["processes"] if p["name"] == "memory")
                from aios.sdk import connect
                with connect(run_dir, agent="bench-idle", timeout=30) as c:
                    c.memory.add("warm up")
                    c.memory.search("warm")
                with RssSampler(pid) as rss:
                    idle = rss.peak
                    res = run_closed_loop(_caller(run_dir, args.turns), args.agents, args.calls, warmup=2,
                                          label="memory adds and gets", progress=progress)
                if res.errors:
                    raise RuntimeError(f"agents failed: {res.errors[:3]}")
                with connect(run_dir, agent="bench-idle", timeout=30) as c:
                    store = c.memory.stats()["store"]
    except Exception as exc:  # noqa: BLE001
        progress.done()
        print(f"aios bench memory: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    progress.done()
    s = res.summary()
    growth = rss.peak - idle
    out = {"ops_per_s": round(s["throughput"], 1), "p50_ms": round(s["p50_us"] / 1000, 3),
           "p99_ms": round(s["p99_us"] / 1000, 3), "compression_ratio": store["compression_ratio"],
           "evictions": store["evictions"], "swap_ins": store["swap_ins"], "rss_growth_bytes": growth,
           "budget_bytes": budget, "rss_growth_over_budget": round(growth / budget, 3), "agents": args.agents,
           "calls": res.calls, "raw_bytes_in_ram": store["raw_bytes"], "stored_bytes_in_ram": store["stored_bytes"]}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"aios bench memory: {args.agents} agents x {args.calls} calls (2 adds of a growing conversation log "
          f"for each read), budget {args.budget_mb:g} MB")
    print(f"ops/s {out['ops_per_s']:,.0f}   p50 {out['p50_ms']:.2f} ms   p99 {out['p99_ms']:.2f} ms")
    print(f"in RAM: raw {store['raw_bytes']:,} B, stored {store['stored_bytes']:,} B: compression "
          f"{out['compression_ratio']}x (goal >= {GOAL_COMPRESSION:g}x): "
          f"{'met' if (out['compression_ratio'] or 0) >= GOAL_COMPRESSION else 'NOT met'}")
    print(f"evictions {out['evictions']:,}   swap-ins {out['swap_ins']:,}")
    print(f"memory manager RSS growth over idle: {growth / 2**20:.1f} MB = {out['rss_growth_over_budget']:.2f}x the "
          f"budget (goal <= {GOAL_RSS_RATIO}x): {'met' if out['rss_growth_over_budget'] <= GOAL_RSS_RATIO else 'NOT met'}")
    return 0


def add_parser(kinds: Any) -> None:
    p = kinds.add_parser("memory", help="agents keeping conversation logs in kernel memory under a small budget")
    p.add_argument("--agents", type=int, default=16, help="concurrent agent processes (default 16)")
    p.add_argument("--calls", type=int, default=600, help="calls per agent (default 600)")
    p.add_argument("--turns", type=int, default=60, help="turns per conversation (default 60)")
    p.add_argument("--budget-mb", type=float, default=16.0,
                   help="the memory manager's budget (default 16 MB: the agents write about 7x that, compressed)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
