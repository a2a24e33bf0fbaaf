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


class HoldArgs(BaseModel):
    seconds: float


class FadingManager(Manager):
    """Starts fine once; every later incarnation says READY and dies about 0.3 s later.

    So after `crash`, it is registered with the scheduler only briefly before each death (well
    under the heartbeat expiry), and the supervisor gives up on it (FATAL) after a few restarts:
    the case where the scheduler must learn of FATAL from the supervisor, not from a death it saw.
    """

    service = "fading"

    def setup(self) -> None:
        import threading
        marker = self.run_dir.path / f"{self.name}.started"
        if marker.exists():
            threading.Timer(0.3, os._exit, (1,)).start()  # READY goes out now; death follows
        else:
            marker.write_text(str(os.getpid()))

    @op(NoArgs)
    def crash(self, args: NoArgs, ctx: RequestContext) -> dict:
        os._exit(1)

    @op(NoArgs, idempotent=True)
    def ping(self, args: NoArgs, ctx: RequestContext) -> dict:
        return {"pid": os.getpid()}

    @op(HoldArgs, idempotent=True)
    def hold(self, args: HoldArgs, ctx: RequestContext) -> dict:
        """Runs until cancelled or `seconds` pass: a call in flight whenever its process dies."""
        ctx.cancelled.wait(args.seconds)
        return {"pid": os.getpid()}
