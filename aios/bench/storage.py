"""`aios bench storage`: small writes, reads and searches through the kernel against direct SQLite.

N agent processes (default 16), each with its own SDK client, make back-to-back
storage calls through a real kernel (temporary run directory and database):
small writes first, then reads of what was written, then full-text searches.
In the same run, the same operations are done directly on SQLite in one process
(`aios.bench.storage_direct.run_direct`: one plain connection, the same WAL
journal and synchronous setting, one commit per write) as the baseline. The
writes, which the goal is about, run in `--rounds` rounds (default 5) that
interleave the kernel and direct SQLite, alternating which goes first, each
side's database growing alike; the figure is the median of the rounds'
ratios (a round's phase lasts about a second, and bursts of other work on a
shared machine move a single one by 10%). Also measured: 100 appends to a
growing file, every version kept, raw bytes against stored bytes (the
compression of versions).

Goal: small writes through the kernel at least 0.5x direct SQLite. Each kernel
write is a syscall (agent -> scheduler -> storage manager -> reply), so the
kernel pays two process hops per write, each a ZeroMQ I/O thread and a wake-up
on either side; the storage manager runs small writes on its socket thread and
commits the writes that arrive together in one transaction (group commit).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from aios.bench.common import LoadResult, Progress, run_closed_loop, temporary_kernel
from aios.bench.storage_direct import Workload, measure_compression, run_direct

GOAL_WRITE_RATIO = 0.5


#: untimed calls each client makes before its timed phase (connecting, first touches)
WARMUP = 2


def _caller(run_dir: Any, work: Workload, kind: str,
            first: int = 0) -> Callable[[int], tuple[Callable[[], None], Callable[[], None]]]:
    written = work.written()

    def make(index: int) -> tuple[Callable[[], None], Callable[[], None]]:
        from aios.sdk import Client
        agent_name = work.agents[index % len(work.agents)]
        client = Client(run_dir, agent=agent_name, timeout=60)
        mine = [p for a, p in written if a == agent_name] or [work.paths[0]]
        state = {"i": first + index}

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


def _kernel_phase(run_dir: Any, work: Workload, kind: str, agents: int, calls: int, label: str,
                  progress: Progress, first: int = 0) -> LoadResult:
    res = run_closed_loop(_caller(run_dir, work, kind, first), agents, calls, warmup=WARMUP, label=label,
                          progress=progress)
    if res.errors:
        raise RuntimeError(f"kernel {kind}s failed: {res.errors[:3]}")
    return res


def _figures(res: LoadResult) -> dict[str, Any]:
    s = res.summary()
    return {"ops_per_s": round(s["throughput"], 1), "p50_ms": round(s["p50_us"] / 1000, 3),
            "p99_ms": round(s["p99_us"] / 1000, 3), "calls": res.calls}


def run(args: argparse.Namespace) -> int:
    progress = Progress("[bench storage]")
    agents, calls, rounds = args.agents, args.calls, args.rounds
    per_round = agents * (calls + WARMUP)  # writes per round on each side (the kernel's warm-ups included)
    work = Workload(rounds * per_round, payload_bytes=args.bytes, agents=agents, files=50)
    results: dict[str, Any] = {}
    common = {"payload_bytes": args.bytes, "agents": agents, "synchronous": args.synchronous}
    try:
        with tempfile.TemporaryDirectory(prefix="aios-bench-storage-") as tmp:
            direct_db = Path(tmp) / "direct.sqlite3"
            config = {"llm": [], "tools": {"enabled": False},
                      "storage": {"path": str(Path(tmp) / "storage.sqlite3"), "synchronous": args.synchronous}}
            progress.update("starting a kernel with the storage manager", force=True)
            kernel_rounds: list[LoadResult] = []
            direct_rounds: list[dict[str, Any]] = []
            with temporary_kernel(config) as run_dir:
                # Writes, the goal's figure: kernel and direct interleaved over rounds that alternate which
                # goes first, both databases growing alike, so bursts of other work weigh on both sides.
                for r in range(rounds):
                    for side in (("kernel", "direct") if r % 2 == 0 else ("direct", "kernel")):
                        label = f"round {r + 1}/{rounds}: {side} writes"
                        if side == "kernel":
                            kernel_rounds.append(_kernel_phase(run_dir, work, "write", agents, calls, label, progress,
                                                               first=r * per_round))
                        else:
                            progress.update(label, force=True)
                            direct_rounds.append(run_direct(per_round, phases=("write",), first=r * per_round,
                                                            path=direct_db, **common)["write"])
                for kind in ("read", "search"):
                    n = calls if kind == "read" else max(10, calls // 5)
                    results[f"kernel_{kind}"] = _figures(_kernel_phase(run_dir, work, kind, agents, n,
                                                                       f"kernel {kind}es" if kind == "search"
                                                                       else f"kernel {kind}s", progress))
            progress.update("the same reads and searches directly on SQLite, one process", force=True)
            direct = run_direct(0, n_reads=agents * calls, n_searches=agents * max(10, calls // 5),
                                phases=("read", "search"), first=rounds * per_round, path=direct_db, **common)
            for kind in ("read", "search"):
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
    # Each round's ratio pairs two measurements seconds apart; the median of them is the figure.
    round_ratios = [k.throughput / d["ops_per_s"] if d["ops_per_s"] else float("nan")
                    for k, d in zip(kernel_rounds, direct_rounds)]
    ratio = statistics.median(round_ratios)
    results["kernel_write"] = {**_figures(LoadResult.merge(kernel_rounds)),
                               "ops_per_s": round(statistics.median(k.throughput for k in kernel_rounds), 1)}
    results["direct_write"] = {"ops_per_s": round(statistics.median(d["ops_per_s"] for d in direct_rounds), 1),
                               "p50_ms": round(statistics.median(d["p50_us"] for d in direct_rounds) / 1000, 3),
                               "p99_ms": round(max(d["p99_us"] for d in direct_rounds) / 1000, 3)}
    results["write_rounds"] = [{"kernel_ops_per_s": round(k.throughput, 1), "direct_ops_per_s": d["ops_per_s"],
                                "ratio": round(x, 3)} for k, d, x in zip(kernel_rounds, direct_rounds, round_ratios)]
    kw, dw = results["kernel_write"], results["direct_write"]
    comp = results["compression"]
    summary = {"kernel_ops_per_s": kw["ops_per_s"], "direct_ops_per_s": dw["ops_per_s"], "p99_ms": kw["p99_ms"],
               "versions_compression_ratio": comp["raw_over_stored"], "write_ratio": round(ratio, 3),
               "agents": agents, "rounds": rounds, "synchronous": args.synchronous, "by_op": results}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"aios bench storage: {agents} agents x {calls} calls each, {args.bytes}-byte writes, "
          f"synchronous={args.synchronous}; writes: median of {rounds} interleaved rounds")
    print(f"{'':<8}{'kernel ops/s':>14}{'p50 ms':>9}{'p99 ms':>9}{'direct ops/s':>15}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>8}")
    for kind in ("write", "read", "search"):
        k, d = results[f"kernel_{kind}"], results[f"direct_{kind}"]
        shown = ratio if kind == "write" else k["ops_per_s"] / d["ops_per_s"]
        print(f"{kind + ('es' if kind == 'search' else 's'):<8}{k['ops_per_s']:>14,.0f}{k['p50_ms']:>9.2f}"
              f"{k['p99_ms']:>9.2f}{d['ops_per_s']:>15,.0f}{d['p50_ms']:>9.2f}{d['p99_ms']:>9.2f}{shown:>7.2f}x")
    print("write rounds (kernel / direct ops/s): " + ", ".join(
        f"{x['kernel_ops_per_s']:,.0f} / {x['direct_ops_per_s']:,.0f} = {x['ratio']:.2f}x" for x in results["write_rounds"]))
    print(f"versions: 100 appends of 1 KB, every version kept: raw {comp['raw_bytes']:,} B, stored "
          f"{comp['stored_bytes']:,} B ({comp['raw_over_stored']}x smaller; {comp['stored_over_final']}x the final file)")
    print(f"small writes through the kernel vs direct SQLite: {ratio:.2f}x (goal >= {GOAL_WRITE_RATIO}x): "
          f"{'met' if ratio >= GOAL_WRITE_RATIO else 'NOT met'}")
    return 0


def add_parser(kinds: Any) -> None:
    p = kinds.add_parser("storage", help="small writes, reads and searches through the kernel vs direct SQLite")
    p.add_argument("--agents", type=int, default=16, help="concurrent agent processes (default 16)")
    p.add_argument("--calls", type=int, default=300,
                   help="writes per agent in each round, and reads per agent (default 300)")
    p.add_argument("--bytes", type=int, default=200, help="size of each write (default 200)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds of writes, kernel and direct alternating (default 5; median reported)")
    p.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL",
                   help="SQLite durability on both sides (default NORMAL: survives a process crash)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
