"""`aios bench storage`: small writes, reads and searches through the kernel against direct SQLite.

N agent processes (default 16), each with its own SDK client, make back-to-back
storage calls through a real kernel (temporary run directory and database):
small writes first, then reads of what was written, then full-text searches.
In the same run, the same operations are done directly on SQLite in one process
(`aios.bench.storage_direct.run_direct`: one plain connection, the same WAL
journal and synchronous setting, one commit per write) as the baseline. Also
measured: 100 appends to a growing file, every version kept, raw bytes
against stored bytes (the compression of versions).

Goal: small writes through the kernel at least 0.5x direct SQLite. Each kernel
write is a syscall (agent -> scheduler -> storage manager -> reply), so the
kernel pays two process hops per write; the storage manager's group commit
lets writes from several agents share one transaction.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from aios.bench.common import Progress, run_closed_loop, temporary_kernel
from aios.bench.storage_direct import Workload, measure_compression, run_direct

GOAL_WRITE_RATIO = 0.5


def _caller(run_dir: Any, work: Workload, kind: str) -> Callable[[int], tuple[Callable[[], None], Callable[[], None]]]:
    written = work.written()

    def make(index: int) -> tuple[Callable[[], None], Callable[[], None]]:
        from aios.sdk import Client
        agent_name = work.agents[index % len(work.agents)]
        client = Client(run_dir, agent=agent_name, timeout=60)
        mine = [p for a, p in written if a == agent_name] or [work.paths[0]]
        state = {"i": index}

        def call() -> None:
            i = state["i"]
            state["i"] += len(work.agents)
            if kind == "write":
                _, path, data = work.write(i)
                client.storage.write(path, data)
            elif kind == "read":
                client.storage.read(mine[i % len(mine)])
            else:
                client.storage.search(work.search(i)[1], limit=5)

        return call, client.close

    return make


def run(args: argparse.Namespace) -> int:
    progress = Progress("[bench storage]")
    agents, calls = args.agents, args.calls
    work = Workload(agents * calls, payload_bytes=args.bytes, agents=agents, files=50)
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="aios-bench-storage-") as tmp:
            config = {"llm": [], "tools": {"enabled": False},
                      "storage": {"path": str(Path(tmp) / "storage.sqlite3"), "synchronous": args.synchronous}}
            progress.update("starting a kernel with the storage manager", force=True)
            with temporary_kernel(config) as run_dir:
                for kind in ("write", "read", "search"):
                    n = calls if kind != "search" else max(10, calls // 5)
                    res = run_closed_loop(_caller(run_dir, work, kind), agents, n, warmup=2,
                                          label=f"kernel {kind}s", progress=progress)
                    if res.errors:
                        raise RuntimeError(f"kernel {kind}s failed: {res.errors[:3]}")
                    s = res.summary()
                    results[f"kernel_{kind}"] = {"ops_per_s": round(s["throughput"], 1), "p50_ms": round(s["p50_us"] / 1000, 3),
                                                 "p99_ms": round(s["p99_us"] / 1000, 3), "calls": res.calls}
            progress.update("the same operations directly on SQLite, one process", force=True)
            direct = run_direct(agents * calls, n_reads=agents * calls, n_searches=agents * max(10, calls // 5),
                                payload_bytes=args.bytes, agents=agents, synchronous=args.synchronous)
            for kind in ("write", "read", "search"):
                d = direct[kind]
                results[f"direct_{kind}"] = {"ops_per_s": d["ops_per_s"], "p50_ms": round(d["p50_us"] / 1000, 3),
                                             "p99_ms": round(d["p99_us"] / 1000, 3)}
            progress.update("100 appends to a growing file, every version kept", force=True)
            results["compression"] = measure_compression(100, 1000)
    except Exception as exc:  # noqa: BLE001
        progress.done()
        print(f"aios bench storage: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    progress.done()
    kw, dw = results["kernel_write"], results["direct_write"]
    ratio = kw["ops_per_s"] / dw["ops_per_s"] if dw["ops_per_s"] else float("nan")
    comp = results["compression"]
    summary = {"kernel_ops_per_s": kw["ops_per_s"], "direct_ops_per_s": dw["ops_per_s"], "p99_ms": kw["p99_ms"],
               "versions_compression_ratio": comp["raw_over_stored"], "write_ratio": round(ratio, 3),
               "agents": agents, "synchronous": args.synchronous, "by_op": results}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"aios bench storage: {agents} agents x {calls} calls each, {args.bytes}-byte writes, synchronous={args.synchronous}")
    print(f"{'':<8}{'kernel ops/s':>14}{'p50 ms':>9}{'p99 ms':>9}{'direct ops/s':>15}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>8}")
    for kind in ("write", "read", "search"):
        k, d = results[f"kernel_{kind}"], results[f"direct_{kind}"]
        print(f"{kind + 's':<8}{k['ops_per_s']:>14,.0f}{k['p50_ms']:>9.2f}{k['p99_ms']:>9.2f}{d['ops_per_s']:>15,.0f}"
              f"{d['p50_ms']:>9.2f}{d['p99_ms']:>9.2f}{k['ops_per_s'] / d['ops_per_s']:>7.2f}x")
    print(f"versions: 100 appends of 1 KB, every version kept: raw {comp['raw_bytes']:,} B, stored "
          f"{comp['stored_bytes']:,} B ({comp['raw_over_stored']}x smaller; {comp['stored_over_final']}x the final file)")
    print(f"small writes through the kernel vs direct SQLite: {ratio:.2f}x (goal >= {GOAL_WRITE_RATIO}x): "
          f"{'met' if ratio >= GOAL_WRITE_RATIO else 'NOT met'}")
    return 0


def add_parser(kinds: Any) -> None:
    p = kinds.add_parser("storage", help="small writes, reads and searches through the kernel vs direct SQLite")
    p.add_argument("--agents", type=int, default=16, help="concurrent agent processes (default 16)")
    p.add_argument("--calls", type=int, default=200, help="writes and reads per agent (default 200)")
    p.add_argument("--bytes", type=int, default=200, help="size of each write (default 200)")
    p.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL",
                   help="SQLite durability on both sides (default NORMAL: survives a process crash)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
