"""Test tool: module-level state shows whether a worker was reused; prints go to stderr, not the protocol."""
import os
import sys
import time

CALLS = 0
STARTED = time.monotonic()


def run(args, ctx):
    global CALLS
    CALLS += 1
    if args.get("print_bytes"):
        print("p" * args["print_bytes"])  # must not corrupt the worker protocol
        sys.stdout.flush()
    return {"args": args, "calls": CALLS, "worker_started": STARTED, "pid": os.getpid(), "uid": os.getuid(),
            "cwd": os.getcwd(), "isolation": ctx.isolation}
