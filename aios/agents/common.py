"""What the example agents share: argument parsing and the JSON lines they print.

An agent prints one JSON line per finished request (`report`), which `aios demo` collects, and,
with `--stream`, one line per piece of streamed text (`token_printer`), which the demo shows live.
"""
from __future__ import annotations

import argparse
import json
from typing import Callable

from aios.sdk import Client, Reply, connect

#: sampling that keeps the small base model from looping on long answers (repetitions are penalised,
#: deterministically, so exact resume still holds)
LONG_ANSWER_SAMPLING = {"temperature": 0.0, "repeat_penalty": 1.3}


def agent_client(name: str, description: str) -> tuple[Client, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run-dir", default=None, help="kernel run directory (default: the default one)")
    parser.add_argument("--name", default=name, help="agent name the kernel accounts work to")
    parser.add_argument("--stream", action="store_true", help="print each piece of text as it is generated")
    args = parser.parse_args()
    return connect(args.run_dir, agent=args.name, timeout=600), args


def token_printer(agent: str, enabled: bool) -> Callable[[str], None] | None:
    """An `on_token` callback printing {"agent", "token"} lines, or None when not streaming."""
    if not enabled:
        return None

    def emit(text: str) -> None:
        print(json.dumps({"agent": agent, "token": text}), flush=True)

    return emit


def report(agent: str, request: str, reply: Reply) -> None:
    """One JSON line per finished request (what `aios demo` reads)."""
    result = reply.result
    print(json.dumps({
        "agent": agent,
        "request": request,
        "answer": result["message"]["content"].strip(),
        "tokens": result["usage"]["completion_tokens"],
        "wait_s": reply.timing.get("wait_s"),
        "turnaround_s": reply.timing.get("turnaround_s"),
        "preemptions": reply.timing.get("preemptions"),
    }), flush=True)
