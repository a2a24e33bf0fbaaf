"""`aios bench ...`: benchmark commands that print figures (tests never assert on speed)."""
from __future__ import annotations

from typing import Any


def add_bench_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="measure the kernel (prints figures; --json for machines)")
    kinds = bench.add_subparsers(dest="bench", required=True)

    p = kinds.add_parser("syscall", help="no-op kernel.ping round trips from N concurrent agent processes, "
                                         "against a bare pyzmq client->broker->worker echo baseline")
    p.add_argument("--run-dir", help="benchmark a running kernel (default: start one in a temporary run directory)")
    p.add_argument("--agents", type=int, default=32, help="concurrent agent processes (default 32)")
    p.add_argument("--calls", type=int, default=500, help="calls per agent (default 500)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleave kernel and baseline over this many rounds, splitting --calls (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=lambda a: __import__("aios.bench.syscall", fromlist=["run"]).run(a))

    p = kinds.add_parser("llm", help="mixed short/long LLM workload under each scheduling policy vs direct calls")
    p.add_argument("--backend", choices=["llamacpp", "sim"], default="llamacpp",
                   help="llamacpp: the real default model; sim: a labelled simulated backend (fixed s/token)")
    p.add_argument("--policies", default="fifo,rr,las", help="comma-separated policies to compare")
    p.add_argument("--short", type=int, default=None, help="agents with short requests")
    p.add_argument("--long", type=int, default=None, help="agents with long requests")
    p.add_argument("--short-tokens", type=int, default=16)
    p.add_argument("--long-tokens", type=int, default=256)
    p.add_argument("--short-rounds", type=int, default=1,
                   help="requests each short agent sends in a row (default 1; 3 shows las's per-agent fairness)")
    p.add_argument("--slice", type=int, default=32, help="time slice in tokens for preemptive policies")
    p.add_argument("--concurrency", action="store_true",
                   help="instead: tokens/s of one core serving 1, 2, 4, 8 concurrent generations, "
                        "batched vs one at a time")
    p.add_argument("--agents-steps", action="store_true",
                   help="instead: agents running multi-step conversations with a shared system prompt, "
                        "prefix cache on vs off")
    p.add_argument("--determinism", action="store_true",
                   help="instead: how often greedy outputs differ batched vs one at a time (in process)")
    p.add_argument("--prompts", type=int, default=32, help="--determinism: prompts (default 32)")
    p.add_argument("--levels", default="1,2,4,8", help="--concurrency: numbers of concurrent generations")
    p.add_argument("--tokens", type=int, default=64, help="--concurrency: tokens per generation (default 64)")
    p.add_argument("--rounds", type=int, default=3,
                   help="--concurrency, --agents-steps: alternating rounds, medians reported (default 3)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="batched core's max_batch (--concurrency default 8; --agents-steps: the backend's default)")
    p.add_argument("--sim-speedup", type=float, default=2.4,
                   help="--backend sim --concurrency: SIMULATED aggregate speed-up at max-batch (default 2.4)")
    p.add_argument("--sim-seconds-per-token", type=float, default=0.01,
                   help="--backend sim --concurrency/--agents-steps: SIMULATED seconds per token (default 0.01)")
    p.add_argument("--agents", type=int, default=8, help="--agents-steps: agents (default 8)")
    p.add_argument("--steps", type=int, default=5, help="--agents-steps: steps per agent (default 5)")
    p.add_argument("--answer-tokens", type=int, default=32, help="--agents-steps: tokens per answer (default 32)")
    p.add_argument("--system-words", type=int, default=300,
                   help="--agents-steps: words in the shared system prompt (300 words: about 400 tokens)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=lambda a: __import__("aios.bench.llm", fromlist=["run"]).run(a))

    from aios.bench.tools import add_parser as add_tools_parser
    add_tools_parser(kinds)
    from aios.bench.storage import add_parser as add_storage_parser
    add_storage_parser(kinds)
    from aios.bench.memory import add_parser as add_memory_parser
    add_memory_parser(kinds)
    from aios.bench.recall import add_parser as add_recall_parser
    add_recall_parser(kinds)
