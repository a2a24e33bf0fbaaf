"""Two managers that call each other's ops through the scheduler, for the calls-between-managers tests.

`alpha` and `beta` are ordinary managers; their handlers use `ctx.call`, so
every call they make is queued, scheduled and charged like an agent's call,
on behalf of the agent whose request they serve.
"""
from __future__ import annotations

import os
import time

from pydantic import BaseModel, ConfigDict, Field

from aios.managers.base import Manager, RequestContext, op
from tests.support.gates import wait_at_gate


class Text(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = ""


class Burn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: int = Field(ge=0, le=1_000_000)


class Sleep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = Field(ge=0, le=30)
    #: a gate (tests/support/gates.py) to wait at before sleeping
    gate: str = Field(default="", max_length=4096)


class Alpha(Manager):
    service = "alpha"
    capacity = 1  # one thread: a call that comes back to alpha while it waits would deadlock it

    @op(Text, idempotent=True)
    def relay(self, args: Text, ctx: RequestContext) -> dict:
        """Ask beta to echo `text`; report what beta saw."""
        seen = ctx.call("beta", "whoami", text=args.text)
        return {"beta_saw": seen, "agent": ctx.agent, "caller": ctx.caller}

    @op(Text)
    def loop(self, args: Text, ctx: RequestContext) -> dict:
        """alpha.loop -> beta.bounce -> alpha.relay: a cycle the kernel must refuse, not hang on."""
        return ctx.call("beta", "bounce", text=args.text)

    @op(Burn)
    def work(self, args: Burn, ctx: RequestContext) -> dict:
        """Have beta do `tokens` units of metered work on behalf of the calling agent."""
        return ctx.call("beta", "burn", tokens=args.tokens)

    @op(Sleep)
    def wait_on_beta(self, args: Sleep, ctx: RequestContext) -> dict:
        """Call beta.sleep; bounded by this request's own deadline."""
        return ctx.call("beta", "sleep", seconds=args.seconds, gate=args.gate)


class Beta(Manager):
    service = "beta"
    capacity = 2

    @op(Text, idempotent=True)
    def whoami(self, args: Text, ctx: RequestContext) -> dict:
        return {"text": args.text, "agent": ctx.agent, "caller": ctx.caller, "pid": os.getpid()}

    @op(Text)
    def bounce(self, args: Text, ctx: RequestContext) -> dict:
        return ctx.call("alpha", "relay", text=args.text)

    @op(Burn)
    def burn(self, args: Burn, ctx: RequestContext) -> dict:
        ctx.tokens = args.tokens  # the service units this run consumed, charged by the policy
        return {"burned": args.tokens, "agent": ctx.agent}

    @op(Sleep)
    def sleep(self, args: Sleep, ctx: RequestContext) -> dict:
        wait_at_gate(args.gate, ctx.cancelled)
        end = time.monotonic() + args.seconds
        while time.monotonic() < end and not ctx.cancelled.is_set():
            time.sleep(0.01)
        return {"slept": args.seconds, "cancelled": ctx.cancelled.is_set()}
