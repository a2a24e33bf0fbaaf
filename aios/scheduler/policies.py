"""Scheduling policies: small objects that order a service's ready queue.

A policy never touches sockets. The scheduler core pushes arrivals, asks for
the next request that fits a free manager, re-queues preempted requests, and
reports how much service each run consumed. Preemption happens only for ops
their manager declares preemptible (LLM generation): the policy's
`slice_tokens` tells the manager how many tokens to produce before yielding.

Policies:
- `fifo`: arrival order, run to completion.
- `rr`: round robin; each run gets `time_slice_tokens`, then goes to the tail.
- `las`: least attained service per agent (as in Autellix's PLAS): the agent
  that has received the least service so far goes next, with a time slice, so
  short interactive calls pass long generations, and a chatty agent cannot
  starve the others. `[scheduler] weights` gives agents weighted shares
  (attained service is divided by the weight: weighted fair share).

Placement classes. Whether a queued request can run now depends only on
where it may go: its target (the model or tool it names) and its affinity
(the manager holding its saved context). Requests are kept in one sub-queue
per placement class, and `pop(fits)` asks `fits` about classes, not
requests: a saturated tool's deep queue is passed over in one step, and
every operation costs O(log n) in the number of queued requests (measured
before this design: 10,000 queued requests from one agent made `las` spend
the scheduler's whole CPU re-ordering, and kernel.ping took 0.2-3.5 s).
"""
from __future__ import annotations

import abc
import heapq
import itertools
from collections import defaultdict
from typing import Any, Callable, ClassVar, Iterator

from aios.scheduler.options import SchedulerConfig
from aios.scheduler.request import Job

Placement = tuple[Any, Any]  # (target, affinity): str | None, bytes | None
FitsClass = Callable[[Placement], bool]


def placement(req: Job) -> Placement:
    return (req.target, req.affinity)


class Policy(abc.ABC):
    name: ClassVar[str]

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def push(self, req: Job) -> None:
        """A new arrival."""

    def requeue(self, req: Job) -> None:
        """A request coming back: preempted, or its manager died."""
        self.push(req)

    @abc.abstractmethod
    def pop(self, fits: FitsClass) -> Job | None:
        """Remove and return the next request whose placement class `fits`, or None."""

    @abc.abstractmethod
    def remove(self, req: Job) -> bool:
        """Take a queued request out (deadline passed, agent gone)."""

    @abc.abstractmethod
    def reaffine(self, affinity: bytes) -> list[Job]:
        """Requests waiting for the manager `affinity` lose it (that manager died): they keep
        their place in the order but may now run anywhere. Returns them."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Job]:
        """Queued requests in the order the policy would run them now (for status and tests; O(n log n))."""

    def slice_tokens(self, req: Job) -> int | None:
        """Tokens the next run may produce before yielding; None runs to completion."""
        return None

    def charge(self, req: Job, run_s: float, tokens: int) -> None:
        """Account for service a request just received."""

    def stats(self) -> dict[str, Any]:
        """What the policy keeps that an operator may want to see (for `kernel.status`)."""
        return {}


class _Entry:
    """A queued request's slot: `token` must match the request's queue_token to be live."""

    __slots__ = ("key", "token", "req")

    def __init__(self, key: tuple, token: int, req: Job) -> None:
        self.key, self.token, self.req = key, token, req

    def __lt__(self, other: "_Entry") -> bool:
        return self.key < other.key

    @property
    def live(self) -> bool:
        return self.req.queue_token == self.token


_tokens = itertools.count(1)


def _enter(req: Job) -> int:
    req.queue_token = next(_tokens)
    return req.queue_token


class _HeapPolicy(Policy):
    """One heap per placement class, keyed by a static per-request key; lazy deletion."""

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self._heaps: dict[Placement, list[_Entry]] = defaultdict(list)
        self._keys: dict[Job, tuple] = {}  # live requests -> the key they are queued under
        self._stale = 0

    @abc.abstractmethod
    def key(self, req: Job, requeued: bool) -> tuple:
        """The request's position; must end in something unique per request (e.g. its arrival)."""

    def _insert(self, req: Job, key: tuple) -> None:
        if req in self._keys:
            self._drop(req)
        self._keys[req] = key
        heapq.heappush(self._heaps[placement(req)], _Entry(key, _enter(req), req))

    def push(self, req: Job) -> None:
        self._insert(req, self.key(req, requeued=False))

    def requeue(self, req: Job) -> None:
        self._insert(req, self.key(req, requeued=True))

    def _drop(self, req: Job) -> None:
        del self._keys[req]
        req.queue_token = 0
        self._stale += 1

    def _head(self, heap: list[_Entry]) -> _Entry | None:
        while heap and not heap[0].live:
            heapq.heappop(heap)
            self._stale -= 1
        return heap[0] if heap else None

    def pop(self, fits: FitsClass) -> Job | None:
        best: _Entry | None = None
        best_heap: list[_Entry] | None = None
        for cls, heap in list(self._heaps.items()):
            head = self._head(heap)
            if head is None:
                del self._heaps[cls]
                continue
            if (best is None or head.key < best.key) and fits(cls):
                best, best_heap = head, heap
        if best is None or best_heap is None:
            return None
        heapq.heappop(best_heap)
        del self._keys[best.req]
        best.req.queue_token = 0
        return best.req

    def remove(self, req: Job) -> bool:
        if req not in self._keys:
            return False
        self._drop(req)
        self._compact()
        return True

    def reaffine(self, affinity: bytes) -> list[Job]:
        moved = [r for cls, heap in self._heaps.items() if cls[1] == affinity for e in heap if e.live
                 for r in (e.req,)]
        for r in moved:
            key = self._keys[r]
            self._drop(r)
            r.affinity = None
            self._insert(r, key)
        self._compact()
        return moved

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[Job]:
        return iter(sorted(self._keys, key=self._keys.__getitem__))

    def _compact(self) -> None:
        """Dead entries wait in the heaps until popped; rebuild when they outnumber the live ones."""
        if self._stale > len(self._keys) + 64:
            for cls in list(self._heaps):
                heap = [e for e in self._heaps[cls] if e.live]
                if heap:
                    heapq.heapify(heap)
                    self._heaps[cls] = heap
                else:
                    del self._heaps[cls]
            self._stale = 0


