"""`aios bench syscall`: system-call overhead of the kernel against a bare pyzmq echo.

N agent processes, each with its own `aios.sdk` Client, make no-op
`kernel.ping` calls back to back (closed loop): warm-up calls first, then
all start the timed phase together behind a barrier. Every call is a full
AIOS system call: signed, verified and decoded by the scheduler, answered,
signed again and verified by the SDK. Reported: per-call latency p50/p99 and
total syscalls per second over the timed phase.

In the same run, the same number of client processes make the same number of
calls through a bare pyzmq DEALER -> ROUTER/ROUTER broker -> DEALER worker
echo over ipc (`aios.bench.baseline`), so the kernel's figures can be read
against what plain ZeroMQ plus Python does on this machine. Both are also
measured with a single client, for unloaded latency. The four measurements
are interleaved over `--rounds` rounds (each doing its share of `--calls`),
alternating which side goes first, and pooled, so that other work on a shared
machine weighs on both sides alike.

Note the shapes differ: `kernel.ping` is answered by the scheduler itself
(agent -> scheduler -> agent), while the baseline goes through a separate
worker process (client -> broker -> worker -> broker -> client), which is
the path a call to a manager takes. The kernel pays for signing, verifying
and bookkeeping; the baseline pays for two more hops.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from typing import Any, Callable

from aios.bench.common import LoadResult, Progress, run_closed_loop, temporary_kernel
from aios.config import NO_BUILTINS
from aios.rundir import RunDir

GOAL_P50_RATIO = 1.5
GOAL_THROUGHPUT = 10_000.0
GOAL_AGENTS = 32
# kernel.ping is answered by the scheduler: no managers needed
KERNEL_CONFIG = {"llm": [], **NO_BUILTINS}
DEFAULT_ROUNDS = 3


def _warmup(calls: int) -> int:
    return max(10, min(100, calls // 5))


def make_kernel_caller(run_dir: RunDir) -> Callable[[int], tuple[Callable[[], None], Callable[[], None]]]:
    """`make_caller` for `run_closed_loop`: an SDK Client per agent process making kernel.ping calls."""

    def make(index: int) -> tuple[Callable[[], None], Callable[[], None]]:
        from aios.sdk import Client

        client = Client(run_dir, agent=f"bench-{index}", timeout=60.0)
        call = client.call

        def ping() -> None:
            if call("kernel", "ping") != {"pong": True}:
                raise RuntimeError("kernel.ping did not answer pong")

        return ping, client.close

    return make


def _split(calls: int, rounds: int) -> list[int]:
    """`calls` per agent spread over `rounds` (the first rounds take the remainder)."""
    base, extra = divmod(calls, rounds)
    return [base + (1 if i < extra else 0) for i in range(rounds) if base + (1 if i < extra else 0) > 0]


def measure(kernel_caller: Any, echo_caller: Any, agents: int, calls: int, rounds: int,
            progress: Progress) -> dict[str, LoadResult]:
    """Kernel and baseline, single client and `agents` clients, interleaved over `rounds` rounds.

    Interleaving (and alternating which goes first) spreads whatever else the
    machine is doing evenly over both sides, so their ratio stays meaningful
    on a shared machine. Each side makes `calls` timed calls per client in all.
    """
    parts: dict[str, list[LoadResult]] = {"k1": [], "b1": [], "kn": [], "bn": []}
    per_round = _split(calls, rounds)
    for r, n_calls in enumerate(per_round):
        warmup = _warmup(n_calls)
        sides = [("k", "kernel", kernel_caller), ("b", "baseline", echo_caller)]
        if r % 2:
            sides.reverse()
        plan = [(key + "1", name, make, 1) for key, name, make in sides]
        plan += [(key + "n", name, make, agents) for key, name, make in sides]
        for key, name, make, clients in plan:
            label = f"round {r + 1}/{len(per_round)}: {name}, {clients} agent{'s' if clients > 1 else ''}"
            result = run_closed_loop(make, clients, n_calls, warmup, label=label, progress=progress)
            parts[key].append(result)
            if result.errors:
                return {k: LoadResult.merge(v) for k, v in parts.items()}
    return {k: LoadResult.merge(v) for k, v in parts.items()}


def _kernel_running(run_dir: RunDir) -> bool:
    from aios.procutil import pid_alive
    pid = run_dir.read_pid()
    return bool(pid and pid_alive(pid) and run_dir.exists())


def run(args: argparse.Namespace) -> int:
    agents, calls = int(args.agents), int(args.calls)
    rounds = int(getattr(args, "rounds", None) or DEFAULT_ROUNDS)
    if agents < 1 or calls < 1 or rounds < 1:
        print("aios bench syscall: --agents, --calls and --rounds must be at least 1", file=sys.stderr)
        return 2
    rounds = min(rounds, calls)
    progress = Progress("[bench syscall]")
    from aios.bench.baseline import echo_service, make_echo_caller
    # Everything that talks ZeroMQ runs in forked children: this process never owns a context.
    try:
        with contextlib.ExitStack() as stack:
            if args.run_dir:
                run_dir = RunDir(args.run_dir)
                if not _kernel_running(run_dir):
                    print(f"aios bench syscall: no kernel running in {run_dir.path}", file=sys.stderr)
                    return 1
                temporary = False
            else:
                progress.update("starting a kernel in a temporary run directory", force=True)
                run_dir = stack.enter_context(temporary_kernel(KERNEL_CONFIG))
                temporary = True
            progress.update("starting the bare pyzmq echo baseline", force=True)
            front = stack.enter_context(echo_service())
            res = measure(make_kernel_caller(run_dir), make_echo_caller(front), agents, calls, rounds, progress)
            progress.update("stopping", force=True)
    except Exception as exc:
        progress.done()
        print(f"aios bench syscall: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    progress.done()
    errors = [f"{'kernel' if k[0] == 'k' else 'baseline'}: {e}" for k, r in res.items() for e in r.errors]
    if errors:
        for e in errors:
            print(f"aios bench syscall: {e}", file=sys.stderr)
        return 1
    result = build_result(agents, calls, rounds, str(run_dir.path), temporary, res["k1"], res["kn"], res["b1"], res["bn"])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


def _r(x: float, nd: int = 1) -> float | None:
    return None if x is None or math.isnan(x) else round(x, nd)


def build_result(agents: int, calls: int, rounds: int, run_dir: str, temporary: bool, k_single: LoadResult, k_loaded: LoadResult,
                 b_single: LoadResult, b_loaded: LoadResult) -> dict[str, Any]:
    ks, kl, bs, bl = (r.summary() for r in (k_single, k_loaded, b_single, b_loaded))
    p50_ratio = kl["p50_us"] / bl["p50_us"] if bl["p50_us"] else float("nan")
    single_ratio = ks["p50_us"] / bs["p50_us"] if bs["p50_us"] else float("nan")
    return {
        "agents": agents,
        "calls": calls,
        "calls_total": k_loaded.calls,
        "rounds": rounds,
        "run_dir": run_dir,
        "temporary_kernel": temporary,
        "p50_us": _r(kl["p50_us"]),
        "p99_us": _r(kl["p99_us"]),
        "mean_us": _r(kl["mean_us"]),
        "throughput": _r(kl["throughput"]),
        "wall_s": _r(kl["wall_s"], 3),
        "single_p50_us": _r(ks["p50_us"]),
        "single_p99_us": _r(ks["p99_us"]),
        "single_throughput": _r(ks["throughput"]),
        "baseline_p50_us": _r(bl["p50_us"]),
        "baseline_p99_us": _r(bl["p99_us"]),
        "baseline_mean_us": _r(bl["mean_us"]),
        "baseline_throughput": _r(bl["throughput"]),
        "baseline_calls_total": b_loaded.calls,
        "baseline_single_p50_us": _r(bs["p50_us"]),
        "baseline_single_p99_us": _r(bs["p99_us"]),
        "baseline_single_throughput": _r(bs["throughput"]),
        "client_cpu_us_per_call": _r(kl["client_cpu_us_per_call"]),
        "baseline_client_cpu_us_per_call": _r(bl["client_cpu_us_per_call"]),
        "p50_ratio": _r(p50_ratio, 2),
        "single_p50_ratio": _r(single_ratio, 2),
        "goals": {
            "p50_ratio_max": GOAL_P50_RATIO,
            "p50_ratio_met": bool(p50_ratio <= GOAL_P50_RATIO),
            "throughput_min": GOAL_THROUGHPUT,
            "throughput_agents": GOAL_AGENTS,
            "throughput_met": bool(kl["throughput"] >= GOAL_THROUGHPUT),
        },
    }


def print_table(r: dict[str, Any]) -> None:
    where = "a temporary kernel" if r["temporary_kernel"] else f"the kernel in {r['run_dir']}"
    print(f"aios bench syscall: kernel.ping on {where}, {r['agents']} agents x {r['calls']} timed calls, "
          f"kernel and baseline interleaved over {r['rounds']} round(s)")
    print()
    print(f"{'':<30}{'p50 µs':>10}{'p99 µs':>10}{'mean µs':>10}{'calls/s':>11}")
    rows = [
        (f"kernel    {r['agents']} agents", r["p50_us"], r["p99_us"], r["mean_us"], r["throughput"]),
        (f"baseline  {r['agents']} agents", r["baseline_p50_us"], r["baseline_p99_us"], r["baseline_mean_us"],
         r["baseline_throughput"]),
        ("kernel    1 agent", r["single_p50_us"], r["single_p99_us"], None, r["single_throughput"]),
        ("baseline  1 agent", r["baseline_single_p50_us"], r["baseline_single_p99_us"], None,
         r["baseline_single_throughput"]),
    ]
    for name, p50, p99, mean, tput in rows:
        mean_s = f"{mean:>10.1f}" if mean is not None else f"{'':>10}"
        print(f"{name:<30}{p50:>10.1f}{p99:>10.1f}{mean_s}{tput:>11,.0f}")
    print()
    print("baseline: bare pyzmq client DEALER -> broker ROUTER/ROUTER -> worker DEALER echo over ipc, "
          "msgpack body, no signing")
    print(f"client CPU per call at {r['agents']} agents (all threads of an agent process): "
          f"kernel {r['client_cpu_us_per_call']:.1f} µs, baseline {r['baseline_client_cpu_us_per_call']:.1f} µs")
    g = r["goals"]
    print(f"p50 ratio kernel/baseline at {r['agents']} agents: {r['p50_ratio']:.2f}x "
          f"(goal <= {g['p50_ratio_max']}x): {'met' if g['p50_ratio_met'] else 'NOT met'}")
    note = "" if r["agents"] == g["throughput_agents"] else f" [goal is stated for {g['throughput_agents']} agents]"
    print(f"throughput at {r['agents']} agents: {r['throughput']:,.0f} syscalls/s "
          f"(goal >= {g['throughput_min']:,.0f}): {'met' if g['throughput_met'] else 'NOT met'}{note}")
    print(f"single-client p50 ratio kernel/baseline: {r['single_p50_ratio']:.2f}x")
