"""A small manager for process-tree tests, declared with the manager base like any real one.

It exercises what the scheduler must get right before the real managers land:
dispatch (echo), backpressure and capacity (sleep, held at a gate until the test opens it),
and partial replies (count);
and the base's inline ops and batches (`hold`, `tally`, `inline_call`) and housekeeping (`upkeep`).
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from aios.managers.base import Deferred, Manager, OpError, RequestContext, op
from tests.support.gates import wait_at_gate


class EchoArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(max_length=1_000_000)


class SleepArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = Field(ge=0, le=60)
    tag: str = ""
    #: a gate (tests/support/gates.py) to wait at before sleeping: the op runs until the test opens it
    gate: str = Field(default="", max_length=4096)


class TagArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tag: str = ""


class CountArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(ge=0, le=1000)


class TallyArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fail: bool = False
    inline: bool = True  # the op decides per request where it runs


class EchoManager(Manager):
    service = "echo"
    capacity = 2

    def setup(self) -> None:
        self._batch_ids = itertools.count(1)
        self._closed: dict[int, dict[str, Any]] = {}  # token -> what end_batch saw of its batch
        self._upkeep = {"after_batch": 0, "idle": 0, "fail": False}
        self._sleeps: dict[str, int] = {}  # tag -> sleeps started with it (`sleeps`)

    def housekeeping(self, idle: bool) -> None:
        self._upkeep["idle" if idle else "after_batch"] += 1
        if self._upkeep["fail"]:
            raise RuntimeError("housekeeping was asked to fail")

    def end_batch(self, tokens: list[Any]) -> None:
        batch = {"batch": next(self._batch_ids), "size": len(tokens), "thread": threading.current_thread().name}
        for token in tokens:
            self._closed[token] = batch

    @op(SleepArgs, inline=True)
    def hold(self, args: SleepArgs, ctx: RequestContext) -> dict:
        """Block the socket thread (what an inline op must never do in earnest): requests arriving
        meanwhile queue up and form the next batch."""
        wait_at_gate(args.gate, ctx.cancelled)
        time.sleep(args.seconds)
        return {"thread": threading.current_thread().name}

    @op(TallyArgs, inline=lambda args: args.inline)
    def tally(self, args: TallyArgs, ctx: RequestContext) -> Deferred:
        """Answered only once its batch is closed: with what `end_batch` saw of that batch."""
        token = object()
        ran_on = threading.current_thread().name

        def finish() -> dict:
            if args.fail:
                raise OpError("NOT_FOUND", "this tally was asked to fail")
            return {**self._closed.pop(token), "ran_on": ran_on}

        return Deferred(finish, token)

    @op(TallyArgs, inline=True)
    def upkeep(self, args: TallyArgs, ctx: RequestContext) -> dict:
        """How often `housekeeping` ran so far (after batches, when idle); `fail` makes it raise."""
        self._upkeep["fail"] = args.fail
        return {k: v for k, v in self._upkeep.items() if k != "fail"}

    @op(EchoArgs, inline=True)
    def inline_call(self, args: EchoArgs, ctx: RequestContext) -> dict:
        return ctx.call("echo", "echo", text=args.text)

    @op(EchoArgs)
    def where(self, args: EchoArgs, ctx: RequestContext) -> dict:
        return {"thread": threading.current_thread().name}

    @op(EchoArgs, idempotent=True)
    def echo(self, args: EchoArgs, ctx: RequestContext) -> dict:
        return {"text": args.text, "agent": ctx.agent, "pid": os.getpid()}

    @op(SleepArgs, idempotent=True)
    def sleep(self, args: SleepArgs, ctx: RequestContext) -> dict:
        started = time.monotonic()
        self._sleeps[args.tag] = self._sleeps.get(args.tag, 0) + 1
        wait_at_gate(args.gate, ctx.cancelled)
        end = time.monotonic() + args.seconds
        while time.monotonic() < end and not ctx.cancelled.is_set():
            time.sleep(0.01)
        # started/ended are CLOCK_MONOTONIC, comparable across processes on one host
        return {"slept": args.seconds, "tag": args.tag, "pid": os.getpid(), "attempt": ctx.attempt,
                "started": started, "ended": time.monotonic(), "thread": threading.current_thread().name}

    @op(TagArgs, idempotent=True, inline=True)
    def sleeps(self, args: TagArgs, ctx: RequestContext) -> dict:
        """How many `sleep` calls tagged `tag` this process has started (a copy run twice counts 2)."""
        return {"started": self._sleeps.get(args.tag, 0)}

    @op(SleepArgs)
    def sleep_once(self, args: SleepArgs, ctx: RequestContext) -> dict:
        """Like sleep, but not safe to repeat: a crash must fail it, not re-run it."""
        wait_at_gate(args.gate, ctx.cancelled)
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


class SmallPoolEchoManager(EchoManager):
    """Holds 8 requests at once but runs pool ops on 2 threads (`pool_threads`)."""

    capacity = 8
    pool_threads = 2


class IdentifiedEchoManager(EchoManager):
    """An echo manager that leaves its routing id in the run directory, so an impersonation test
    can try to claim it (an attacker would have to guess it: it is random per incarnation)."""

    def setup(self) -> None:
        (self.run_dir.path / f"{self.name}.identity").write_bytes(self.identity)
