"""`aios demo`: the main job. Start the kernel with the local model, run the
example agents concurrently (each its own process), print each answer as it
completes and a table of per-request waiting and turnaround times under the
configured scheduling policy, then stop the kernel.
"""
from __future__ import annotations

import argparse
import json
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aios.rundir import RunDir

AGENTS_DIR = Path(__file__).resolve().parent / "agents"  # the example agents ship in the package
DEFAULT_AGENTS = ["essayist", "qa", "summarizer"]


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="start the kernel with the local model, run the example agents, show timings",
                       description=__doc__)
    p.add_argument("--policy", help="scheduling policy: fifo (default), rr or las")
    p.add_argument("--config", help="TOML configuration (default: built-in defaults)")
    p.add_argument("--agents", default=",".join(DEFAULT_AGENTS),
                   help=f"comma-separated example agents from aios/agents/ (default: {','.join(DEFAULT_AGENTS)})")
    p.add_argument("--run-dir", help="run directory for the demo kernel (default: a fresh temporary one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from aios import kernel
    names = [a.strip() for a in args.agents.split(",") if a.strip()]
    missing = [n for n in names if not (AGENTS_DIR / n / "__main__.py").exists()]
    if missing:
        known = sorted(p.name for p in AGENTS_DIR.iterdir() if (p / "__main__.py").exists())
        print(f"aios demo: no such agent(s) {missing}; example agents: {known}", file=sys.stderr)
        return 2
    temporary = args.run_dir is None
    run_dir = RunDir(args.run_dir or tempfile.mkdtemp(prefix="aios-demo-", dir="/tmp"))
    print(f"[demo] starting the kernel (policy {args.policy or 'from config'}) ...", flush=True)
    try:
        kernel.start(run_dir, args.config, policy=args.policy)
    except (kernel.ConfigError, kernel.RunDirError) as exc:
        print(f"aios demo: {exc}", file=sys.stderr)
        return 2
    except kernel.KernelStartError as exc:
        print(f"aios demo: the kernel did not start: {exc}", file=sys.stderr)
        kernel.stop(run_dir)
        return 1
    policy = run_dir.load_config().scheduler.policy
    ok = False
    try:
        rows, ok = _run_agents(run_dir, names)
    finally:
        print("[demo] stopping the kernel ...", flush=True)
        kernel.stop(run_dir)
        if temporary and ok:
            shutil.rmtree(run_dir.path, ignore_errors=True)
        elif temporary:
            print(f"[demo] logs kept in {run_dir.log_dir}", file=sys.stderr)
    _print_table(rows, policy)
    return 0 if ok else 1


def _run_agents(run_dir: RunDir, names: list[str]) -> tuple[list[dict[str, Any]], bool]:
    """Run the agents concurrently; return their report lines and whether every agent succeeded."""
    sel = selectors.DefaultSelector()
    procs: dict[str, subprocess.Popen[str]] = {}
    print(f"[demo] running agents: {', '.join(names)}", flush=True)
    for name in names:
        p = subprocess.Popen([sys.executable, "-m", f"aios.agents.{name}", "--run-dir", str(run_dir.path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs[name] = p
        assert p.stdout is not None
        sel.register(p.stdout, selectors.EVENT_READ, name)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    open_streams = len(procs)
    while open_streams:
        for key, _ in sel.select(timeout=1.0):
            line = key.fileobj.readline()  # type: ignore[union-attr]
            if not line:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            row["done_at_s"] = time.monotonic() - started
            rows.append(row)
            answer = row["answer"].replace("\n", " ")
            print(f"\n[{row['agent']}] {row['request']}\n  -> {answer[:300]}{'...' if len(answer) > 300 else ''}",
                  flush=True)
    ok = True
    for name, p in procs.items():
        code = p.wait()
        if code != 0:
            ok = False
            err = p.stderr.read() if p.stderr else ""
            print(f"[demo] agent {name} exited with code {code}:\n{err[-2000:]}", file=sys.stderr)
    return rows, ok


def _print_table(rows: list[dict[str, Any]], policy: str) -> None:
    if not rows:
        print("[demo] no request completed")
        return
    print(f"\nper-request times under policy {policy}:")
    print(f"{'agent':<13}{'request':<50}{'tokens':>7}{'wait s':>9}{'turnaround s':>14}{'preempted':>11}")
    for r in sorted(rows, key=lambda r: r["turnaround_s"] or 0):
        print(f"{r['agent']:<13}{r['request'][:48]:<50}{r['tokens']:>7}{r['wait_s']:>9.2f}"
              f"{r['turnaround_s']:>14.2f}{r.get('preemptions') or 0:>11}")
    waits = [r["wait_s"] for r in rows]
    turns = [r["turnaround_s"] for r in rows]
    print(f"{'mean':<63}{sum(waits) / len(waits):>16.2f}{sum(turns) / len(turns):>14.2f}")
