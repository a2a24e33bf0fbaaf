"""Limits on a tool call as a whole, not on each of its processes.

A tool's `memory_mb` is also each process's RLIMIT_AS (jail.py), but rlimits
count per process: a call that forks 30 children each under the limit would
hold 30 times it. So each worker (one call at a time) also gets a limit on the
sum, by one of two methods, chosen once at start and shown by `aios status -v`:

- cgroup v2, where the machine delegates the memory and pids controllers to the
  tool manager's cgroup: one child cgroup per worker with memory.max (the
  tool's memory_mb), memory.swap.max 0 and pids.max (tools `nproc`); the kernel
  enforces them, memory.events tells an out-of-memory kill, cgroup.kill ends
  everything in it.
- process-tree accounting otherwise (and on these machines, whose memory
  controller is under cgroup v1): a monitor thread sums the resident memory of
  each busy worker's tree every `INTERVAL_S` and kills the tree when the sum
  passes the limit or it holds more than `nproc` processes. It errs toward
  stopping a call: pages shared copy-on-write after a fork count in each process.

Either way the worker is killed as a whole (`LimitHandle.kill`), and the call
fails with QUOTA_EXCEEDED naming the limit.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from aios.managers.tools import proctree

log = logging.getLogger("aios.tools")

#: how often the tree-accounting monitor weighs each busy worker's tree (a fork bomb is also held
#: back between two looks by RLIMIT_AS and RLIMIT_NPROC on each process)
INTERVAL_S = 0.1
CONTROLLERS = ("memory", "pids")


def _quota_message(tool: str, memory_mb: int, how: str) -> str:
    return f"tool {tool!r} exceeded its memory limit of {memory_mb} MB per call ({how}; manifest memory_mb)"


class LimitHandle:
    """The per-call limits of one worker: ended as a whole by `kill`, asked `exceeded` after a death."""

    def __init__(self, tool: str, root_pid: int, memory_mb: int | None, nproc: int) -> None:
        self.tool = tool
        self.root_pid = root_pid
        self.memory_mb = memory_mb
        self.nproc = nproc
        self.exceeded: str | None = None  # why the limit ended the call, once it did

    def begin_call(self) -> None:
        """The worker is about to run a call (the monitor weighs only busy workers)."""

    def end_call(self) -> None:
        """The call is over."""

    def kill(self) -> None:
        """End every process of the worker, the worker too (stopped first, so none can fork away)."""
        hit = proctree.kill_tree(self.root_pid, include_root=True)
        proctree.wait_gone(hit)

    def limit_error(self) -> str | None:
        """The message naming the limit, when the limit is what ended the worker."""
        return self.exceeded

    def release(self) -> None:
        """The worker has been reaped: drop what the limit held."""


# --------------------------------------------------------- tree accounting
class _TreeHandle(LimitHandle):
    def __init__(self, monitor: "TreeAccounting", tool: str, root_pid: int, memory_mb: int | None, nproc: int,
                 pid_namespace: bool) -> None:
        super().__init__(tool, root_pid, memory_mb, nproc)
        self.monitor = monitor
        self.pid_namespace = pid_namespace

    def call_root(self) -> int | None:
        """The worker proper: in a pid namespace, the one child of the waiting outer process (read each
        time, never cached: once it is gone its pid may name another process)."""
        if not self.pid_namespace:
            return self.root_pid
        kids = proctree.children(self.root_pid)
        return kids[0] if len(kids) == 1 else None

    def begin_call(self) -> None:
        self.monitor.watch(self)

    def end_call(self) -> None:
        self.monitor.unwatch(self)

    def weigh(self) -> None:
        """Kill the worker when its call's processes together pass a limit; single processes are
        left to their own RLIMIT_AS."""
        root = self.call_root()
        if root is None or self.exceeded:
            return
        below = proctree.descendants(root)
        if not below:
            return
        procs = [root, *below]
        if len(procs) > self.nproc:
            self.exceeded = (f"tool {self.tool!r} exceeded its limit of {self.nproc} processes per call "
                             f"(tools nproc)")
        elif self.memory_mb:
            total = sum(proctree.anon_bytes(p) for p in procs)
            if total > self.memory_mb << 20:
                self.exceeded = _quota_message(self.tool, self.memory_mb,
                                               f"its {len(procs)} processes held {total >> 20} MB together")
        if self.exceeded:
            log.warning("%s; killing its worker", self.exceeded)
            self.kill()


class TreeAccounting:
    """The fallback: a thread that weighs each busy worker's process tree every INTERVAL_S."""

    method = "process-tree accounting"

    def __init__(self, nproc: int, reason: str, interval_s: float = INTERVAL_S) -> None:
        self.nproc = nproc
        self.reason = reason
        self.interval_s = interval_s
        self._watched: set[_TreeHandle] = set()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="tool-call-limits", daemon=True)
        self._thread.start()

    def summary(self) -> str:
        return (f"memory per call by process-tree accounting every {self.interval_s:g} s "
                f"(no cgroup v2: {self.reason})")

    def admit(self, tool: str, pid: int, memory_mb: int | None, pid_namespace: bool) -> LimitHandle:
        return _TreeHandle(self, tool, pid, memory_mb, self.nproc, pid_namespace)

    def watch(self, handle: _TreeHandle) -> None:
        with self._cond:
            self._watched.add(handle)
            self._cond.notify()

    def unwatch(self, handle: _TreeHandle) -> None:
        with self._cond:
            self._watched.discard(handle)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._watched and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                self._cond.wait(self.interval_s)
                busy = list(self._watched)
            for handle in busy:
                try:
                    handle.weigh()
                except Exception:  # noqa: BLE001 - one worker's tree must not stop the monitor
                    log.exception("weighing the processes of a %s call", handle.tool)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)


