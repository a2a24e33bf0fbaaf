"""The admission step: between validating a request and queueing it.

Shaped like a scheduling policy: a small object the scheduler core consults,
which never touches sockets. For each validated request it returns a
`Decision`:

- `ALLOW`: queue it now;
- `deny(code, message)`: answer it with that error, never run it;
- `hold(reason)`: park it (its deadline still runs) until the step decides,
  reported through `poll()` on the scheduler's next tick. This is where an
  access check that waits for a person's confirmation, or a quota that waits
  for room, plugs in.

`AdmitAll` is the default. `QueueQuota` refuses an agent's request with a
retryable OVERLOADED once that agent already has `max_queued_per_agent`
requests queued, so one agent's flood cannot push everyone else's work
behind it. `Chain` runs several steps in order; the first that does not
allow decides.
"""
from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from aios.protocol import ErrorCode
from aios.scheduler.request import Job

if TYPE_CHECKING:
    from aios.config import Config


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: str  # "allow" | "deny" | "hold"
    code: ErrorCode | None = None
    message: str = ""

    @property
    def allowed(self) -> bool:
        return self.verdict == "allow"


ALLOW = Decision("allow")


def deny(code: ErrorCode, message: str) -> Decision:
    return Decision("deny", code, message)


def hold(reason: str) -> Decision:
    return Decision("hold", None, reason)


class SchedulerView(Protocol):
    """What an admission step may read of the scheduler's state."""

    def queued_by_agent(self, agent: str) -> int: ...

    def queued(self, service: str) -> int: ...


class Admission(abc.ABC):
    name = "admission"

    @abc.abstractmethod
    def admit(self, req: Job, view: SchedulerView) -> Decision:
        """Decide on a validated request before it is queued."""

    def poll(self, now: float) -> list[tuple[Job, Decision]]:
        """Verdicts on held requests reached since the last poll (allow or deny)."""
        return []

    def forget(self, req: Job) -> None:
        """A held request ended without a verdict (deadline, agent gone): drop what is kept for it."""


class AdmitAll(Admission):
    name = "all"

    def admit(self, req: Job, view: SchedulerView) -> Decision:
        return ALLOW


class QueueQuota(Admission):
    """At most `limit` queued requests per agent (running ones do not count)."""

    name = "queue-quota"

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def admit(self, req: Job, view: SchedulerView) -> Decision:
        n = view.queued_by_agent(req.agent)
        if n >= self.limit:
            return deny(ErrorCode.OVERLOADED,
                        f"agent {req.agent!r} already has {n} requests queued (limit {self.limit}, "
                        f"[scheduler] max_queued_per_agent); retry when some have finished")
        return ALLOW


class Chain(Admission):
    """Steps in order: the first that does not allow decides."""

    name = "chain"

    def __init__(self, steps: list[Admission]) -> None:
        self.steps = steps

    def admit(self, req: Job, view: SchedulerView) -> Decision:
        for step in self.steps:
            d = step.admit(req, view)
            if not d.allowed:
                return d
        return ALLOW

    def poll(self, now: float) -> list[tuple[Job, Decision]]:
        return [x for step in self.steps for x in step.poll(now)]

    def forget(self, req: Job) -> None:
        for step in self.steps:
            step.forget(req)


def load_admission(target: str, options: dict[str, Any]) -> Admission:
    """An admission step named 'package.module:Class' in `[scheduler] admission`."""
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load admission step {target!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Admission)):
        raise ValueError(f"{target!r} is not an aios.scheduler.admission.Admission subclass")
    return cls(**options)


def make_admission(config: "Config") -> Admission:
    """The admission step a configuration asks for: the per-agent queue quota, then `[scheduler] admission`."""
    s = config.scheduler
    steps: list[Admission] = []
    if s.max_queued_per_agent:
        steps.append(QueueQuota(s.max_queued_per_agent))
    if s.admission:
        steps.append(load_admission(s.admission, dict(s.admission_options)))
    return Chain(steps) if steps else AdmitAll()
