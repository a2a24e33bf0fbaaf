"""`aios demo`: the main job, and what the kernel does for agents, shown on the embedded model.

It starts the kernel with the local model (Gemma 3 270M through llama.cpp), runs the example
agents concurrently (each its own process), streams the first agent's answer live, prints each
answer as it completes, then a summary per agent (requests, tokens, mean wait and turnaround).

With a preemptive policy (the default, `las`), it first runs the same agents under `fifo` on a
fresh kernel, the baseline, and then reports what the policy changed: how much sooner the short
agents finished, and the evidence of exact resume: each generation the policy preempted is
compared, character for character, with the same generation run without interruption under fifo.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aios.rundir import RunDir

AGENTS_DIR = Path(__file__).resolve().parent / "agents"  # the example agents ship in the package
DEFAULT_AGENTS = ["essayist", "qa", "summarizer"]
PREEMPTIVE = ("rr", "las")


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="start the kernel with the local model, run the example agents, show what "
                                    "the scheduler did for them", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="las", help="scheduling policy: las (default), rr or fifo")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the fifo baseline run (no comparison, no exact-resume check)")
    p.add_argument("--config", help="TOML configuration (default: built-in defaults)")
    p.add_argument("--agents", default=",".join(DEFAULT_AGENTS),
                   help=f"comma-separated example agents from aios/agents/; the first one streams live "
                        f"(default: {','.join(DEFAULT_AGENTS)})")
    p.add_argument("--run-dir", help="run directory for the demo kernel (default: a fresh temporary one)")
    p.set_defaults(func=run)


@dataclass
class Run:
    policy: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    ok: bool = False


def run(args: argparse.Namespace) -> int:
    names = [a.strip() for a in args.agents.split(",") if a.strip()]
    known = sorted(p.name for p in AGENTS_DIR.iterdir() if (p / "__main__.py").exists())
    missing = [n for n in names if n not in known]
    if missing:
        print(f"aios demo: no such agent(s) {missing}; example agents: {known}", file=sys.stderr)
        return 2
    policies = [args.policy]
    if args.policy in PREEMPTIVE and not args.no_baseline:
        policies = ["fifo", args.policy]
    runs = []
    for i, policy in enumerate(policies):
        main = i == len(policies) - 1
        if not main:
            print("[demo] first, the baseline: the same agents under fifo (no preemption) ...", flush=True)
        result = _run_kernel(args, policy, names, stream=main)
        if result is None:
            return 2
        runs.append(result)
        if not result.ok:
            return 1
    main_run = runs[-1]
    _print_summary(main_run)
    if len(runs) == 2:
        return _print_comparison(runs[0], main_run)
    return 0


def _run_kernel(args: argparse.Namespace, policy: str, names: list[str], stream: bool) -> Run | None:
    from aios import kernel
    temporary = args.run_dir is None
    run_dir = RunDir(args.run_dir or tempfile.mkdtemp(prefix="aios-demo-", dir="/tmp"))
    print(f"[demo] starting the kernel with the local model (policy {policy}) ...", flush=True)
    try:
        kernel.start(run_dir, args.config, policy=policy)
    except (kernel.ConfigError, kernel.RunDirError) as exc:
        print(f"aios demo: {exc}", file=sys.stderr)
        return None
    except kernel.KernelStartError as exc:
        print(f"aios demo: the kernel did not start: {exc}", file=sys.stderr)
        kernel.stop(run_dir)
        return Run(policy)
    result = Run(policy)
    try:
        result.rows, result.ok = _run_agents(run_dir, names, stream)
    finally:
        kernel.stop(run_dir)
        if temporary and result.ok:
            shutil.rmtree(run_dir.path, ignore_errors=True)
        elif temporary:
            print(f"[demo] logs kept in {run_dir.log_dir}", file=sys.stderr)
    return result


def _run_agents(run_dir: RunDir, names: list[str], stream: bool) -> tuple[list[dict[str, Any]], bool]:
    """Run the agents concurrently; stream the first one's text if asked; collect their reports."""
    sel = selectors.DefaultSelector()
    procs: dict[str, subprocess.Popen[str]] = {}
    print(f"[demo] running agents: {', '.join(names)}" + (f" (streaming {names[0]})" if stream else ""), flush=True)
    for i, name in enumerate(names):
        cmd = [sys.executable, "-m", f"aios.agents.{name}", "--run-dir", str(run_dir.path)]
        if stream and i == 0:
            cmd.append("--stream")
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs[name] = p
        assert p.stdout is not None
        sel.register(p.stdout, selectors.EVENT_READ, name)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    open_streams = len(procs)
    mid_line = False
    while open_streams:
        for key, _ in sel.select(timeout=1.0):
            line = key.fileobj.readline()  # type: ignore[union-attr]
            if not line:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "token" in event:
                if not mid_line:
                    sys.stdout.write(f"\n[{event['agent']}, live] ")
                    mid_line = True
                sys.stdout.write(event["token"].replace("\n", " "))
                sys.stdout.flush()
                continue
            event["done_at_s"] = time.monotonic() - started
            rows.append(event)
            if stream:
                answer = event["answer"].replace("\n", " ")
                print(f"\n[{event['agent']}] {event['request']}\n  -> {answer[:300]}"
                      f"{'...' if len(answer) > 300 else ''}", flush=True)
                mid_line = False
            else:
                print(finished_line(event), flush=True)
    ok = True
    for name, p in procs.items():
        code = p.wait()
        if code != 0:
            ok = False
            err = p.stderr.read() if p.stderr else ""
            print(f"[demo] agent {name} exited with code {code}:\n{err[-2000:]}", file=sys.stderr)
    return rows, ok


