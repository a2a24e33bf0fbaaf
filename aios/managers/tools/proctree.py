"""The processes of one tool call: find them, weigh them, end them.

Stdlib-only, like jail.py: the tool manager imports it, and a worker (worker.py)
loads it by file path, so both sides end a call's processes the same way.

A call's processes are the worker's descendants. The worker keeps them in its
tree: it is pid 1 of its pid namespace where the sandbox has one, else a child
subreaper (`become_subreaper`), so a process that daemonizes (double fork, new
session) is re-parented to the worker, never to the host's init, and stays
findable through /proc/<pid>/task/<tid>/children.

Ending a tree that may still fork: every process found is stopped (SIGSTOP)
before the tree is read again, until a read finds nothing new; only then is
everything killed. A stopped process cannot fork, so nothing escapes between
reading and killing.
"""
from __future__ import annotations

import ctypes
import os
import signal
import time

PR_SET_CHILD_SUBREAPER = 36
PAGE = os.sysconf("SC_PAGE_SIZE")
#: rounds of "read the tree, stop what is new" before giving up on a tree that keeps growing
MAX_STOP_ROUNDS = 64


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def children(pid: int) -> list[int]:
    """The live (or zombie) children of `pid`, from every one of its threads; [] when it is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out: list[int] = []
    for tid in tasks:
        try:
            out.extend(int(x) for x in _read(f"/proc/{pid}/task/{tid}/children").split())
        except OSError:
            continue
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (not `pid` itself), parents before their children."""
    found: list[int] = []
    todo = children(pid)
    seen = set(todo)
    while todo:
        p = todo.pop()
        found.append(p)
        for c in children(p):
            if c not in seen:
                seen.add(c)
                todo.append(c)
    return found


def anon_bytes(pid: int) -> int:
    """Resident memory of `pid` that is not file-backed (statm: resident - shared), 0 when gone.

    Cheaper to read than a proportional figure (smaps_rollup costs milliseconds per process); pages a
    fork shares copy-on-write are counted in each process, so a sum errs toward more, never less."""
    try:
        fields = _read(f"/proc/{pid}/statm").split()
        return max(0, int(fields[1]) - int(fields[2])) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def kill_tree(root: int, include_root: bool = True) -> list[int]:
    """SIGKILL `root`'s descendants (and `root` when include_root), stopping them all first; the pids hit."""
    stopped: list[int] = []
    known: set[int] = set()
    try:
        if include_root and _signal(root, signal.SIGSTOP):
            stopped.append(root)
            known.add(root)
        for _ in range(MAX_STOP_ROUNDS):
            new = [p for p in descendants(root) if p not in known]
            if not new:
                break
            for p in new:
                known.add(p)
                if _signal(p, signal.SIGSTOP):
                    stopped.append(p)
    finally:
        for p in stopped:
            _signal(p, signal.SIGKILL)
    return stopped


def _state(pid: int) -> str:
    """The one-letter state of `pid` ("" when gone): Z and X mean it holds nothing any more."""
    try:
        stat = _read(f"/proc/{pid}/stat")
        return stat[stat.rindex(b")") + 2:][:1].decode()
    except (OSError, ValueError):
        return ""


def wait_gone(pids: list[int], timeout_s: float = 5.0) -> list[int]:
    """Wait until each pid has exited (gone or a zombie); the ones still running at the deadline."""
    until = time.monotonic() + timeout_s
    left = list(pids)
    while left:
        left = [p for p in left if _state(p) not in ("", "Z", "X")]
        if not left or time.monotonic() >= until:
            break
        time.sleep(0.002)
    return left


# ------------------------------------------------------------- worker side
def become_subreaper() -> None:
    """Orphans of the worker's calls are re-parented to the worker, so they stay in its tree."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _reap() -> bool:
    """Collect exited children without blocking; True when the worker has no child at all."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return False


def end_call_processes(timeout_s: float = 5.0) -> str:
    """In the worker, after a call: end every process the call left. "none", "ended" or "unreachable".

    pid 1 of a pid namespace: kill(-1) reaches every other process of the namespace (and only it).
    A subreaper that sees /proc: its descendants, stopped then killed. A worker that sees neither
    (a mount namespace hides /proc and there is no pid namespace) says "unreachable", and the
    manager ends the tree from outside. One waitpid() when the call left nothing: a warm call pays ~µs.
    """
    if _reap():
        return "none"
    me = os.getpid()
    if me != 1 and not os.path.isdir(f"/proc/{me}/task"):
        return "unreachable"
    until = time.monotonic() + timeout_s
    while time.monotonic() < until:
        if me == 1:
            _signal(-1, signal.SIGKILL)
        else:
            kill_tree(me, include_root=False)
        for _ in range(50):
            if _reap():
                return "ended"
            time.sleep(0.002)
    return "unreachable"
