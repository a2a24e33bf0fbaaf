"""Managers that fail on purpose, for supervisor tests."""
from __future__ import annotations

import os

from pydantic import BaseModel

from aios.managers.base import Manager, RequestContext, op


class NoArgs(BaseModel):
    pass


class SetupCrashManager(Manager):
    """Dies in setup, before it ever says READY."""

    service = "crashy"

    def setup(self) -> None:
        raise RuntimeError("setup exploded on purpose")


class FlakyManager(Manager):
    """Starts fine once; every later incarnation crashes in setup.

    `crash` kills the process (os._exit) so the supervisor restarts it, and
    the restarts then keep failing fast until the supervisor gives up (FATAL).
    """

    service = "flaky"

    def setup(self) -> None:
        marker = self.run_dir.path / f"{self.name}.started"
        if marker.exists():
            raise RuntimeError("flaky manager: crashing in setup on every restart")
        marker.write_text(str(os.getpid()))

    @op(NoArgs)
    def crash(self, args: NoArgs, ctx: RequestContext) -> dict:
        os._exit(1)

    @op(NoArgs, idempotent=True)
    def ping(self, args: NoArgs, ctx: RequestContext) -> dict:
        return {"pid": os.getpid()}


class HogArgs(BaseModel):
    mb: int


class HogManager(Manager):
    """Allocates and holds `mb` megabytes per call: a stand-in for a poison request that makes its
    manager's memory run away (the supervisor's memory limit must stop it)."""

    service = "hog"

    @op(HogArgs, idempotent=True)
    def hog(self, args: HogArgs, ctx: RequestContext) -> dict:
        import time
        held = bytearray(args.mb * 1024 * 1024)
        for i in range(0, len(held), 4096):  # touch every page: resident, not just reserved
            held[i] = 1
        while not ctx.cancelled.is_set():
            time.sleep(0.05)
        return {"held_mb": args.mb}

    @op(NoArgs, idempotent=True)
    def ping(self, args: NoArgs, ctx: RequestContext) -> dict:
        return {"pid": os.getpid()}
