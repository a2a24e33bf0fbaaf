"""Which managers are registered, what each may run, and how much it is running.

Pure bookkeeping for the scheduler core (no sockets). A manager's free
capacity follows what it really runs: `capacity` minus the larger of the
requests the scheduler has in flight on it and the number the manager last
reported busy. The second term matters after a scheduler restart, when a
manager re-registers while still finishing requests the new scheduler never
saw; its replies then report the work draining away and the credit comes
back, instead of being lost for good.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

from aios.messages import OpInfo, Ready
from aios.scheduler.request import Request


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
    health: str
    detail: str
    last_seen: float
    last_sent: float
    reported_busy: int = 0
    inflight: dict[tuple[bytes, str], Request] = field(default_factory=dict)
    per_target: Counter[str] = field(default_factory=Counter)
    completed: int = 0

    @classmethod
    def from_ready(cls, identity: bytes, msg: Ready, now: float) -> "ManagerRecord":
        return cls(identity=identity, name=msg.name, service=msg.service, capacity=msg.capacity,
                   incarnation=msg.incarnation, pid=msg.pid, ops=dict(msg.ops), targets=frozenset(msg.targets),
                   default=msg.default, limits=dict(msg.limits), health=msg.health, detail=msg.detail,
                   last_seen=now, last_sent=now, reported_busy=msg.busy)

    @property
    def busy(self) -> int:
        return max(len(self.inflight), self.reported_busy)

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
            return self.default or not only_default
        if target not in self.targets:
            return False
        limit = self.limits.get(target)
        return limit is None or self.per_target[target] < limit

    def add(self, req: Request) -> None:
        self.inflight[req.key] = req
        if req.target is not None:
            self.per_target[req.target] += 1

    def discard(self, req: Request) -> bool:
        if self.inflight.pop(req.key, None) is None:
            return False
        if req.target is not None:
            self.per_target[req.target] -= 1
            if self.per_target[req.target] <= 0:
                del self.per_target[req.target]
        return True

    def row(self, now: float) -> dict[str, Any]:
        return {"name": self.name, "service": self.service, "pid": self.pid, "incarnation": self.incarnation,
                "capacity": self.capacity, "busy": self.busy, "targets": sorted(self.targets),
                "default": self.default, "limits": dict(self.limits), "running": dict(self.per_target),
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
        one, even when only others are free: another model is not the same service."""
        only_default = any(m.default for m in managers)
        best: ManagerRecord | None = None
        for m in managers:
            if m.can_run(target, affinity, only_default) and (best is None or m.free > best.free):
                best = m
        return best
