"""The scheduler's record of one system call, from arrival to its final reply.

A request moves through explicit states, and every move is checked:

    HELD ──▶ QUEUED ──▶ RUNNING ──▶ DONE
      │        ▲  │        │  │
      │        │  │        │  └──▶ YIELDED ──▶ (QUEUED again, with affinity)
      │        │  │        └──▶ QUEUED (its manager died and it is safe to repeat)
      └────────┴──┴───────────▶ FAILED (denied, deadline, cancelled, agent gone, manager died)

An illegal move (a reply for a request that is not running, a second final
reply) raises `IllegalTransition`; the broker logs it and the request keeps
its state, so a confused or hostile manager cannot corrupt the books.
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from aios.messages import Timing

_arrivals = itertools.count()

#: prefix of a client address on the backend socket (a manager making a call). Agents' addresses
#: on the frontend are the routing ids their sockets chose (`aios.sockets.caller_identity`) or
#: ZeroMQ generated (a zero byte first); the broker drops frontend frames from an id with this
#: prefix, so the two never collide.
BACKEND_CLIENT = b"@"


class State(str, enum.Enum):
    HELD = "held"          # waiting for the admission step's verdict
    QUEUED = "queued"      # in its service's ready queue
    RUNNING = "running"    # dispatched to a manager
    YIELDED = "yielded"    # preempted; goes back to the queue (briefly, between yield and requeue)
    DONE = "done"          # answered with the manager's final reply
    FAILED = "failed"      # answered with an error by the scheduler


_ALLOWED: dict[State | None, frozenset[State]] = {
    None: frozenset({State.HELD, State.QUEUED, State.FAILED}),
    State.HELD: frozenset({State.QUEUED, State.FAILED}),
    State.QUEUED: frozenset({State.RUNNING, State.FAILED}),
    State.RUNNING: frozenset({State.DONE, State.FAILED, State.YIELDED, State.QUEUED}),
    State.YIELDED: frozenset({State.QUEUED, State.FAILED}),
    State.DONE: frozenset(),
    State.FAILED: frozenset(),
}


class IllegalTransition(Exception):
    """A state change the lifecycle does not allow (the request keeps its state)."""


@dataclass(slots=True, eq=False)
class Job:
    """A syscall the scheduler owns. Times are `time.monotonic()` seconds.

    `created` is arrival at the scheduler, `started` the first dispatch to a
    manager, `finished` the final reply; `run_s` adds up the time it spent on
    managers (across preemptions), so waiting time is `turnaround - run_s`.
    `client` is the caller's address: an agent's routing id on the frontend,
    or BACKEND_CLIENT + a manager's routing id for a call between managers.
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
    parent: "Job | None" = None       # the request whose handler made this call
    caller: str | None = None             # service of the manager that made this call
    arrival: int = field(default_factory=lambda: next(_arrivals))
    state: State | None = None
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
    streamed: bool = False            # partial replies already reached the caller (from this run or,
                                      # said by a re-send after a restart, from an earlier scheduler's)
    children: set["Job"] | None = None  # calls made by this request's handler, still pending
    queue_token: int = 0              # policies' lazy deletion: bumped whenever it leaves a queue

    @property
    def key(self) -> tuple[bytes, str]:
        """Identity of a request in the scheduler: request ids are unique per caller connection."""
        return (self.client, self.id)

    @property
    def from_manager(self) -> bool:
        return self.client[:1] == BACKEND_CLIENT

    @property
    def live(self) -> bool:
        return self.state not in (State.DONE, State.FAILED)

    def move(self, to: State) -> None:
        if to not in _ALLOWED[self.state]:
            raise IllegalTransition(f"request {self.id} ({self.service}.{self.op}) cannot go from "
                                    f"{self.state.value if self.state else 'new'} to {to.value}")
        self.state = to

    def release_body(self) -> None:
        """Drop the arguments once nothing can dispatch the request again (they may be megabytes)."""
        self.body_raw = b""

    def chain(self) -> list["Job"]:
        """This request and its ancestors (callers), innermost first."""
        out: list[Job] = []
        r: Job | None = self
        while r is not None:
            out.append(r)
            r = r.parent
        return out

    def timing(self) -> Timing:
        end = self.finished if self.finished is not None else self.created
        turnaround = end - self.created
        first_wait = (self.started - self.created) if self.started is not None else turnaround
        return Timing(wait_s=round(turnaround - self.run_s, 6), first_wait_s=round(first_wait, 6),
                      run_s=round(self.run_s, 6), turnaround_s=round(turnaround, 6),
                      preemptions=self.preemptions, attempts=self.attempts)
