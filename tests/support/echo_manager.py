"""A small manager for process-tree tests, declared with the manager base like any real one.

It exercises what the scheduler must get right before the real managers land:
dispatch (echo), backpressure and capacity (sleep), and partial replies (count).
"""
from __future__ import annotations

import os
import time

from pydantic import BaseModel, ConfigDict, Field

from aios.managers.base import Manager, OpError, RequestContext, op


class EchoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(max_length=1_000_000)


class SleepArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = Field(ge=0, le=60)
    tag: str = ""


class CountArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(ge=0, le=1000)


class EchoManager(Manager):
    service = "echo"
    capacity = 2

    @op(EchoArgs, idempotent=True)
    def echo(self, args: EchoArgs, ctx: RequestContext) -> dict:
        return {"text": args.text, "agent": ctx.agent, "pid": os.getpid()}

    @op(SleepArgs, idempotent=True)
    def sleep(self, args: SleepArgs, ctx: RequestContext) -> dict:
        started = time.monotonic()
        end = started + args.seconds
        while time.monotonic() < end and not ctx.cancelled.is_set():
            time.sleep(0.01)
        # started/ended are CLOCK_MONOTONIC, comparable across processes on one host
        return {"slept": args.seconds, "tag": args.tag, "pid": os.getpid(), "attempt": ctx.attempt,
                "started": started, "ended": time.monotonic()}

    @op(SleepArgs)
    def sleep_once(self, args: SleepArgs, ctx: RequestContext) -> dict:
        """Like sleep, but not safe to repeat: a crash must fail it, not re-run it."""
        time.sleep(args.seconds)
        return {"slept": args.seconds}

    @op(CountArgs)
    def count(self, args: CountArgs, ctx: RequestContext) -> dict:
        for i in range(args.n):
            ctx.partial({"i": i})
        return {"n": args.n}

    @op(SleepArgs)
    def drip(self, args: SleepArgs, ctx: RequestContext) -> dict:
        """Stream a partial every 10 ms for `seconds` (stops early when cancelled)."""
        end = time.monotonic() + args.seconds
        i = 0
        while time.monotonic() < end and not ctx.cancelled.is_set():
            ctx.partial({"i": i})
            i += 1
            time.sleep(0.01)
        return {"n": i, "cancelled": ctx.cancelled.is_set()}

    @op(EchoArgs)
    def fail(self, args: EchoArgs, ctx: RequestContext) -> dict:
        raise OpError("NOT_FOUND", f"nothing called {args.text!r}")


class IdentifiedEchoManager(EchoManager):
    """An echo manager that leaves its routing id in the run directory, so an impersonation test
    can try to claim it (an attacker would have to guess it: it is random per incarnation)."""

    def setup(self) -> None:
        (self.run_dir.path / f"{self.name}.identity").write_bytes(self.identity)
