"""`aios bench llm --concurrency` and `--agents-steps`: throughput of one LLM core.

--concurrency: N agents (1, 2, 4, 8) each send one fixed-length generation at
the same moment to a core that batches (`max_batch`, default 8) and, in the
same run, to a core that serves one at a time (`max_batch = 1`); aggregate
tokens/s = all generated tokens / time until the last reply.  The two kernels
run side by side and the levels alternate between them, so load from other
work on the machine weighs on both alike.  `--backend sim` runs the same
comparison on the labelled SIMULATED backend (fixed seconds per token, a
configurable batch speed-up), which stands for a remote server that serves
requests in parallel.

On the real model, each round also runs the same workload on llama.cpp
directly, in its own process, with no kernel (`aios.bench.llamacpp_raw`): what
raw batching gives on this machine at this moment. The goals are stated
against it, as the issue means them ("about 90% of what raw llama.cpp
batching gives here"): its absolute figures (1.6x at 4, 2.2x at 8) assumed a
raw gain of 1.75x and 2.4x, which depends on the CPU and its load.

--agents-steps: N agents (default 8) each run a conversation of 5 steps that
grows by its own answers, all sharing a ~400-token system prompt, against a
core with the prefix cache on and one with it off (`prefix_cache_mb = 0`),
both with the same `max_batch`.  Reported: prompt tokens computed vs
submitted (the usage's `cached_prompt_tokens` were reused), mean step
latency, total wall time.

Requests use `ignore_eos`, so every answer has exactly the requested length
whatever the model says, and temperature 0.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from aios.bench.common import Progress, temporary_kernel

#: the batched core's goal: this fraction of the speed-up raw llama.cpp batching gives in the same run
GOAL_OF_RAW = 0.9
#: the issue's absolute goals, measured where raw batching gave 1.75x and 2.4x
ISSUE_GOALS = {"4": (1.6, 1.75), "8": (2.2, 2.4)}

#: distinct short prompts, so that no two requests share a cacheable prefix (< 64 tokens)
TOPICS = ["the sea", "a mountain", "an old city", "a forest", "the desert", "a river", "the moon", "a garden",
          "a lighthouse", "a glacier", "a volcano", "a market"]


def _core(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    """One [[llm]] entry: `settings` are its throughput keys (max_batch, prefix_cache_mb, max_inflight)."""
    core: dict[str, Any] = {"name": "llm-0", "backend": args.backend,
                            **{k: v for k, v in settings.items() if k != "batch_speedup"}}
    if "batch_speedup" in settings:  # a knob of the simulated backend only: one of its options
        core["options"] = {"batch_speedup": settings["batch_speedup"]}
    if args.backend == "sim":
        core["sim_seconds_per_token"] = args.sim_seconds_per_token
    return {"scheduler": {"policy": "fifo"}, "llm": [core]}


def _max_batch(args: argparse.Namespace) -> int:
    return args.max_batch if args.max_batch is not None else 8


def _batched_options(args: argparse.Namespace, batched: bool) -> dict[str, Any]:
    m = _max_batch(args)
    if args.backend == "sim":
        return {"max_inflight": m, "batch_speedup": min(args.sim_speedup, m)} if batched else {}
    return {"max_batch": m if batched else 1}


async def _burst(run_dir: Any, n: int, tokens: int, tag: str) -> tuple[int, float, list[str]]:
    """n agents send one generation each at the same moment; (tokens generated, wall seconds, texts)."""
    from aios.sdk import AsyncClient
    clients = [AsyncClient(run_dir, agent=f"{tag}-{i}", timeout=3600) for i in range(n)]
    try:
        await asyncio.gather(*(c.call("kernel", "ping") for c in clients))  # connected before the clock starts
        t0 = time.monotonic()
        replies = await asyncio.gather(*(
            c.request("llm", "chat", {"messages": [{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]}."}],
                                      "max_tokens": tokens, "temperature": 0.0, "stop": [], "ignore_eos": True},
                      idempotent=True)
            for i, c in enumerate(clients)))
        wall = time.monotonic() - t0
    finally:
        for c in clients:
            await c.close()
    return (sum(r.result["usage"]["completion_tokens"] for r in replies), wall,
            [r.result["message"]["content"] for r in replies])


def _warm(run_dir: Any) -> None:
    from aios.sdk import connect
    with connect(run_dir, agent="warmup") as c:
        c.request("llm", "chat", {"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4,
                                  "ignore_eos": True, "stop": []})


def _info(run_dir: Any) -> dict[str, Any]:
    from aios.sdk import connect
    with connect(run_dir, agent="bench-info") as c:
        return c.call("llm", "info")


def _raw_llamacpp(levels: list[int], tokens: int) -> dict[str, Any]:
    """The same workload straight on llama.cpp, in a process of its own (its model and threads
    gone when it ends)."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "aios.bench.llamacpp_raw", "--levels", ",".join(map(str, levels)),
                          "--tokens", str(tokens)], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"the raw llama.cpp reference failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_concurrency(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    batched: dict[str, list[float]] = {str(n): [] for n in levels}
    single: dict[str, list[float]] = {str(n): [] for n in levels}
    raw_runs: list[dict[str, Any]] = []
    with_raw = args.backend == "llamacpp"
    texts: dict[str, dict[str, list[str]]] = {"batched": {}, "one at a time": {}}
    label = "SIMULATED " if args.backend == "sim" else ""
    progress.update(f"concurrency: starting a {label}batched and a one-at-a-time kernel", force=True)
    with temporary_kernel(_core(args, _batched_options(args, True)), prefix="aios-bcb-") as rb, \
            temporary_kernel(_core(args, _batched_options(args, False)), prefix="aios-bcs-") as rs:
        _warm(rb)
        _warm(rs)
        for r in range(args.rounds):
            for n in levels:
                for name, run_dir, out in (("batched", rb, batched), ("one at a time", rs, single)):
                    progress.update(f"concurrency round {r + 1}/{args.rounds}: {n} agents, {name}", force=True)
                    toks, wall, contents = asyncio.run(_burst(run_dir, n, args.tokens, f"c{r}-{n}"))
                    out[str(n)].append(toks / wall)
                    texts[name].setdefault(str(n), contents)
            if with_raw:
                progress.update(f"concurrency round {r + 1}/{args.rounds}: the same on llama.cpp directly, no kernel",
                                force=True)
                raw_runs.append(_raw_llamacpp(levels, args.tokens))
        info = _info(rb)
    # Greedy outputs of the same prompts, batched vs one at a time (same kernel build, same run).
    same = {k: sum(a == b for a, b in zip(texts["batched"][k], texts["one at a time"][k])) for k in texts["batched"]}
    # Medians, and the speed-up as the median of each round's ratio (its two runs are seconds
    # apart): bursts of other work on a shared machine move single runs by 2x.
    mean = {k: statistics.median(v) for k, v in batched.items()}
    mean_single = {k: statistics.median(v) for k, v in single.items()}
    ratio = {k: statistics.median(b / s for b, s in zip(batched[k], single[k])) for k in batched}
    raw = {k: statistics.median(x["speedup"][k] for x in raw_runs) for k in batched} if raw_runs else {}
    top = str(max(levels))
    extra: dict[str, Any] = {"raw_speedup": raw, "of_raw": {k: round(ratio[k] / raw[k], 3) for k in raw}} if raw else {}
    return {"concurrency": mean, "unbatched_tokens_per_s": mean_single[top], **extra,
            "details": {"concurrency": {
                        "backend": args.backend, "simulated": args.backend == "sim", "max_batch": _max_batch(args),
                        "tokens_per_request": args.tokens, "rounds": args.rounds,
                        "unbatched": mean_single, "batched_runs": batched, "unbatched_runs": single,
                        "speedup": ratio,
                        # the fastest round of each: on a shared machine, what the core does when left alone
                        "best": {k: max(v) for k, v in batched.items()},
                        "best_unbatched": {k: max(v) for k, v in single.items()},
                        "identical_outputs": {k: f"{same[k]}/{k}" for k in same},
                        "batched_core": info.get("batching", {}),
                        "raw_llamacpp_runs": raw_runs,
                        "sim_speedup": args.sim_speedup if args.backend == "sim" else None}}}


