"""`aios bench llm`: a mixed short/long LLM workload under each scheduling policy.

Some agents send short requests (about 16 tokens), a few in a row, as an
interactive agent does; some send one long request (about 256); all start
together. For each policy a fresh kernel runs the workload and
we report, per request class, mean / p90 / p99 waiting and turnaround time
(as the scheduler measured them), the tokens/s through the kernel, and the
share of core time spent saving and restoring contexts. The same generations
called in-process directly on the backend, one after the other, give the
baseline tokens/s in the same run.

`--concurrency` and `--agents-steps` measure batching and the prefix cache
instead (see aios/bench/llm_throughput.py).

`--backend sim` uses the labelled SIMULATED backend (fixed seconds per token,
no model) to run the same comparison at 250 concurrent agents.

Requests use the `ignore_eos` option so every generation has exactly the
length of its class, whatever the model would have said.  The llama.cpp core
runs one generation at a time here (`max_batch = 1`, or `--max-batch`): the
policies decide the order of requests that contend for it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from aios.bench.common import Progress, percentile, temporary_kernel

LONG_PROMPT = "Count from 1 to 1000, separated by commas."
SHORT_PROMPT = "Name a color."
SIM_SECONDS_PER_TOKEN = 0.001


@dataclass
class AgentJob:
    agent: str
    kind: str  # "short" | "long"
    tokens: int
    rounds: int = 1  # requests the agent sends one after the other

    def args(self) -> dict[str, Any]:
        prompt = LONG_PROMPT if self.kind == "long" else SHORT_PROMPT
        return {"messages": [{"role": "user", "content": prompt}], "max_tokens": self.tokens,
                "temperature": 0.0, "stop": [], "ignore_eos": True}


def workload(args: argparse.Namespace) -> list[AgentJob]:
    sim = args.backend == "sim"
    n_short = args.short if args.short is not None else (200 if sim else 6)
    n_long = args.long if args.long is not None else (50 if sim else 2)
    jobs = [AgentJob(f"long-{i}", "long", args.long_tokens) for i in range(n_long)]
    jobs += [AgentJob(f"short-{i}", "short", args.short_tokens, args.short_rounds) for i in range(n_short)]
    return jobs


def kernel_config(args: argparse.Namespace, policy: str) -> dict[str, Any]:
    core: dict[str, Any] = {"name": "llm-0", "backend": args.backend}
    if args.backend == "sim":
        core["sim_seconds_per_token"] = SIM_SECONDS_PER_TOKEN
    else:
        # Policies order requests that contend for a core; a batching core with room for the
        # whole workload would run everything at once.  --max-batch changes it.
        core["max_batch"] = getattr(args, "max_batch", None) or 1
    return {"scheduler": {"policy": policy, "time_slice_tokens": args.slice}, "llm": [core]}


async def _run_jobs(run_dir: Any, jobs: list[AgentJob], progress: Progress) -> tuple[list[dict[str, Any]], float]:
    from aios.sdk import AsyncClient
    clients = [AsyncClient(run_dir, agent=j.agent, timeout=3600) for j in jobs]
    done = 0
    results: list[dict[str, Any]] = []

    total = sum(j.rounds for j in jobs)

    async def one(client: AsyncClient, job: AgentJob) -> None:
        nonlocal done
        for _ in range(job.rounds):
            reply = await client.request("llm", "chat", job.args(), idempotent=True)
            results.append({"kind": job.kind, "tokens": reply.result["usage"]["completion_tokens"], **reply.timing})
            done += 1
            progress.update(f"{done}/{total} requests done")

    t0 = time.monotonic()
    try:
        await asyncio.gather(*(one(c, j) for c, j in zip(clients, jobs)))
    finally:
        for c in clients:
            await c.close()
    return results, time.monotonic() - t0


def _class_stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    waits = sorted(r["wait_s"] for r in rows)
    turns = sorted(r["turnaround_s"] for r in rows)
    if not rows:
        return {}
    return {
        "count": len(rows),
        "wait_mean_s": sum(waits) / len(waits), "wait_p90_s": percentile(waits, 90),
        "wait_p99_s": percentile(waits, 99),
        "turnaround_mean_s": sum(turns) / len(turns), "turnaround_p90_s": percentile(turns, 90),
        "turnaround_p99_s": percentile(turns, 99),
    }


def run_policy(args: argparse.Namespace, policy: str, jobs: list[AgentJob], progress: Progress) -> dict[str, Any]:
    from aios.sdk import connect
    progress.update(f"{policy}: starting a kernel", force=True)
    with temporary_kernel(kernel_config(args, policy), prefix="aios-bllm-") as run_dir:
        with connect(run_dir, agent="bench") as client:
            # warm the core (first prompt evaluation allocates buffers)
            client.request("llm", "chat", AgentJob("warmup", "short", 4).args())
        progress.update(f"{policy}: running {len(jobs)} requests", force=True)
        rows, makespan = asyncio.run(_run_jobs(run_dir, jobs, progress))
        with connect(run_dir, agent="bench") as client:
            info = client.call("llm", "info")
    tokens = sum(r["tokens"] for r in rows)
    gen_s = max(info.get("generate_s", 0.0), 1e-9)
    return {
        "short": _class_stats([r for r in rows if r["kind"] == "short"]),
        "long": _class_stats([r for r in rows if r["kind"] == "long"]),
        "tokens": tokens,
        "makespan_s": makespan,
        "tokens_per_s": tokens / makespan if makespan > 0 else 0.0,
        "preemptions": sum(r.get("preemptions", 0) for r in rows),
        "switch_s": info.get("switch_s", 0.0),
        "switch_overhead_frac": info.get("switch_s", 0.0) / gen_s,
        "context": info.get("context", {}),
    }


def run_direct(args: argparse.Namespace, jobs: list[AgentJob], progress: Progress) -> dict[str, Any]:
    """The same generations called in-process on the backend, one after the other."""
    from aios.config import LLMCoreConfig
    from aios.managers.llm.core import make_backend
    from aios.managers.llm.types import ChatArgs
    core = LLMCoreConfig(**{k: v for k, v in kernel_config(args, "fifo")["llm"][0].items()})
    progress.update("direct: loading the backend in process", force=True)
    backend = make_backend(core)
    try:
        w = backend.start(ChatArgs(**AgentJob("warmup", "short", 4).args()))
        backend.advance(w, None, lambda s: None)
        backend.finish(w)
        tokens = 0
        t0 = time.monotonic()
        for i, job in enumerate(jobs):
            for _ in range(job.rounds):
                gen = backend.start(ChatArgs(**job.args()))
                backend.advance(gen, None, lambda s: None)
                tokens += backend.finish(gen).usage.completion_tokens
            progress.update(f"direct: {i + 1}/{len(jobs)} agents done")
        elapsed = time.monotonic() - t0
    finally:
        backend.close()
    return {"tokens": tokens, "elapsed_s": elapsed, "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0}


def run(args: argparse.Namespace) -> int:
    if args.backend == "sim" and (getattr(args, "agents_steps", False) or getattr(args, "determinism", False)):
        print("aios bench llm: --agents-steps and --determinism measure the real model's prefix cache and "
              "batching; use --backend llamacpp (the default)", file=sys.stderr)
        return 2
    if any(getattr(args, flag, False) for flag in ("concurrency", "agents_steps", "determinism")):
        from aios.bench import llm_throughput
        results = llm_throughput.run(args)
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            llm_throughput.print_report(results, args)
        return 0
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    from aios.scheduler.policies import POLICIES
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        print(f"aios bench llm: unknown policies {unknown}; choose from {sorted(POLICIES)}")
        return 2
    jobs = workload(args)
    progress = Progress("[bench llm]")
    # Top-level keys are exactly the policies and "direct"; what describes the run as a
    # whole (backend, workload) rides along in "direct", the baseline of the same workload.
    results: dict[str, Any] = {"direct": run_direct(args, jobs, progress)}
    results["direct"].update({
        "backend": args.backend, "simulated": args.backend == "sim",
        "workload": {"short": sum(j.kind == "short" for j in jobs), "long": sum(j.kind == "long" for j in jobs),
                     "short_tokens": args.short_tokens, "long_tokens": args.long_tokens,
                     "short_rounds": args.short_rounds, "time_slice_tokens": args.slice}})
    for policy in policies:
        results[policy] = run_policy(args, policy, jobs, progress)
    progress.done("finished")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_report(results, policies)
    return 0


def print_report(results: dict[str, Any], policies: list[str]) -> None:
    meta = results["direct"]
    w = meta["workload"]
    label = " (SIMULATED backend: fixed seconds per token, no model)" if meta["simulated"] else ""
    print(f"aios bench llm: backend {meta['backend']}{label}")
    print(f"workload: {w['short']} agents sending {w['short_rounds']} short requests ({w['short_tokens']} tokens) "
          f"one after the other, {w['long']} agents sending one long request ({w['long_tokens']} tokens); "
          f"all start together; slice {w['time_slice_tokens']} tokens\n")
    print(f"{'policy':<7}{'class':<7}{'wait mean':>10}{'p90':>8}{'p99':>8}{'turn mean':>11}{'p90':>8}{'p99':>8}")
    for p in policies:
        for cls in ("short", "long"):
            s = results[p][cls]
            if not s:
                continue
            print(f"{p:<7}{cls:<7}{s['wait_mean_s']:>10.2f}{s['wait_p90_s']:>8.2f}{s['wait_p99_s']:>8.2f}"
                  f"{s['turnaround_mean_s']:>11.2f}{s['turnaround_p90_s']:>8.2f}{s['turnaround_p99_s']:>8.2f}")
    direct = results["direct"]["tokens_per_s"]
    print(f"\n{'policy':<7}{'tokens/s':>10}{'vs direct':>11}{'preemptions':>13}{'switch overhead':>17}")
    print(f"{'direct':<7}{direct:>10.1f}{'1.00x':>11}")
    for p in policies:
        r = results[p]
        print(f"{p:<7}{r['tokens_per_s']:>10.1f}{r['tokens_per_s'] / direct:>10.2f}x{r['preemptions']:>13}"
              f"{100 * r['switch_overhead_frac']:>16.2f}%")
    print("\ngoals:")
    for p in policies:
        ratio = results[p]["tokens_per_s"] / direct
        print(f"  {p}: kernel tokens/s {ratio:.2f}x direct (goal >= 0.95): {'met' if ratio >= 0.95 else 'NOT met'}")
    if "fifo" in results:
        fifo_short = results["fifo"]["short"]["turnaround_mean_s"]
        for p in policies:
            if p == "fifo":
                continue
            frac = results[p]["short"]["turnaround_mean_s"] / fifo_short
            print(f"  {p}: short mean turnaround {frac:.2f}x FIFO's (goal <= 0.5): {'met' if frac <= 0.5 else 'NOT met'}")
    for p in policies:
        o = results[p]["switch_overhead_frac"]
        print(f"  {p}: snapshot/restore overhead {100 * o:.2f}% of generation time (goal <= 5%): "
              f"{'met' if o <= 0.05 else 'NOT met'}")
