"""The scheduler's record of one system call, from arrival to its final reply."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

_arrivals = itertools.count()


@dataclass(slots=True, eq=False)
class Request:
    """A syscall the scheduler owns. Times are `time.monotonic()` seconds.

    `created` is arrival at the scheduler, `started` the first dispatch to a
    manager, `finished` the final reply; `run_s` adds up the time it spent on
    managers (across preemptions), so waiting time is `turnaround - run_s`.
    """

    id: str
    client: bytes
    agent: str
    service: str
    op: str
    body_raw: bytes
    created: float
    deadline: float | None = None
    target: str | None = None
    idempotent: bool = False
    preemptible: bool = False
    arrival: int = field(default_factory=lambda: next(_arrivals))
    started: float | None = None
    finished: float | None = None
    dispatched_at: float | None = None
    manager: bytes | None = None      # routing id of the manager running it now
    affinity: bytes | None = None     # manager holding its saved context, if any
    attempts: int = 0                 # dispatches to a manager (resumed slices included)
    failures: int = 0                 # runs lost because their manager died
    preemptions: int = 0
    run_s: float = 0.0
    tokens: int = 0
    streamed: bool = False            # partial replies already reached the agent

    @property
    def key(self) -> tuple[bytes, str]:
        """Identity of a request in the scheduler: request ids are unique per agent connection."""
        return (self.client, self.id)

    def timing(self) -> dict[str, float | int]:
        end = self.finished if self.finished is not None else self.created
        turnaround = end - self.created
        first_wait = (self.started - self.created) if self.started is not None else turnaround
        return {
            "wait_s": round(turnaround - self.run_s, 6),
            "first_wait_s": round(first_wait, 6),
            "run_s": round(self.run_s, 6),
            "turnaround_s": round(turnaround, 6),
            "preemptions": self.preemptions,
            "attempts": self.attempts,
        }
