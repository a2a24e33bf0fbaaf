"""Which managers are registered, what each may run, and how much it is running.

Pure bookkeeping for the scheduler core (no sockets). A manager's free
capacity follows what it really runs: `capacity` minus the requests the
scheduler has in flight on it, minus its *ghosts*: requests the manager is
still running that the scheduler no longer tracks. Ghosts are handlers that
were cancelled (deadline, caller gone) but have not returned yet, and, after
a scheduler restart, work the new scheduler never saw. The manager's READY
and heartbeats list what it runs; whatever on that list the scheduler is not
tracking is a ghost until a later report (or its late reply) shows it gone.
So no capacity is lost after a restart, and none is double-booked while a
cancelled handler winds down, per target limits included.

A ghost this scheduler did not cancel is work from before its restart: when
the caller re-sends that request, the scheduler adopts the run (`adopt`)
instead of dispatching a copy (`aios.scheduler.adoption`).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

from aios.messages import OpInfo, Ready, RunningEntry
from aios.scheduler.request import Job


@dataclass(slots=True, eq=False)
class ManagerRecord:
    identity: bytes
    name: str
    service: str
    capacity: int
    incarnation: str
    pid: int
    ops: dict[str, OpInfo]
    targets: frozenset[str]
    default: bool
    limits: dict[str, int]
    idempotent_targets: frozenset[str]
    health: str
    detail: str
    last_seen: float
    last_sent: float
    inflight: dict[tuple[bytes, str], Job] = field(default_factory=dict)
    ghosts: dict[tuple[bytes, str], str | None] = field(default_factory=dict)  # key -> target
    cancelled: set[tuple[bytes, str]] = field(default_factory=set)  # ghosts this scheduler cancelled
    per_target: Counter[str] = field(default_factory=Counter)  # in flight and ghosts
    completed: int = 0

    @classmethod
    def from_ready(cls, identity: bytes, msg: Ready, now: float) -> "ManagerRecord":
        rec = cls(identity=identity, name=msg.name, service=msg.service, capacity=msg.capacity,
                  incarnation=msg.incarnation, pid=msg.pid, ops=dict(msg.ops), targets=frozenset(msg.targets),
                  default=msg.default, limits=dict(msg.limits), idempotent_targets=frozenset(msg.idempotent_targets),
                  health=msg.health, detail=msg.detail,
                  last_seen=now, last_sent=now)
        rec.report(msg.running)
        return rec

    @property
    def busy(self) -> int:
        return len(self.inflight) + len(self.ghosts)

    def report(self, running: list[RunningEntry]) -> bool:
        """The manager's list of what it runs: anything on it we do not track is a ghost.
        Returns whether capacity was freed."""
        before = len(self.ghosts)
        for target in self.ghosts.values():
            self._count(target, -1)
        self.ghosts = {(c, i): t for c, i, t in running if (c, i) not in self.inflight}
        for target in self.ghosts.values():
            self._count(target, +1)
        if self.cancelled:
            self.cancelled.intersection_update(self.ghosts)
        return len(self.ghosts) < before

    def ghost_gone(self, key: tuple[bytes, str]) -> bool:
        """A late reply: that handler has returned."""
        if key not in self.ghosts:
            return False
        self._count(self.ghosts.pop(key), -1)
        self.cancelled.discard(key)
        return True

    def adoptable(self, key: tuple[bytes, str]) -> bool:
        """Whether `key` runs here from before this scheduler started (a ghost it did not cancel)."""
        return key in self.ghosts and key not in self.cancelled

    def adopt(self, req: Job) -> None:
        """Track `req` as in flight here: it is the ghost of the same key, a run from before a restart."""
        self._count(self.ghosts.pop(req.key, None), -1)
        self.inflight[req.key] = req
        self._count(req.target, +1)

    def _count(self, target: str | None, delta: int) -> None:
        if target is not None:
            n = self.per_target[target] + delta
            if n > 0:
                self.per_target[target] = n
            else:
                self.per_target.pop(target, None)

    @property
    def free(self) -> int:
        return self.capacity - self.busy

    def can_run(self, target: str | None, affinity: bytes | None, only_default: bool) -> bool:
        """Whether a request of this placement may start here now."""
        if self.free <= 0:
            return False
        if affinity is not None and affinity != self.identity:
            return False
        if target is None:
            # A request naming no model goes to a default manager. One whose saved context is here
            # (affinity) resumes here even so: it may have started here while the default manager
            # was away (restarting), and no other manager can take it, so refusing it here would
            # strand it in the queue for good.
            return self.default or not only_default or affinity is not None
        if target not in self.targets:
            return False
        limit = self.limits.get(target)
        return limit is None or self.per_target[target] < limit

    def safe_to_repeat(self, op: str, target: str | None) -> bool:
        """Whether a request may run again after this manager died: its op says so, or its target does."""
        info = self.ops.get(op)
        return bool(info and info.idempotent) or (target is not None and target in self.idempotent_targets)

    def add(self, req: Job) -> None:
        self.inflight[req.key] = req
        self._count(req.target, +1)

    def discard(self, req: Job, still_running: bool = False) -> bool:
        """Stop tracking `req`. `still_running`: it was cancelled and its handler may not have
        returned yet, so it stays counted (a ghost) until the manager reports it gone."""
        if self.inflight.pop(req.key, None) is None:
            return False
        if still_running:
            self.ghosts[req.key] = req.target
            self.cancelled.add(req.key)
        else:
            self._count(req.target, -1)
        return True

    def row(self, now: float) -> dict[str, Any]:
        return {"name": self.name, "service": self.service, "pid": self.pid, "incarnation": self.incarnation,
                "capacity": self.capacity, "busy": self.busy, "targets": sorted(self.targets),
                "default": self.default, "limits": dict(self.limits), "running": dict(self.per_target),
                "finishing": len(self.ghosts),
                "ops": sorted(self.ops), "completed": self.completed, "health": self.health,
                "detail": self.detail, "last_seen_s": round(now - self.last_seen, 3)}


class ManagerRegistry:
    def __init__(self) -> None:
        self._by_id: dict[bytes, ManagerRecord] = {}
        self._by_service: dict[str, list[ManagerRecord]] = defaultdict(list)

    def get(self, identity: bytes) -> ManagerRecord | None:
        return self._by_id.get(identity)

    def add(self, rec: ManagerRecord) -> None:
        self._by_id[rec.identity] = rec
        self._by_service[rec.service].append(rec)

    def remove(self, rec: ManagerRecord) -> None:
        if self._by_id.get(rec.identity) is rec:
            del self._by_id[rec.identity]
        peers = self._by_service.get(rec.service)
        if peers is not None and rec in peers:
            peers.remove(rec)
            if not peers:
                del self._by_service[rec.service]

    def of(self, service: str) -> list[ManagerRecord]:
        return self._by_service.get(service, [])

    def by_name(self, name: str) -> ManagerRecord | None:
        return next((m for m in self._by_id.values() if m.name == name), None)

    def services(self) -> set[str]:
        return set(self._by_service)

    def __iter__(self) -> Iterator[ManagerRecord]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    @staticmethod
    def op_info(managers: list[ManagerRecord], op: str) -> OpInfo | None:
        for m in managers:
            info = m.ops.get(op)
            if info is not None:
                return info
        return None

    @staticmethod
    def pick(managers: list[ManagerRecord], target: str | None, affinity: bytes | None) -> ManagerRecord | None:
        """The manager with the most free capacity that may run a request of this placement now.

        A request that names no target goes to a default manager if the service has
        one, even when only others are free: another model is not the same service; except
        a request resuming where its saved context is (see `ManagerRecord.can_run`)."""
        only_default = any(m.default for m in managers)
        best: ManagerRecord | None = None
        for m in managers:
            if m.can_run(target, affinity, only_default) and (best is None or m.free > best.free):
                best = m
        return best
