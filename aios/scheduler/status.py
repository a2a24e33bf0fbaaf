"""What `kernel.status` reports: the scheduler's books, read (never changed) from its core."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aios.scheduler.core import SchedulerCore

KERNEL = "kernel"


@dataclass(slots=True)
class ServiceStats:
    """Per service: calls in, their outcomes, and the waiting and turnaround they saw."""

    submitted: int = 0
    completed: int = 0
    errors: int = 0
    requeued: int = 0
    adopted: int = 0  # re-sent after a scheduler restart and bound to the run still going on
    preemptions: int = 0
    wait_s_total: float = 0.0
    turnaround_s_total: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        done = max(self.completed + self.errors, 1)
        return {"submitted": self.submitted, "completed": self.completed, "errors": self.errors,
                "requeued": self.requeued, "adopted": self.adopted, "preemptions": self.preemptions,
                "wait_mean_s": round(self.wait_s_total / done, 6),
                "turnaround_mean_s": round(self.turnaround_s_total / done, 6)}


def kernel_status(core: "SchedulerCore", now: float) -> dict[str, Any]:
    services = sorted((core.expected_services | core.registry.services() | set(core.queues)) - {KERNEL})
    extra = core.extra_status()
    up = now - (core.started_at if core.started_at is not None else now)
    scheduler = {"policy": core.config.scheduler.policy, "uptime_s": round(up, 3), **extra.pop("scheduler", {})}
    return {
        "scheduler": scheduler,
        "managers": [m.row(now) for m in core.registry],
        "queues": {s: core.queued(s) for s in services},
        # per target (a tool, a model): how many requests wait for it; O(queue) but only on status
        "queued_by_target": {s: counts for s, q in core.queues.items()
                             if (counts := dict(Counter(r.target for r in q if r.target is not None)))},
        "policy": {s: st for s, q in core.queues.items() if (st := q.stats())},
        "held": len(core.held),
        "services": {s: core.stats[s].as_dict() for s in services},
        "pending": len(core.pending),
        "reply_cache": {"entries": len(core.reply_cache), "bytes": core.reply_cache_bytes},
        "unclaimed": core.adoption.figures(),
        **extra,
    }