# ---------------------------------------------------------------- agent steps
def system_prompt(words: int = 300) -> str:
    """A shared system prompt of tool descriptions, about 400 Gemma tokens for 300 words."""
    tools = ["search_web", "read_file", "write_file", "list_directory", "send_email", "calendar_lookup",
             "run_python", "fetch_url", "summarize_text", "translate_text", "get_weather", "stock_quote"]
    lines = ["You are a careful assistant working inside an operating system for agents.",
             "You can call these tools. Each takes JSON arguments and returns JSON."]
    i = 0
    while sum(len(x.split()) for x in lines) < words:
        t = tools[i % len(tools)]
        lines.append(f"Tool {t} (version {i // len(tools) + 1}): use it when the task needs {t.replace('_', ' ')}; "
                     f"arguments are a query string and an optional limit; it returns a list of results.")
        i += 1
    return "\n".join(lines)


async def _agent(run_dir: Any, agent: str, steps: int, tokens: int, system: str, k: int,
                 rows: list[dict[str, Any]]) -> None:
    from aios.sdk import AsyncClient
    client = AsyncClient(run_dir, agent=agent, timeout=3600)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    try:
        for s in range(steps):
            messages.append({"role": "user", "content": f"Agent {k}, step {s + 1}: what should we do next about "
                                                        f"{TOPICS[(k + s) % len(TOPICS)]}?"})
            t0 = time.monotonic()
            reply = await client.request("llm", "chat", {"messages": messages, "max_tokens": tokens,
                                                         "temperature": 0.0, "stop": [], "ignore_eos": True},
                                         idempotent=True)
            usage = reply.result["usage"]
            rows.append({"agent": k, "step": s, "latency_s": time.monotonic() - t0,
                         "prompt": usage["prompt_tokens"], "cached": usage.get("cached_prompt_tokens", 0),
                         "answer": reply.result["message"]["content"]})
            messages.append({"role": "assistant", "content": reply.result["message"]["content"]})
    finally:
        await client.close()


