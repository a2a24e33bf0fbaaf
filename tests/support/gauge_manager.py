"""A tiny manager that only adds numbers, declared in one module with nothing registered anywhere
else: it shows that a new manager gets the standard `status` op, its own `aios status -v` line
and SDK access (`client.call("gauge", "add", n=...)`) from the manager base alone."""
from __future__ import annotations

import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from aios.managers.base import Manager, RequestContext, op


class AddArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(ge=0, le=1_000_000)


class GaugeManager(Manager):
    service = "gauge"
    capacity = 2

    def setup(self) -> None:
        self._lock_total = threading.Lock()
        self.total = 0
        self.calls = 0

    @op(AddArgs)
    def add(self, args: AddArgs, ctx: RequestContext) -> dict[str, int]:
        with self._lock_total:
            self.total += args.n
            self.calls += 1
            return {"total": self.total}

    def status_figures(self) -> dict[str, Any]:
        with self._lock_total:
            return {"total": self.total, "calls": self.calls}

    def status_line(self, figures: dict[str, Any]) -> str:
        return f"total {figures['total']} from {figures['calls']} calls"