class FifoPolicy(_HeapPolicy):
    """Arrival order; a request that comes back (its manager died) keeps its place."""

    name = "fifo"

    def key(self, req: Job, requeued: bool) -> tuple:
        return (req.arrival,)


class RoundRobinPolicy(_HeapPolicy):
    """Time slices; a preempted request goes to the tail of the queue."""

    name = "rr"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self._ticket = itertools.count()

    def key(self, req: Job, requeued: bool) -> tuple:
        return (next(self._ticket),)

    def slice_tokens(self, req: Job) -> int | None:
        return self.config.time_slice_tokens


class LeastAttainedServicePolicy(Policy):
    """Least attained service per agent, weighted; ties (and one agent's own requests) by arrival.

    Two levels, so that charging an agent never re-sorts its queued requests:
    per placement class, each agent has a heap of its requests by arrival, and
    the class has a heap of agents keyed by (share, arrival of the agent's
    first request). `_announced` holds each agent's valid entry; an entry that
    no longer matches it (the agent was charged, or its head left) is
    discarded when it reaches the top, so every operation is O(log n).
    """

    name = "las"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.attained: dict[str, float] = defaultdict(float)
        # class -> agent -> heap of _Entry keyed (arrival,)
        self._agents: dict[Placement, dict[str, list[_Entry]]] = defaultdict(dict)
        # class -> heap of (share, head arrival, agent); (class, agent) -> the valid (share, arrival)
        self._order: dict[Placement, list[tuple[float, int, str]]] = defaultdict(list)
        self._announced: dict[tuple[Placement, str], tuple[float, int]] = {}
        self._live: set[Job] = set()
        self._stale = 0

    def _share(self, agent: str) -> float:
        return self.attained.get(agent, 0.0) / max(self.config.weights.get(agent, 1.0), 1e-9)

    def _agent_head(self, heap: list[_Entry]) -> _Entry | None:
        while heap and not heap[0].live:
            heapq.heappop(heap)
            self._stale -= 1
        return heap[0] if heap else None

    def _announce(self, cls: Placement, agent: str) -> None:
        """Make the agent's entry in its class's order match its current share and head."""
        heap = self._agents[cls].get(agent)
        head = self._agent_head(heap) if heap is not None else None
        if head is None:
            if self._announced.pop((cls, agent), None) is not None:
                self._stale += 1
            if heap is not None:
                del self._agents[cls][agent]
            return
        entry = (self._share(agent), head.req.arrival)
        old = self._announced.get((cls, agent))
        if old == entry:
            return
        if old is not None:
            self._stale += 1  # the old entry is superseded; discarded when it surfaces
        self._announced[(cls, agent)] = entry
        heapq.heappush(self._order[cls], (entry[0], entry[1], agent))

    def push(self, req: Job) -> None:
        if req in self._live:
            self.remove(req)
        cls = placement(req)
        heap = self._agents[cls].setdefault(req.agent, [])
        heapq.heappush(heap, _Entry((req.arrival,), _enter(req), req))
        self._live.add(req)
        self._announce(cls, req.agent)

    def _best(self, cls: Placement) -> tuple[tuple[float, int], _Entry] | None:
        """The class's next request; superseded entries are dropped on the way."""
        order = self._order.get(cls)
        agents = self._agents.get(cls)
        while order:
            share, arrival, agent = order[0]
            if self._announced.get((cls, agent)) != (share, arrival):
                heapq.heappop(order)
                self._stale = max(self._stale - 1, 0)
                continue
            heap = agents.get(agent) if agents else None
            head = self._agent_head(heap) if heap is not None else None
            if head is None or head.req.arrival != arrival:
                self._announce(cls, agent)  # its head left (removed): re-enter with the new one
                continue
            return (share, arrival), head
        return None

    def pop(self, fits: FitsClass) -> Job | None:
        best: tuple[tuple[float, int], _Entry, Placement] | None = None
        for cls in list(self._order):
            found = self._best(cls)
            if found is None:
                del self._order[cls]
                self._agents.pop(cls, None)
                continue
            if (best is None or found[0] < best[0]) and fits(cls):
                best = (found[0], found[1], cls)
        if best is None:
            return None
        _, entry, cls = best
        req = entry.req
        heapq.heappop(self._agents[cls][req.agent])
        req.queue_token = 0
        self._live.discard(req)
        self._announce(cls, req.agent)
        return req

    def remove(self, req: Job) -> bool:
        if req not in self._live:
            return False
        self._live.discard(req)
        req.queue_token = 0
        self._stale += 1
        if self._stale > len(self._live) + 64:
            self._compact()
        return True

    def reaffine(self, affinity: bytes) -> list[Job]:
        moved = [e.req for cls, agents in self._agents.items() if cls[1] == affinity
                 for heap in agents.values() for e in heap if e.live]
        for r in moved:
            self.remove(r)
            r.affinity = None
            self.push(r)
        return moved

    def _compact(self) -> None:
        self._order.clear()
        self._announced.clear()
        for cls in list(self._agents):
            agents = self._agents[cls]
            for agent in list(agents):
                heap = [e for e in agents[agent] if e.live]
                if heap:
                    heapq.heapify(heap)
                    agents[agent] = heap
                else:
                    del agents[agent]
            for agent in list(agents):
                self._announce(cls, agent)
            if not agents:
                del self._agents[cls]
        self._stale = 0

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Job]:
        return iter(sorted(self._live, key=lambda r: (self._share(r.agent), r.arrival)))

    def slice_tokens(self, req: Job) -> int | None:
        return self.config.time_slice_tokens

    def stats(self) -> dict[str, Any]:
        top = sorted(self.attained.items(), key=lambda kv: -kv[1])[:50]
        return {"attained": {agent: round(units, 3) for agent, units in top}}

    def charge(self, req: Job, run_s: float, tokens: int) -> None:
        # Tokens are the unit LLM cores report; other managers are charged by time (1 ms = 1 token).
        self.attained[req.agent] += tokens if tokens else run_s * 1000.0
        for cls, agents in self._agents.items():
            if req.agent in agents:
                self._announce(cls, req.agent)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (FifoPolicy, RoundRobinPolicy, LeastAttainedServicePolicy)}


def make_policy(config: SchedulerConfig) -> Policy:
    try:
        return POLICIES[config.policy](config)
    except KeyError:
        raise ValueError(f"unknown scheduling policy {config.policy!r}; choose one of {sorted(POLICIES)}") from None
