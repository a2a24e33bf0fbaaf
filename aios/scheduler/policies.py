"""Scheduling policies: small objects that order a service's ready queue.

A policy never touches sockets. The broker pushes arrivals, asks for the next
request that fits a free manager, re-queues preempted requests, and reports
how much service each run consumed. Preemption happens only for ops their
manager declares preemptible (LLM generation): the policy's `slice_tokens`
tells the manager how many tokens to produce before yielding.

Policies:
- `fifo`: arrival order, run to completion.
- `rr`: round robin; each run gets `time_slice_tokens`, then goes to the tail.
- `las`: least attained service per agent (as in Autellix's PLAS): the agent
  that has received the least service so far goes next, with a time slice, so
  short interactive calls pass long generations, and a chatty agent cannot
  starve the others. `[scheduler.weights]` gives agents weighted shares
  (attained service is divided by the weight: weighted fair share).
"""
from __future__ import annotations

import abc
import heapq
import itertools
from collections import defaultdict
from typing import Callable, ClassVar, Iterator

from aios.config import SchedulerConfig
from aios.scheduler.request import Request

Fits = Callable[[Request], bool]


class Policy(abc.ABC):
    name: ClassVar[str]

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def push(self, req: Request) -> None:
        """A new arrival."""

    def requeue(self, req: Request) -> None:
        """A request coming back: preempted, or its manager died."""
        self.push(req)

    @abc.abstractmethod
    def pop(self, fits: Fits) -> Request | None:
        """Remove and return the next request for which `fits` is true, or None."""

    @abc.abstractmethod
    def remove(self, req: Request) -> bool:
        """Take a queued request out (deadline passed, agent gone)."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Request]: ...

    def slice_tokens(self, req: Request) -> int | None:
        """Tokens the next run may produce before yielding; None runs to completion."""
        return None

    def charge(self, req: Request, run_s: float, tokens: int) -> None:
        """Account for service a request just received."""


class _HeapPolicy(Policy):
    """A priority queue with lazy deletion; subclasses choose the key."""

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self._heap: list[tuple[tuple, int, Request]] = []
        self._live: dict[int, tuple] = {}  # id(req) -> key it is queued under
        self._tie = itertools.count()

    @abc.abstractmethod
    def key(self, req: Request, requeued: bool) -> tuple: ...

    def _insert(self, req: Request, key: tuple) -> None:
        self._live[id(req)] = key
        heapq.heappush(self._heap, (key, next(self._tie), req))

    def push(self, req: Request) -> None:
        self._insert(req, self.key(req, requeued=False))

    def requeue(self, req: Request) -> None:
        self._insert(req, self.key(req, requeued=True))

    def current_key(self, req: Request, queued_key: tuple) -> tuple:
        """Re-evaluate a queued key (for policies whose keys grow while queued)."""
        return queued_key

    def pop(self, fits: Fits) -> Request | None:
        skipped: list[tuple[tuple, int, Request]] = []
        found: Request | None = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            key, _, req = entry
            if self._live.get(id(req)) != key:
                continue  # removed or re-queued under another key
            now_key = self.current_key(req, key)
            if now_key != key:
                self._insert(req, now_key)
                continue
            if fits(req):
                del self._live[id(req)]
                found = req
                break
            skipped.append(entry)
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found

    def remove(self, req: Request) -> bool:
        found = self._live.pop(id(req), None) is not None
        if found:
            self._compact()  # a queue nobody pops (no manager) must not keep dead entries forever
        return found

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Request]:
        live = self._live
        entries = sorted((e for e in self._heap if live.get(id(e[2])) == e[0]), key=lambda e: (e[0], e[1]))
        return iter([e[2] for e in entries])

    def _compact(self) -> None:
        if len(self._heap) > 2 * len(self._live) + 64:
            live = self._live
            self._heap = [e for e in self._heap if live.get(id(e[2])) == e[0]]
            heapq.heapify(self._heap)


class FifoPolicy(_HeapPolicy):
    """Arrival order; a request that comes back (its manager died) keeps its place."""

    name = "fifo"

    def key(self, req: Request, requeued: bool) -> tuple:
        return (req.arrival,)


class RoundRobinPolicy(_HeapPolicy):
    """Time slices; a preempted request goes to the tail of the queue."""

    name = "rr"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self._ticket = itertools.count()

    def key(self, req: Request, requeued: bool) -> tuple:
        return (next(self._ticket),)

    def slice_tokens(self, req: Request) -> int | None:
        return self.config.time_slice_tokens


class LeastAttainedServicePolicy(_HeapPolicy):
    """Least attained service per agent, weighted; ties by arrival."""

    name = "las"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.attained: dict[str, float] = defaultdict(float)

    def _share(self, agent: str) -> float:
        return self.attained[agent] / max(self.config.weights.get(agent, 1.0), 1e-9)

    def key(self, req: Request, requeued: bool) -> tuple:
        return (self._share(req.agent), req.arrival)

    def current_key(self, req: Request, queued_key: tuple) -> tuple:
        return (self._share(req.agent), req.arrival)

    def slice_tokens(self, req: Request) -> int | None:
        return self.config.time_slice_tokens

    def charge(self, req: Request, run_s: float, tokens: int) -> None:
        # Tokens are the unit LLM cores report; other managers are charged by time.
        self.attained[req.agent] += tokens if tokens else run_s * 1000.0


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (FifoPolicy, RoundRobinPolicy, LeastAttainedServicePolicy)}


def make_policy(config: SchedulerConfig) -> Policy:
    try:
        return POLICIES[config.policy](config)
    except KeyError:
        raise ValueError(f"unknown scheduling policy {config.policy!r}; choose one of {sorted(POLICIES)}") from None
