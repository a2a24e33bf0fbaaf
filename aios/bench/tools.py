"""`aios bench tools`: per-tool concurrency limits under load, and no head-of-line blocking.

Many agents (asyncio clients, one process) call two benchmark tools through a
real kernel at once: `bench_slow` (limit 2, each call sleeps `--slow-ms`) gets
a deep queue (each of its agents sends all its calls at once), `bench_fast`
(limit 8, returns at once) is called beside it, one call after another.
Each tool reports when it ran (CLOCK_MONOTONIC, comparable across processes),
so the benchmark counts how many instances of each really ran at once; the
scheduler's timing of each reply gives its queueing time. Printed per tool:
limit, most instances seen running at once, calls, queueing time p50/p99.

Goals: no tool ever above its limit; the fast tool's p99 queueing time under
10 ms while the slow tool's queue is deep.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from aios.bench.common import Progress, percentile, temporary_kernel
from aios.config import NO_BUILTINS

BENCH_TOOLS = Path(__file__).resolve().parent / "tools"
GOAL_FAST_P99_MS = 10.0


def kernel_config() -> dict[str, Any]:
    return {"llm": [], **NO_BUILTINS,
            "tools": {"shipped": False, "dirs": [str(BENCH_TOOLS)], "warm_workers": 64}}


async def _call(client: Any, tool: str, seconds: float, out: list[dict[str, Any]]) -> None:
    reply = await client.request("tools", "call", {"arguments": {"seconds": seconds}}, target=tool, idempotent=True)
    r = reply.result["result"]
    out.append({"tool": tool, "wait_s": reply.timing["wait_s"], "started": r["started"], "ended": r["ended"]})


async def _agent(client: Any, tool: str, seconds: float, calls: int, out: list[dict[str, Any]],
                 at_once: bool) -> None:
    """Slow-tool agents send all their calls at once (a deep queue); fast-tool agents one after another."""
    if at_once:
        await asyncio.gather(*(_call(client, tool, seconds, out) for _ in range(calls)))
    else:
        for _ in range(calls):
            await _call(client, tool, seconds, out)


async def _workload(run_dir: Any, args: argparse.Namespace, progress: Progress) -> list[dict[str, Any]]:
    from aios.sdk import AsyncClient
    out: list[dict[str, Any]] = []
    slow_agents = max(1, args.agents // 2)
    fast_agents = max(1, args.agents - slow_agents)
    clients = [AsyncClient(run_dir, agent=f"bench-{i}", timeout=600) for i in range(slow_agents + fast_agents)]
    try:
        # warm every (tool, agent) worker first: a cold worker's start-up is run time, not queueing
        await asyncio.gather(*(c.request("tools", "call", {"arguments": {"seconds": 0}}, target=t, idempotent=True)
                               for c in clients for t in ("bench_slow", "bench_fast")))
        progress.update(f"{slow_agents} agents x {args.slow_calls} slow calls, "
                        f"{fast_agents} agents x {args.fast_calls} fast calls", force=True)
        tasks = [_agent(c, "bench_slow", args.slow_ms / 1000, args.slow_calls, out, True) for c in clients[:slow_agents]]
        tasks += [_agent(c, "bench_fast", 0.0, args.fast_calls, out, False) for c in clients[slow_agents:]]
        done = asyncio.ensure_future(asyncio.gather(*tasks))
        while not done.done():
            await asyncio.sleep(0.25)
            progress.update(f"{len(out)} calls answered")
        await done
    finally:
        for c in clients:
            await c.close()
    return out


def _peak(rows: list[dict[str, Any]]) -> int:
    events = sorted([(r["started"], 1) for r in rows] + [(r["ended"], -1) for r in rows])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def run(args: argparse.Namespace) -> int:
    progress = Progress("[bench tools]", enabled=True)
    try:
        progress.update("starting a kernel with the benchmark tools", force=True)
        with temporary_kernel(kernel_config()) as run_dir:
            from aios.sdk import connect
            with connect(run_dir, agent="bench", timeout=30) as c:
                limits = {t["name"]: t["limit"] for t in c.tools.list()}
            rows = asyncio.run(_workload(run_dir, args, progress))
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not trace back
        progress.done()
        print(f"aios bench tools: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    progress.done()
    report: dict[str, Any] = {}
    for tool in ("bench_slow", "bench_fast"):
        mine = [r for r in rows if r["tool"] == tool]
        waits = sorted(r["wait_s"] * 1000 for r in mine)
        report[tool] = {"limit": limits[tool], "max_concurrency_seen": _peak(mine), "calls": len(mine),
                        "queue_p50_ms": round(percentile(waits, 50), 3), "queue_p99_ms": round(percentile(waits, 99), 3)}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"aios bench tools: {args.agents} agents through a real kernel; bench_slow sleeps {args.slow_ms} ms per call")
    print(f"{'tool':<12}{'limit':>6}{'max at once':>13}{'calls':>7}{'queue p50 ms':>14}{'queue p99 ms':>14}")
    for tool, r in report.items():
        print(f"{tool:<12}{r['limit']:>6}{r['max_concurrency_seen']:>13}{r['calls']:>7}{r['queue_p50_ms']:>14.2f}"
              f"{r['queue_p99_ms']:>14.2f}")
    within = all(r["max_concurrency_seen"] <= r["limit"] for r in report.values())
    fast = report["bench_fast"]["queue_p99_ms"]
    print(f"no tool above its limit: {'met' if within else 'NOT met'}")
    print(f"fast tool p99 queueing {fast:.2f} ms while the slow queue is deep (goal < {GOAL_FAST_P99_MS:g} ms): "
          f"{'met' if fast < GOAL_FAST_P99_MS else 'NOT met'}")
    return 0


def add_parser(kinds: Any) -> None:
    p = kinds.add_parser("tools", help="per-tool concurrency limits and queueing with a slow and a fast tool")
    p.add_argument("--agents", type=int, default=16, help="concurrent agents, half on each tool (default 16)")
    p.add_argument("--slow-calls", type=int, default=12, help="calls per slow-tool agent (default 12)")
    p.add_argument("--fast-calls", type=int, default=100, help="calls per fast-tool agent (default 100)")
    p.add_argument("--slow-ms", type=int, default=100, help="duration of one slow call (default 100 ms)")
    p.add_argument("--json", action="store_true", help="print one JSON object keyed by tool name")
    p.set_defaults(func=run)
