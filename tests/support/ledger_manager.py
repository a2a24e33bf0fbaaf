"""A manager whose one non-idempotent op leaves a trace per execution, so a test can prove no call
ran twice (kills and restarts included)."""
from __future__ import annotations

import os
import time

from pydantic import BaseModel, ConfigDict, Field

from aios.managers.base import Manager, RequestContext, op


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=1, max_length=64)
    work_s: float = Field(default=0.0, ge=0, le=5)


class LedgerManager(Manager):
    service = "ledger"
    capacity = 4

    @op(Entry)
    def append(self, args: Entry, ctx: RequestContext) -> dict:
        """Not safe to repeat: each execution appends a line to ledger.log in the run directory."""
        time.sleep(args.work_s)
        fd = os.open(self.run_dir.path / "ledger.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{args.token}\n".encode())
        finally:
            os.close(fd)
        return {"token": args.token}

    @op(Entry, idempotent=True)
    def peek(self, args: Entry, ctx: RequestContext) -> dict:
        time.sleep(args.work_s)
        return {"token": args.token}