# ------------------------------------------------------------------ cgroup v2
class _CgroupHandle(LimitHandle):
    def __init__(self, path: Path, tool: str, root_pid: int, memory_mb: int | None, nproc: int) -> None:
        super().__init__(tool, root_pid, memory_mb, nproc)
        self.path = path

    def kill(self) -> None:
        try:
            (self.path / "cgroup.kill").write_text("1")
        except OSError:  # before Linux 5.14: by the tree
            super().kill()

    def limit_error(self) -> str | None:
        if self.exceeded is None and self.memory_mb and _events(self.path / "memory.events").get("oom_kill", 0):
            self.exceeded = _quota_message(self.tool, self.memory_mb, "cgroup v2 memory.max")
        return self.exceeded

    def release(self) -> None:
        """Remove the cgroup once the processes killed in it have left (rmdir fails while it is populated)."""
        until = time.monotonic() + 2.0
        while _events(self.path / "cgroup.events").get("populated") and time.monotonic() < until:
            time.sleep(0.002)
        try:
            self.path.rmdir()
        except OSError as exc:
            log.warning("cannot remove the cgroup %s of a %s worker: %s", self.path, self.tool, exc.strerror)


def _events(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if line.strip())}
    except (OSError, ValueError):
        return {}


class CgroupLimits:
    """memory.max and pids.max per worker, in a cgroup v2 subtree this tool manager creates."""

    method = "cgroup v2"

    def __init__(self, parent: Path, nproc: int) -> None:
        self.parent = parent
        self.nproc = nproc
        self._n = 0
        self._lock = threading.Lock()

    def summary(self) -> str:
        return f"memory and processes per call by cgroup v2 (memory.max, pids.max under {self.parent})"

    def admit(self, tool: str, pid: int, memory_mb: int | None, pid_namespace: bool) -> LimitHandle:
        """Put a new worker (not yet told its tool, so it has not forked) into a cgroup of its own."""
        with self._lock:
            self._n += 1
            path = self.parent / f"w{self._n}"
        path.mkdir()
        if memory_mb:
            (path / "memory.max").write_text(str(memory_mb << 20))
            swap = path / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
        (path / "pids.max").write_text(str(self.nproc))
        (path / "cgroup.procs").write_text(str(pid))
        return _CgroupHandle(path, tool, pid, memory_mb, self.nproc)

    def close(self) -> None:
        try:
            self.parent.rmdir()
        except OSError:
            pass


# ------------------------------------------------------------------ detection
@dataclass
class CgroupProbe:
    """Where this process sits in cgroup v2, read from /proc (paths injectable for tests)."""

    mountinfo: str = "/proc/self/mountinfo"
    cgroup: str = "/proc/self/cgroup"

    def v2_mount(self) -> Path | None:
        try:
            lines = Path(self.mountinfo).read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            left, _, right = line.partition(" - ")
            if right.split(" ", 1)[0] == "cgroup2":
                return Path(left.split()[4])
        return None

    def own_paths(self) -> tuple[str | None, bool]:
        """Our cgroup v2 path ("0::/path"), and whether a cgroup v1 hierarchy holds the memory controller."""
        v2, v1_memory = None, False
        try:
            lines = Path(self.cgroup).read_text().splitlines()
        except OSError:
            return None, False
        for line in lines:
            hid, controllers, path = (line.split(":", 2) + ["", ""])[:3]
            if hid == "0" and controllers == "":
                v2 = path
            elif "memory" in controllers.split(","):
                v1_memory = True
        return v2, v1_memory


def _tokens(path: Path) -> set[str]:
    try:
        return {t.lstrip("+") for t in path.read_text().split()}
    except OSError:
        return set()


def detect_call_limits(nproc: int, probe: CgroupProbe | None = None) -> CgroupLimits | TreeAccounting:
    """cgroup v2 when our cgroup can hand the memory and pids controllers to a child, else the tree."""
    cgroups, reason = cgroup_parent(probe or CgroupProbe())
    if cgroups is not None:
        return CgroupLimits(cgroups, nproc)
    return TreeAccounting(nproc, reason)


def cgroup_parent(probe: CgroupProbe) -> tuple[Path | None, str]:
    """Create the cgroup under which each worker gets its own; (None, why not) when it cannot."""
    mount = probe.v2_mount()
    own, v1_memory = probe.own_paths()
    if mount is None or own is None:
        return None, "no cgroup v2 hierarchy mounted"
    base = mount / own.lstrip("/")
    missing = [c for c in CONTROLLERS if c not in _tokens(base / "cgroup.controllers")]
    if missing:
        where = "; memory is under cgroup v1 here" if v1_memory and "memory" in missing else ""
        return None, f"the cgroup v2 hierarchy at {mount} has no {' or '.join(missing)} controller{where}"
    if not os.access(base, os.W_OK):
        return None, f"{base} is not writable by the tool manager (no delegated cgroup)"
    enabled = _tokens(base / "cgroup.subtree_control")
    try:
        if not set(CONTROLLERS) <= enabled:
            (base / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))
        parent = base / f"aios-tools-{os.getpid()}"
        parent.mkdir(exist_ok=True)
        (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))
    except OSError as exc:
        why = ("it holds processes, so it cannot delegate controllers" if exc.errno == errno.EBUSY
               else exc.strerror)
        return None, f"cannot delegate memory and pids under {base}: {why}"
    return parent, ""


CallLimits = CgroupLimits | TreeAccounting
