"""What the example agents share: argument parsing and the JSON line they print per request."""
from __future__ import annotations

import argparse
import json

from aios.sdk import Client, Reply, connect


def agent_client(name: str, description: str) -> tuple[Client, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run-dir", default=None, help="kernel run directory (default: the default one)")
    parser.add_argument("--name", default=name, help="agent name the kernel accounts work to")
    args = parser.parse_args()
    return connect(args.run_dir, agent=args.name, timeout=600), args


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