def times(n: float) -> str:
    """`1 time`, `3 times`: a count of occurrences, spelled for a sentence."""
    return f"{n:.0f} time" + ("" if round(n) == 1 else "s")


def finished_line(event: dict[str, Any]) -> str:
    """The line for one request of a run that is not streamed (the fifo baseline), printed as it
    finishes: when it finished, counted from the agents' start, then, labelled, what that request
    itself took (its turnaround, and how much of it was spent queued). Printed alone in completion
    order, per-request turnarounds read like elapsed time, which they are not."""
    took = [f"its turnaround {event['turnaround_s']:.1f}s" if event.get("turnaround_s") is not None else "",
            f"{event['wait_s']:.1f}s of it queued" if event.get("wait_s") is not None else ""]
    detail = ", ".join(t for t in took if t)
    return (f"[demo]   at {event['done_at_s']:5.1f}s {event['agent']} finished: {event['request'][:60]}"
            + (f" ({detail})" if detail else ""))


def _per_agent(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        a = out.setdefault(r["agent"], {"requests": 0, "tokens": 0, "wait_s": 0.0, "turnaround_s": 0.0,
                                        "preemptions": 0, "finished_s": 0.0})
        a["requests"] += 1
        a["tokens"] += r["tokens"]
        a["wait_s"] += r["wait_s"] or 0.0
        a["turnaround_s"] += r["turnaround_s"] or 0.0
        a["preemptions"] += r.get("preemptions") or 0
        a["finished_s"] = max(a["finished_s"], r["done_at_s"])
    for a in out.values():
        a["wait_s"] /= a["requests"]
        a["turnaround_s"] /= a["requests"]
    return out


def _print_summary(run: Run) -> None:
    agents = _per_agent(run.rows)
    print(f"\nper agent, under policy {run.policy}:")
    print(f"{'agent':<13}{'requests':>9}{'tokens':>8}{'mean wait s':>13}{'mean turnaround s':>19}"
          f"{'preempted':>11}{'all done at s':>15}")
    for name, a in sorted(agents.items(), key=lambda kv: kv[1]["finished_s"]):
        print(f"{name:<13}{a['requests']:>9.0f}{a['tokens']:>8.0f}{a['wait_s']:>13.2f}{a['turnaround_s']:>19.2f}"
              f"{a['preemptions']:>11.0f}{a['finished_s']:>15.2f}")


def _print_comparison(base: Run, main: Run) -> int:
    """How much sooner the short agents finished than under fifo, and exact resume, checked."""
    before, after = _per_agent(base.rows), _per_agent(main.rows)
    longest = max(after, key=lambda n: after[n]["tokens"])
    short = [n for n in after if n != longest and n in before]
    if short:
        b = sum(before[n]["turnaround_s"] for n in short) / len(short)
        a = sum(after[n]["turnaround_s"] for n in short) / len(short)
        print(f"\nwhat {main.policy} did for the short agents ({', '.join(short)}): mean turnaround {a:.2f}s "
              f"against {b:.2f}s under fifo in the same run ({a / b:.2f}x; {b - a:.2f}s sooner), while the "
              f"long agent ({longest}) was preempted {times(after[longest]['preemptions'])}")
    identical = True
    checked = 0
    baseline = {(r["agent"], r["request"]): r["answer"] for r in base.rows}
    for r in main.rows:
        if not r.get("preemptions"):
            continue
        uninterrupted = baseline.get((r["agent"], r["request"]))
        if uninterrupted is None:
            continue
        checked += 1
        same = r["answer"] == uninterrupted
        identical &= same
        print(f"exact resume: {r['agent']}'s answer to \"{r['request'][:50]}\" was preempted "
              f"{times(r['preemptions'])} under {main.policy}; compared with the uninterrupted fifo run it is "
              f"{'IDENTICAL' if same else 'DIFFERENT'} ({len(r['answer'])} characters)")
    if checked == 0:
        print(f"exact resume: no generation was preempted under {main.policy} in this run")
    return 0 if identical else 1
