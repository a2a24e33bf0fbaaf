"""Warm tool workers for reuse, keyed by (tool, agent), and the bound on all workers.

A worker is never shared between agents, so module-level state in a tool
cannot carry one agent's data to another.  Tools whose manifest says
`reuse = false` (python) get a fresh worker, with fresh namespaces and a fresh
/tmp, for every call.  Idle workers are closed after `idle_s`, the least
recently used first when more than `max_idle` wait; ending a worker happens on
a background thread, off the caller's path.

`max_workers` bounds every worker process the pool has started and not yet
reaped: busy, idle and being closed. At the bound a call takes the place of the
least recently used idle worker (evicted, its end awaited), or waits within its
deadline for a busy one to come back. Closing kills at once (sandbox.Worker.close),
so it keeps up with eviction.
"""
from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
import time
from collections import OrderedDict

from aios.managers.base import OpError
from aios.managers.tools.call_limits import CallLimits
from aios.managers.tools.isolation import JailPlanner
from aios.managers.tools.registry import RegisteredTool
from aios.managers.tools.sandbox import Worker
from aios.protocol import ErrorCode

log = logging.getLogger("aios.tools")


class WorkerPool:
    """Warm workers, idle ones keyed by (tool, agent); the least recently used go first."""

    def __init__(self, planner: JailPlanner, max_idle: int, idle_s: float, max_result_bytes: int,
                 max_workers: int, limits: CallLimits) -> None:
        self.planner = planner
        self.max_idle = max_idle
        self.idle_s = idle_s
        self.max_result_bytes = max_result_bytes
        self.max_workers = max_workers
        self.limits = limits
        self._scratch_root: str | None = None
        self._idle: OrderedDict[tuple[str, str], list[Worker]] = OrderedDict()
        self._lock = threading.Condition()  # notified when a worker goes idle or is reaped
        self._busy: set[Worker] = set()
        self._live = 0  # started and not yet reaped: busy + idle + queued to close + closing
        self._closed = False
        self._stop = threading.Event()
        self.stats = {"cold": 0, "warm": 0, "evicted": 0}
        # Ending a worker (kill its tree, reap it, release its files) takes about a millisecond: done off the caller's path
        self._to_close: queue.SimpleQueue[Worker | None] = queue.SimpleQueue()
        self._closer = threading.Thread(target=self._close_loop, name="tool-worker-closer", daemon=True)
        self._closer.start()
        self._janitor = threading.Thread(target=self._sweep_loop, name="tool-worker-janitor", daemon=True)
        self._janitor.start()

    def _close_loop(self) -> None:
        while True:
            w = self._to_close.get()
            if w is None:
                return
            try:
                w.close()
            except Exception:  # noqa: BLE001 - never let one worker stop the closing of others
                log.exception("closing tool worker %s", w.proc.pid)
            with self._lock:
                self._live -= 1
                self._lock.notify_all()

    def _new_worker(self, spec: RegisteredTool, agent: str) -> Worker:
        # RLIMIT_CPU is a backstop for the whole life of a (possibly warm) worker; the wall-clock
        # timeout of each call is what normally stops a tool.
        cpu_budget = int(max(60, 4 * spec.timeout_s))
        jail = self.planner.spec(spec, cpu_s=cpu_budget, memory_mb=spec.memory_mb, network=spec.network)
        rlimits = {"memory_mb": spec.memory_mb, "cpu_s": cpu_budget, "fsize_mb": self.planner.scratch_mb}
        return Worker(spec, agent, jail, rlimits, self.max_result_bytes, lambda: self.scratch_root, cpu_budget,
                      self.limits)

    @property
    def scratch_root(self) -> str:
        """Host directory for workers' scratch dirs, created only when a worker runs without the
        mount namespace (a confined worker's scratch is a tmpfs that vanishes with it)."""
        with self._lock:
            if self._scratch_root is None:
                self._scratch_root = tempfile.mkdtemp(prefix="aios-tools-")
            return self._scratch_root

    def remove_scratch(self) -> None:
        if self._scratch_root is not None:
            shutil.rmtree(self._scratch_root, ignore_errors=True)

    def acquire(self, spec: RegisteredTool, agent: str, deadline: float | None = None,
                cancelled: threading.Event | None = None) -> Worker:
        """A warm worker of this (tool, agent), else a new one once the bound allows it."""
        key = (spec.name, agent)
        with self._lock:
            while True:
                if self._closed:
                    raise OpError(ErrorCode.SHUTTING_DOWN, "the tool runtime is closing")
                warm = self._take_idle(key)
                if warm is not None:
                    self._busy.add(warm)
                    self.stats["warm"] += 1
                    return warm
                if self._live < self.max_workers:
                    self._live += 1
                    break
                victim = self._oldest_idle()
                if victim is not None:
                    self._to_close.put(victim)  # its place is ours once it is reaped (notified)
                    self.stats["evicted"] += 1
                self._wait_for_room(spec, deadline, cancelled)
        try:
            w = self._new_worker(spec, agent)
        except BaseException:
            with self._lock:
                self._live -= 1
                self._lock.notify_all()
            raise
        with self._lock:
            self._busy.add(w)
            self.stats["cold"] += 1
        return w

    def _take_idle(self, key: tuple[str, str]) -> Worker | None:
        workers = self._idle.get(key)
        while workers:
            w = workers.pop()
            if not workers:
                self._idle.pop(key, None)
            if w.alive:
                return w
            self._discard(w)
            workers = self._idle.get(key)
        return None

    def _oldest_idle(self) -> Worker | None:
        if not self._idle:
            return None
        key, workers = next(iter(self._idle.items()))
        w = workers.pop(0)
        if not workers:
            self._idle.pop(key)
        return w

    def _wait_for_room(self, spec: RegisteredTool, deadline: float | None, cancelled: threading.Event | None) -> None:
        """Wait (the lock held by the caller) for a worker to be reaped or to go idle."""
        wait = None if deadline is None else deadline - time.monotonic()
        if wait is not None and wait <= 0:
            raise OpError(ErrorCode.DEADLINE_EXCEEDED,
                          f"tool {spec.name!r}: no worker free before the call's deadline: all "
                          f"{self.max_workers} are busy (tools max_workers)")
        if cancelled is not None:
            if cancelled.is_set():
                raise OpError(ErrorCode.CANCELLED, f"tool {spec.name!r}: call cancelled while waiting for a worker")
            wait = 0.05 if wait is None else min(wait, 0.05)
        self._lock.wait(wait)

    def release(self, w: Worker) -> None:
        with self._lock:
            self._busy.discard(w)
            if self._closed or not w.reusable():
                keep = False
            else:
                self._idle.setdefault((w.spec.name, w.agent), []).append(w)
                self._idle.move_to_end((w.spec.name, w.agent))
                keep = True
            evicted = self._evict_over_limit() if keep else []
            if keep:
                self._lock.notify_all()
        if not keep:
            self._to_close.put(w)
        for e in evicted:
            self._to_close.put(e)

    def _count_idle(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def _evict_over_limit(self) -> list[Worker]:
        out = []
        while self._count_idle() > self.max_idle and self._idle:
            key, workers = next(iter(self._idle.items()))
            out.append(workers.pop(0))
            if not workers:
                self._idle.pop(key)
        return out

    def _discard(self, w: Worker) -> None:
        self._to_close.put(w)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(min(5.0, max(0.1, self.idle_s / 2))):
            self.sweep()

    def sweep(self) -> None:
        """Close idle workers unused for idle_s, and any that died while idle."""
        now = time.monotonic()
        stale = []
        with self._lock:
            for key in list(self._idle):
                keep = []
                for w in self._idle[key]:
                    (stale if (now - w.last_used > self.idle_s or not w.alive) else keep).append(w)
                if keep:
                    self._idle[key] = keep
                else:
                    self._idle.pop(key)
        for w in stale:
            self._to_close.put(w)

    def live_count(self) -> int:
        """Worker processes started and not yet reaped (what max_workers bounds)."""
        with self._lock:
            return self._live

    def idle_count(self, tool: str | None = None, agent: str | None = None) -> int:
        with self._lock:
            return sum(len(v) for (t, a), v in self._idle.items()
                       if (tool is None or t == tool) and (agent is None or a == agent))

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._closed = True
            workers = [w for v in self._idle.values() for w in v] + list(self._busy)
            self._idle.clear()
            self._lock.notify_all()
        for w in workers:
            w.kill()
        self._to_close.put(None)
        self._closer.join(timeout=30.0)  # finish the closes already queued
        for w in workers:
            w.close()
        self._janitor.join(timeout=5.0)