async def _agents(run_dir: Any, n: int, steps: int, tokens: int, system: str,
                  tag: str) -> tuple[list[dict[str, Any]], float]:
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    await asyncio.gather(*(_agent(run_dir, f"{tag}-{k}", steps, tokens, system, k, rows) for k in range(n)))
    return rows, time.monotonic() - t0


def run_agent_steps(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    base: dict[str, Any] = {} if args.max_batch is None else {"max_batch": args.max_batch}
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    same = total = 0
    progress.update("agents-steps: starting kernels with the prefix cache on and off", force=True)
    with temporary_kernel(_core(args, {**base}), prefix="aios-bap-") as ron, \
            temporary_kernel(_core(args, {**base, "prefix_cache_mb": 0}), prefix="aios-bao-") as roff:
        _warm(ron)
        _warm(roff)
        for r in range(args.rounds):
            # A new session per round, so the cache starts every round cold.
            system = f"Session {r + 1}.\n" + system_prompt(args.system_words)
            answers: dict[str, dict[tuple[int, int], str]] = {}
            for name, run_dir in (("off", roff), ("on", ron)):
                progress.update(f"agents-steps round {r + 1}/{args.rounds}: {args.agents} agents x {args.steps} steps, "
                                f"prefix cache {name}", force=True)
                rows, wall = asyncio.run(_agents(run_dir, args.agents, args.steps, args.answer_tokens, system,
                                                 f"{name}{r}"))
                answers[name] = {(x["agent"], x["step"]): x["answer"] for x in rows}
                submitted = sum(x["prompt"] for x in rows)
                cached = sum(x["cached"] for x in rows)
                runs[name].append({"wall_s": wall, "steps": len(rows), "prompt_tokens": submitted,
                                   "computed_tokens": submitted - cached,
                                   "computed_frac": (submitted - cached) / submitted,
                                   "mean_step_latency_s": sum(x["latency_s"] for x in rows) / len(rows),
                                   "first_step_prompt_tokens": min(x["prompt"] for x in rows if x["step"] == 0)})
            # Same prompts, same model: in exact mode (max_batch = 1) the cache must not change a token.
            same += sum(answers["on"].get(key) == text for key, text in answers["off"].items())
            total += len(answers["off"])
        core = _info(ron)
    out: dict[str, Any] = {"identical_answers": f"{same}/{total}"}
    for name, rs in runs.items():
        med = sorted(rs, key=lambda x: x["wall_s"])[len(rs) // 2]  # the median round by wall time (one session)
        out[name] = {**med, "wall_s_runs": [x["wall_s"] for x in rs]}
    out["on"]["core"] = core
    speedup = statistics.median(off["wall_s"] / on["wall_s"] for off, on in zip(runs["off"], runs["on"]))
    return {"prefix": {"computed_frac": out["on"]["computed_frac"], "speedup": speedup},
            "details": {"agents_steps": {"agents": args.agents, "steps": args.steps,
                                         "answer_tokens": args.answer_tokens, "max_batch": args.max_batch,
                                         "rounds": args.rounds, **out}}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    progress = Progress("[bench llm]")
    results: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for wanted, fn in ((args.concurrency, run_concurrency), (args.agents_steps, run_agent_steps),
                       (getattr(args, "determinism", False), run_determinism)):
        if wanted:
            part = fn(args, progress)
            details.update(part.pop("details", {}))
            results.update(part)
    results["details"] = details
    progress.done("finished")
    return results


def print_report(results: dict[str, Any], args: argparse.Namespace) -> None:
    if "determinism" in results:
        d = results["determinism"]
        print(f"aios bench llm --determinism: {d['prompts']} prompts, {d['tokens']} greedy tokens each, one at a time "
              f"vs {d['max_batch']} at a time (mean decode batch {d['mean_batch']})")
        print(f"  identical outputs: {d['identical']}/{d['prompts']}; differing: {d['differing']}"
              + (f", first different token at positions {d['first_difference_at']}" if d["differing"] else ""))
    if "concurrency" in results:
        d = results["details"]["concurrency"]
        label = " (SIMULATED backend: fixed seconds per token, batch speed-up " \
                f"{d['sim_speedup']}x at {d['max_batch']}; no model)" if d["simulated"] else ""
        print(f"aios bench llm --concurrency: backend {d['backend']}{label}")
        print(f"each agent: one {d['tokens_per_request']}-token generation, all sent together; "
              f"medians of {d['rounds']} round(s), levels alternating between the two kernels\n")
        print(f"{'':>7}{'median':>37}{'fastest round':>33}")
        print(f"{'agents':>7}{'batched tok/s':>15}{'one-at-a-time':>15}{'speed-up':>10}"
              f"{'batched':>11}{'one-at-a-time':>15}{'ratio':>8}")
        for k, v in results["concurrency"].items():
            b, u = d["best"][k], d["best_unbatched"][k]
            print(f"{k:>7}{v:>15.1f}{d['unbatched'][k]:>15.1f}{d['speedup'][k]:>9.2f}x"
                  f"{b:>11.1f}{u:>15.1f}{b / u:>7.2f}x")
        if not d["simulated"]:
            print("\ngreedy outputs identical to one at a time (first round): " +
                  ", ".join(f"{k} agents {v}" for k, v in d["identical_outputs"].items()))
        core = d["batched_core"]
        if core and not d["simulated"]:
            print(f"\nbatched core: max_batch {core.get('max_batch')}, mean decode batch {core.get('mean_batch')}")
        raw = results.get("raw_speedup", {})
        if raw:
            print("\nthe same workload on llama.cpp directly (no kernel; all prompts prefilled in one call), "
                  "median of rounds:")
            print("  " + ", ".join(f"{k}: {v:.2f}x" for k, v in raw.items())
                  + "  -> batched core: " + ", ".join(f"{k}: {results['of_raw'][k]:.0%} of raw" for k in raw))
        if not d["simulated"]:
            print("\ngoals (the batched core's speed-up at least 90% of raw llama.cpp's, same run):")
            for level, (issue_goal, issue_raw) in ISSUE_GOALS.items():
                if level in d["speedup"] and level in raw:
                    s, want = d["speedup"][level], GOAL_OF_RAW * raw[level]
                    print(f"  {level} concurrent: {s:.2f}x one at a time (median of rounds) = {s / raw[level]:.0%} of "
                          f"raw {raw[level]:.2f}x (goal >= {want:.2f}x): {'met' if s >= want else 'NOT met'}; "
                          f"the issue's {issue_goal}x assumed raw {issue_raw}x")
            if "1" in d["speedup"]:
                s = d["speedup"]["1"]
                print(f"  1 agent: batched core {s:.2f}x the one-at-a-time core (goal: not slower, within noise)")
    if "prefix" in results:
        d = results["details"]["agents_steps"]
        print(f"\naios bench llm --agents-steps: {d['agents']} agents x {d['steps']} steps, "
              f"shared system prompt of {d['on']['first_step_prompt_tokens']}+ prompt tokens, "
              f"{d['answer_tokens']}-token answers; median of {d['rounds']} round(s)")
        print(f"{'prefix cache':<14}{'prompt tokens':>15}{'computed':>10}{'fraction':>10}{'mean step':>11}{'wall':>9}"
              f"  wall per round")
        for name in ("off", "on"):
            r = d[name]
            print(f"{name:<14}{r['prompt_tokens']:>15}{r['computed_tokens']:>10}{r['computed_frac']:>10.2f}"
                  f"{r['mean_step_latency_s']:>10.2f}s{r['wall_s']:>8.1f}s  "
                  + ", ".join(f"{w:.1f}s" for w in r["wall_s_runs"]))
        p = results["prefix"]
        print(f"answers identical with the cache on and off (same session): {d['identical_answers']}")
        print("\ngoals:")
        print(f"  prompt tokens computed {p['computed_frac']:.2f} of submitted (goal <= 0.3): "
              f"{'met' if p['computed_frac'] <= 0.3 else 'NOT met'}")
        print(f"  multi-step workload {p['speedup']:.2f}x faster end to end (goal >= 1.5): "
              f"{'met' if p['speedup'] >= 1.5 else 'NOT met'}")


# ---------------------------------------------------------------- determinism
TEMPLATES = ["Describe {}.", "Write a short poem about {}.", "List three facts about {}.", "Tell a story set in {}."]


def run_determinism(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Greedy outputs of the same prompts decoded one at a time and in batches of `max_batch`, in process.

    Same model, same build, same machine: any difference comes from floating-point results that
    depend on which sequences share a decode call.
    """
    import threading

    from aios.managers.llm.backends.llamacpp import LlamaCppBackend
    from aios.managers.llm.types import ChatArgs
    m = _max_batch(args)
    prompts = [t.format(topic) for t in TEMPLATES for topic in TOPICS][: args.prompts]

    def chat(p: str) -> ChatArgs:
        return ChatArgs(messages=[{"role": "user", "content": p}], max_tokens=args.tokens, temperature=0.0,
                        stop=[], ignore_eos=True)

    def tokens_of(b: LlamaCppBackend, p: str) -> list[int]:
        g = b.start(chat(p))
        b.advance(g, None, lambda s: None)
        out = list(g.tokens)  # type: ignore[attr-defined]
        b.finish(g)
        return out

    progress.update(f"determinism: {len(prompts)} prompts one at a time", force=True)
    one = LlamaCppBackend(max_batch=1, prefix_cache_mb=0)
    try:
        ref = [tokens_of(one, p) for p in prompts]
    finally:
        one.close()
    progress.update(f"determinism: the same prompts {m} at a time", force=True)
    many = LlamaCppBackend(max_batch=m, prefix_cache_mb=0)
    got: list[list[int]] = [[] for _ in prompts]
    try:
        for start in range(0, len(prompts), m):
            def one_prompt(i: int) -> None:
                got[i] = tokens_of(many, prompts[i])
            threads = [threading.Thread(target=one_prompt, args=(i,))
                       for i in range(start, min(start + m, len(prompts)))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        mean_batch = many.stats()["mean_batch"]
    finally:
        many.close()
    firsts = [next((k for k, (a, b) in enumerate(zip(r, g)) if a != b), None) for r, g in zip(ref, got)]
    differ = [f for f in firsts if f is not None]
    return {"determinism": {"prompts": len(prompts), "tokens": args.tokens, "max_batch": m, "mean_batch": mean_batch,
                            "identical": len(prompts) - len(differ), "differing": len(differ),
                            "first_difference_at": sorted(differ)}}
