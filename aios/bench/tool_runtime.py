"""Timing figures of the tool runtime (a command that prints figures; tests never assert on speed).

    python -m aios.bench.tool_runtime [--n 30] [--json] [--mcp "python tests/support/mcp_server.py"]
    python -m aios.bench.tool_runtime --calibrate     # RLIMIT_AS a worker needs (binary search)

Measures, on this machine, with the shipped tools:
- validation only: checking arguments against a tool's JSON schema (rejects before any worker);
- cold call: a new worker per call (spawn python, confine it, import the tool, run, reply);
- warm call: the same agent's idle worker reused;
- python tool: a snippet in a fresh fully sandboxed worker (the tool runs `python -I -c` inside it);
- the same cold call with sandbox = "off", to show what the confinement itself costs;
- with --mcp CMD: an MCP server's start (handshake and tool listing) and one call through it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable

from aios.managers.base import OpError
from aios.managers.tools.registry import validate_arguments
from aios.managers.tools.runtime import ToolRuntime


def _measure(fn: Callable[[int], Any], n: int) -> dict[str, float]:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"n": n, "p50_ms": round(statistics.median(times), 3),
            "p95_ms": round(times[min(n - 1, int(n * 0.95))], 3), "min_ms": round(times[0], 3)}


def run(n: int, mcp: list[str] | None = None, mcp_tool: str = "", mcp_args: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if mcp:
        t0 = time.perf_counter()
        with ToolRuntime([], {"shipped": False, "mcp": [{"name": "bench", "command": mcp}]}) as rt:
            out["mcp_server_start"] = {"n": 1, "p50_ms": round((time.perf_counter() - t0) * 1000, 3),
                                       "p95_ms": 0.0, "min_ms": 0.0}
            name = f"bench__{mcp_tool}"
            out["mcp_call"] = _measure(lambda i: rt.call(name, mcp_args or {}, agent="bench"), n * 10)
    with ToolRuntime() as rt:
        out["isolation"] = rt.isolation.summary(rt.options.scratch_mb)
        spec = rt._lookup("flights")
        args = {"origin": "Paris", "destination": "Rome", "date": "2025-07-03", "max_price_eur": 300}
        out["validation_only"] = _measure(lambda i: validate_arguments(spec, args), n * 100)

        def rejected(i: int) -> None:
            try:
                rt.call("flights", {**args, "date": 20250703}, agent="bench")
            except OpError:
                pass
        out["rejected_call"] = _measure(rejected, n * 10)
        out["cold_call"] = _measure(lambda i: rt.call("calculator", {"expression": "2*(3+4)"}, agent=f"cold-{i}"), n)
        rt.call("calculator", {"expression": "1"}, agent="warm")
        out["warm_call"] = _measure(lambda i: rt.call("calculator", {"expression": "2*(3+4)"}, agent="warm"), n * 10)
        out["python_tool_call"] = _measure(lambda i: rt.call("python", {"code": "print(6*7)"}, agent="py"), n)
        out["workers"] = rt.worker_stats
    with ToolRuntime([], {"sandbox": "off"}) as off:
        out["cold_call_sandbox_off"] = _measure(
            lambda i: off.call("calculator", {"expression": "2*(3+4)"}, agent=f"cold-{i}"), n)
        out["python_tool_call_sandbox_off"] = _measure(
            lambda i: off.call("python", {"code": "print(6*7)"}, agent="py"), n)
    return out


CALIBRATION_IMPORTS = {
    "python -I -c pass": "pass",
    "worker imports": "import json, struct, fcntl, ctypes, importlib.util, inspect, traceback, resource, select",
    "web_fetch imports (socket, ssl, urllib)": "import json, socket, ssl, urllib.request, http.client",
    "python tool imports (subprocess)": "import subprocess, select, signal",
    "numpy": "import numpy",
}


def calibrate() -> dict[str, int]:
    """Smallest RLIMIT_AS (MB) with which each import set still runs: the baseline a worker needs."""
    import resource
    import subprocess
    import sys

    def runs(mb: int, code: str) -> bool:
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (mb << 20, mb << 20))
        return subprocess.run([sys.executable, "-I", "-c", code], preexec_fn=limit,
                              capture_output=True).returncode == 0

    out = {}
    for label, code in CALIBRATION_IMPORTS.items():
        if not runs(4096, code):
            continue  # not installed here
        lo, hi = 1, 4096
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if runs(mid, code) else (mid + 1, hi)
        out[label] = lo
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--mcp", help="also time an MCP server: its command line, e.g. "
                                      "'python tests/support/mcp_server.py'")
    parser.add_argument("--mcp-tool", default="add")
    parser.add_argument("--mcp-args", default='{"a": 1, "b": 2}', help="JSON arguments for --mcp-tool")
    parser.add_argument("--calibrate", action="store_true", help="only measure the RLIMIT_AS baseline of workers")
    a = parser.parse_args()
    if a.calibrate:
        for label, mb in calibrate().items():
            print(f"{mb:5d} MB  {label}")
        return
    result = run(a.n, a.mcp.split() if a.mcp else None, a.mcp_tool, json.loads(a.mcp_args))
    if a.json:
        print(json.dumps(result, indent=2))
        return
    print(result.pop("isolation"))
    workers = result.pop("workers")
    for name, fig in result.items():
        print(f"{name:30s} p50 {fig['p50_ms']:9.3f} ms   p95 {fig['p95_ms']:9.3f} ms   min {fig['min_ms']:9.3f} ms   (n={fig['n']})")
    print(f"workers started cold: {workers['cold']}, warm reuses: {workers['warm']}")


if __name__ == "__main__":
    main()
