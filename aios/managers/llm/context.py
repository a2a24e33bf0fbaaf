"""The context manager: where preempted generations wait for their next slice.

When a slice runs out, the core asks its backend to `suspend` the generation
(for llama.cpp: copy the sequence's KV state out of the model context) and
hands the `Generation` object here. Snapshots stay in RAM up to
`ram_budget_bytes`; beyond it the least recently stored ones are pickled to
files in the run directory, up to `disk_budget_bytes`. `put` refuses a
snapshot that fits in neither, and the core then simply keeps running that
generation instead of preempting it, so a budget is never exceeded.

A snapshot leaves the store when its request resumes (`take`), or is dropped
when its request completes, fails, is cancelled or its agent disconnects.

The RAM budget is shared with the backend's prefix cache: `reserve(n)` sets
aside n bytes of it for that cache (the snapshots get the rest), and
`stats(extra)` reports both.  The store is thread-safe: a core that runs
several generations at once calls it from several handler threads.
"""
from __future__ import annotations

import logging
import pickle
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aios.managers.llm.types import Generation

log = logging.getLogger("aios.llm.context")


@dataclass
class _Spilled:
    path: Path
    size: int


class ContextStore:
    def __init__(self, ram_budget_bytes: int, disk_budget_bytes: int, spill_dir: Path) -> None:
        self.ram_budget = ram_budget_bytes  # for snapshots: the RAM budget minus what is reserved
        self.reserved = 0
        self.disk_budget = disk_budget_bytes
        self.spill_dir = spill_dir
        # Snapshots of a previous incarnation of this core are useless: start clean.
        shutil.rmtree(spill_dir, ignore_errors=True)
        spill_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._ram: OrderedDict[str, tuple[Generation, int]] = OrderedDict()
        self._disk: dict[str, _Spilled] = {}
        self.ram_bytes = 0
        self.disk_bytes = 0
        self.spills = 0
        self.peak_ram_bytes = 0
        self._lock = threading.RLock()

    def reserve(self, nbytes: int) -> None:
        """Set aside `nbytes` of the RAM budget for another user (the backend's prefix cache)."""
        with self._lock:
            nbytes = max(0, min(nbytes, self.ram_budget + self.reserved))
            self.ram_budget += self.reserved - nbytes
            self.reserved = nbytes

    def __contains__(self, key: str) -> bool:
        return key in self._ram or key in self._disk

    def __len__(self) -> int:
        return len(self._ram) + len(self._disk)

    def put(self, key: str, gen: Generation) -> bool:
        """Keep a suspended generation; False if no budget can hold it."""
        with self._lock:
            return self._put(key, gen)

    def _put(self, key: str, gen: Generation) -> bool:
        self.drop(key)
        size = gen.snapshot_bytes()
        while self._ram and self.ram_bytes + size > self.ram_budget:
            old_key, (old_gen, old_size) = next(iter(self._ram.items()))
            if not self._spill(old_key, old_gen, old_size):
                break
        if self.ram_bytes + size <= self.ram_budget:
            self._ram[key] = (gen, size)
            self.ram_bytes += size
            self.peak_ram_bytes = max(self.peak_ram_bytes, self.ram_bytes)
            return True
        return self._spill(key, gen, size)

    def _spill(self, key: str, gen: Generation, size: int) -> bool:
        if self.disk_bytes + size > self.disk_budget:
            return False
        path = self.spill_dir / f"{abs(hash(key)):x}-{self.spills}.ctx"
        try:
            data = pickle.dumps(gen, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            log.warning("cannot spill a generation to disk: %s", exc)
            return False
        path.write_bytes(data)
        if key in self._ram:
            self._ram.pop(key)
            self.ram_bytes -= size
        self._disk[key] = _Spilled(path, len(data))
        self.disk_bytes += len(data)
        self.spills += 1
        return True

    def take(self, key: str) -> Generation | None:
        """Remove and return a stored generation (loading it from disk if it was spilled)."""
        with self._lock:
            return self._take(key)

    def _take(self, key: str) -> Generation | None:
        if key in self._ram:
            gen, size = self._ram.pop(key)
            self.ram_bytes -= size
            return gen
        spilled = self._disk.pop(key, None)
        if spilled is None:
            return None
        self.disk_bytes -= spilled.size
        try:
            gen = pickle.loads(spilled.path.read_bytes())
        finally:
            spilled.path.unlink(missing_ok=True)
        return gen

    def drop(self, key: str) -> Generation | None:
        """Forget a generation for good; returns it so its backend can release it."""
        return self.take(key)

    def stats(self, prefix_cache: dict[str, Any] | None = None) -> dict[str, Any]:
        """The store's figures; with the backend's prefix-cache figures, those too (its bytes
        count against the reserved part of the RAM budget)."""
        with self._lock:
            out: dict[str, Any] = {
                "snapshots": len(self), "in_ram": len(self._ram), "on_disk": len(self._disk),
                "ram_bytes": self.ram_bytes, "disk_bytes": self.disk_bytes, "spills": self.spills,
                "ram_budget_bytes": self.ram_budget, "disk_budget_bytes": self.disk_budget,
                "peak_ram_bytes": self.peak_ram_bytes, "reserved_bytes": self.reserved}
        if prefix_cache is not None:
            out["prefix_cache"] = prefix_cache
            out["total_ram_bytes"] = out["ram_bytes"] + int(prefix_cache.get("bytes", 0))
        return out

    def clear(self) -> None:
        with self._lock:
            for key in list(self._ram) + list(self._disk):
                self.drop(key)
