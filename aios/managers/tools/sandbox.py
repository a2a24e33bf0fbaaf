"""Isolated execution of subprocess tools: isolation detection, worker processes, warm reuse.

One call of a subprocess tool runs in a worker process (worker.py) confined by
jail.py. The manager side here

- detects once, at start, which confinement this machine allows (by running a
  probe worker that tries it and checks the properties themselves: loopback
  unreachable, scratch writable), and says so in one log line;
- spawns workers (plain Popen, new session so the whole process group can be
  killed; no preexec_fn, since the tool manager is multi-threaded);
- waits for a reply with the call's deadline and cancellation, killing the
  process group when either fires, and turns every way a worker can fail into a
  clear OpError (raised, crashed, exited, killed by a signal, out of memory,
  result too large);
- keeps warm workers for reuse, keyed by (tool, agent): a worker is never
  shared between agents, so module-level state in a tool cannot carry one
  agent's data to another. Tools whose manifest says `reuse = false` (python)
  get a fresh worker, with fresh namespaces and a fresh /tmp, for every call.
"""
from __future__ import annotations

import logging
import os
import queue
import select
import shutil
import signal
import site
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from aios.managers.base import OpError
from aios.managers.tools import worker as wire
from aios.managers.tools.registry import RegisteredTool
from aios.protocol import ErrorCode

log = logging.getLogger("aios.tools")

WORKER_SCRIPT = Path(wire.__file__).resolve()
WORKER_DIR = WORKER_SCRIPT.parent
#: how long a new worker may take to confine itself and import its tool before it counts as broken
#: (measured cold start here: about 40-60 ms; generous for a loaded 2-core machine)
READY_TIMEOUT_S = 15.0
STDERR_TAIL_BYTES = 2000
#: a warm worker is replaced after this many calls (bounds slow leaks in a tool's own state)
MAX_CALLS_PER_WORKER = 1000
_HEADER = struct.Struct(">I")


# ------------------------------------------------------------------ isolation
@dataclass
class Isolation:
    """What confinement this machine gives tool workers (detected once at start)."""

    mode: Literal["auto", "require", "off"]
    strategy: Literal["root", "userns", "none"]
    net: bool = False
    fs: bool = False
    pid: bool = False
    drop: bool = False
    user: str = "unchanged"
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.net and self.fs and self.pid and self.drop

    def summary(self, scratch_mb: int) -> str:
        if self.mode == "off":
            return "tool isolation OFF (config sandbox = 'off'): workers run with rlimits only, with the " \
                   "kernel's network, files and privileges"
        parts = ["network namespace (no network)" if self.net else "NO network namespace: tools can reach the network",
                 f"read-only filesystem, private {scratch_mb} MB /tmp, run directory and home hidden" if self.fs
                 else "NO mount namespace: tools see and can write the kernel's files",
                 "pid namespace" if self.pid else "no pid namespace",
                 f"runs as {self.user}" if self.drop else "privileges NOT dropped",
                 "rlimits AS/CPU/NPROC/FSIZE"]
        head = "tool isolation: " if self.complete else "tool isolation REDUCED: "
        tail = f" ({'; '.join(self.problems)})" if self.problems else ""
        return head + ", ".join(parts) + tail

    def for_tool(self, spec: RegisteredTool) -> str:
        if spec.kind == "builtin":
            return "none: runs inside the tool manager (allowed for shipped tools only)"
        if spec.kind == "mcp":
            jailed = not spec.network and self.mode != "off" and (self.net or self.fs)
            memory = f", memory {spec.memory_mb} MB" if spec.memory_mb else ""
            where = "in the tool sandbox" if jailed else "with the kernel user's rights"
            return f"MCP server process {where}{memory}, timeout {spec.timeout_s:g} s"
        if self.mode == "off":
            return f"rlimits only (sandbox = 'off'), memory {spec.memory_mb} MB, timeout {spec.timeout_s:g} s"
        bits = []
        if spec.network:
            bits.append("host network (manifest network = true)")
        elif self.net:
            bits.append("no network")
        bits.append("read-only fs + private /tmp" if self.fs else "host filesystem")
        if self.pid:
            bits.append("pid namespace")
        if self.drop:
            bits.append(self.user)
        bits.append(f"memory {spec.memory_mb} MB, timeout {spec.timeout_s:g} s")
        return ", ".join(bits)


def keep_paths(extra: list[Path] = ()) -> list[str]:
    """Directories a confined worker must still see: the Python installation and our code."""
    paths = {sys.base_prefix, sys.prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
             str(WORKER_DIR)}
    for p in site.getsitepackages() + [p for p in sys.path if p and p.endswith("-packages")]:
        paths.add(p)
    paths.update(str(p) for p in extra)
    return sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)})


def untraversable_ancestors(paths: list[str]) -> list[str]:
    """The outermost directory on each path that 'other' users (nobody) cannot enter."""
    found = set()
    for p in paths:
        parts = Path(p).parts
        for i in range(2, len(parts) + 1):
            ancestor = str(Path(*parts[:i]))
            try:
                if not os.stat(ancestor).st_mode & 0o001:
                    found.add(ancestor)
                    break
            except OSError:
                break
    return sorted(found)


class JailPlanner:
    """Builds the jail spec (worker.py/jail.py) for a tool from the detected isolation and options."""

    def __init__(self, isolation: Isolation, hide_paths: list[str], scratch_mb: int, nproc: int) -> None:
        self.isolation = isolation
        self.hide_paths = [os.path.realpath(p) for p in hide_paths]
        self.scratch_mb = scratch_mb
        self.nproc = nproc

    def masks(self, keep: list[str]) -> list[str]:
        masks = set(self.hide_paths)
        home = os.path.realpath(os.path.expanduser("~"))
        if home != "/":
            masks.add(home)
        if self.isolation.strategy == "root" and self.isolation.drop:
            masks.update(untraversable_ancestors(keep))
        return sorted(masks)

    def spec(self, tool: RegisteredTool | None, cpu_s: int, memory_mb: int | None,
             network: bool = False) -> dict[str, Any] | None:
        iso = self.isolation
        if iso.mode == "off" or iso.strategy == "none" or not (iso.net or iso.fs or iso.pid):
            return None
        keep = keep_paths([tool.folder] if tool is not None and tool.folder else [])
        return {
            "strategy": iso.strategy, "net": iso.net and not network, "fs": iso.fs, "pid": iso.pid,
            "drop": iso.drop, "masks": self.masks(keep) if iso.fs else [], "keep": keep,
            "scratch_mb": self.scratch_mb, "memory_mb": memory_mb, "cpu_s": cpu_s,
            "nproc": self.nproc, "fsize_mb": self.scratch_mb,
        }


def _run_probe(spec: dict[str, Any], timeout: float = 20.0) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, "-I", str(WORKER_SCRIPT), "probe"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env=worker_env())
    try:
        out, err = proc.communicate(wire.encode_frame(spec), timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(proc)
        proc.communicate()
        return {"ok": False, "step": "probe", "message": f"probe did not answer within {timeout:g} s"}
    if len(out) < 4:
        return {"ok": False, "step": "probe", "message": f"probe exited {proc.returncode}: {err.decode(errors='replace')[-300:]}"}
    import json
    return json.loads(out[4:4 + _HEADER.unpack(out[:4])[0]])


def detect_isolation(mode: Literal["auto", "require", "off"], hide_paths: list[str], scratch_mb: int,
                     nproc: int, strategy: Literal["auto", "root", "userns"] = "auto") -> Isolation:
    """Try the strongest confinement first and step down; each try is a real worker that checks itself.

    strategy: "root" (namespaces, then setuid nobody) when the kernel runs as root, else
    "userns" (a user namespace, then every capability dropped); "auto" picks by euid.
    """
    if mode == "off":
        return Isolation(mode=mode, strategy="none")
    if not sys.platform.startswith("linux"):
        return Isolation(mode=mode, strategy="none", problems=["not Linux: rlimits only"])
    if strategy == "auto":
        strategy = "root" if os.geteuid() == 0 else "userns"
    elif strategy == "root" and os.geteuid() != 0:
        return Isolation(mode=mode, strategy="none", problems=["sandbox_strategy 'root' needs the kernel to run as root"])
    problems: list[str] = []
    for net, fs, pid, drop in ((True, True, True, True), (True, True, False, True), (True, False, False, False)):
        iso = Isolation(mode=mode, strategy=strategy, net=net, fs=fs, pid=pid, drop=drop)
        planner = JailPlanner(iso, hide_paths, scratch_mb, nproc)
        spec = planner.spec(None, cpu_s=10, memory_mb=None)
        assert spec is not None
        reply = _run_probe(spec)
        if not reply.get("ok"):
            problems.append(f"{'+'.join(k for k, v in (('net', net), ('fs', fs), ('pid', pid)) if v)} failed at "
                            f"{reply.get('step')}: {reply.get('message')}")
            continue
        report, checks = reply["report"], reply["report"].get("checks", {})
        if net and checks.get("loopback_reachable"):
            problems.append("network namespace did not cut 127.0.0.1")
            continue
        if fs and not checks.get("scratch_writable"):
            problems.append("private /tmp was not writable")
            continue
        iso.user = report.get("user", "unchanged")
        iso.problems = problems if not iso.complete else []
        return iso
    return Isolation(mode=mode, strategy="none", problems=problems)


def worker_env() -> dict[str, str]:
    """A small, fixed environment: nothing of the kernel's (keys, tokens, proxies) leaks to tools."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}


def _killpg(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------- worker
class Worker:
    """One worker process serving one tool (for one agent, when reused)."""

    def __init__(self, spec: RegisteredTool, agent: str, jail: dict[str, Any] | None, rlimits: dict[str, Any],
                 max_result_bytes: int, scratch_root: str | Callable[[], str], cpu_budget_s: int) -> None:
        self.spec = spec
        self.agent = agent
        self.max_result_bytes = max_result_bytes
        self.cpu_budget_s = cpu_budget_s
        self.fsize_mb = int(rlimits.get("fsize_mb") or 0)
        self.calls = 0
        self.cpu_used = 0.0
        self.isolation: dict[str, Any] = {}
        self.last_used = time.monotonic()
        self.broken = False
        self._closed = False
        self.work_dir: str | None = None
        if jail is None or not jail.get("fs"):
            self.work_dir = tempfile.mkdtemp(prefix=f"aios-tool-{spec.name}-",
                                             dir=scratch_root() if callable(scratch_root) else scratch_root)
        fd, path = tempfile.mkstemp(prefix="aios-tool-stderr-")
        os.close(fd)
        self._stderr = open(path, "a+b")  # O_APPEND: the worker's writes always land at the end
        os.unlink(path)
        self._stderr_mark = 0
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(WORKER_SCRIPT), "serve", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, close_fds=True,
            start_new_session=True, env=worker_env(), cwd=self.work_dir or "/")
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        os.set_blocking(self._out, False)
        wire.write_frame(self._in, {
            "tool": {"name": spec.name, "dir": str(spec.folder), "entry": spec.entry},
            "jail": jail, "rlimits": rlimits, "work_dir": self.work_dir, "max_result_bytes": max_result_bytes,
        })

    # ------------------------------------------------------------ reading
    def _read_reply(self, deadline: float | None, cancelled: threading.Event | None, limit: int) -> Any:
        buf = bytearray()
        need = _HEADER.size
        length: int | None = None
        while True:
            if cancelled is not None and cancelled.is_set():
                raise _Cancelled()
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise _TimedOut()
            wait = 0.05 if cancelled is not None else 1.0
            if deadline is not None:
                wait = min(wait, deadline - now)
            ready, _, _ = select.select([self._out], [], [], max(0.0, wait))
            if not ready:
                continue
            try:
                chunk = os.read(self._out, min(need - len(buf), 1 << 20))
            except BlockingIOError:
                continue
            if not chunk:
                raise _Exited()
            buf += chunk
            if len(buf) < need:
                continue
            if length is None:
                (length,) = _HEADER.unpack(buf)
                if length > limit:
                    raise _Oversized(length)
                buf.clear()
                need = length
                if length == 0:
                    raise _Exited()
                continue
            import json
            try:
                return json.loads(bytes(buf))
            except ValueError:
                raise _Exited() from None

    def stderr_tail(self) -> str:
        try:
            size = os.fstat(self._stderr.fileno()).st_size
            start = max(self._stderr_mark, size - STDERR_TAIL_BYTES)
            data = os.pread(self._stderr.fileno(), size - start, start)
        except (OSError, ValueError):  # closed by a concurrent shutdown
            return ""
        return data.decode(errors="replace").strip()

    def wait_ready(self, deadline: float | None, cancelled: threading.Event | None) -> dict[str, Any]:
        ready_deadline = time.monotonic() + READY_TIMEOUT_S
        if deadline is not None:
            ready_deadline = min(ready_deadline, deadline)
        try:
            reply = self._read_reply(ready_deadline, cancelled, 1 << 20)
        except _TimedOut:
            self.kill()
            if deadline is not None and time.monotonic() >= deadline:
                raise
            raise OpError(ErrorCode.BACKEND_ERROR, f"tool {self.spec.name!r}: its worker did not start within "
                                                   f"{READY_TIMEOUT_S:g} s{self._tail_note()}") from None
        except _Exited:
            raise OpError(*self._death_error("while starting")) from None
        if not reply.get("ready"):
            self.kill()
            raise OpError(*self._load_error(reply.get("error") or {}))
        self.isolation = reply.get("isolation") or {}
        self.cold_ms = (time.perf_counter() - self.started) * 1000
        return reply

    # -------------------------------------------------------------- calls
    def call(self, args: dict[str, Any], settings: dict[str, Any], timeout_s: float,
             cancelled: threading.Event | None) -> Any:
        """Run one call; on any failure the worker is marked broken (killed) and OpError raised."""
        self.calls += 1
        try:
            self._stderr_mark = os.fstat(self._stderr.fileno()).st_size
        except ValueError:
            raise OpError(ErrorCode.SHUTTING_DOWN, "the tool runtime is closing") from None
        deadline = time.monotonic() + timeout_s
        try:
            if not self.isolation:
                self.wait_ready(deadline, cancelled)
            wire.write_frame(self._in, {"args": args, "settings": settings, "timeout_s": timeout_s})
            reply = self._read_reply(deadline, cancelled, self.max_result_bytes + 4096)
        except _TimedOut:
            self.kill()
            raise OpError(ErrorCode.DEADLINE_EXCEEDED,
                          f"tool {self.spec.name!r} did not finish within {timeout_s:.3g} s and was killed "
                          f"(its manifest timeout_s is {self.spec.timeout_s:g}){self._tail_note()}") from None
        except _Cancelled:
            self.kill()
            raise OpError(ErrorCode.CANCELLED, f"tool {self.spec.name!r}: call cancelled; its worker was killed") from None
        except _Oversized as exc:
            self.kill()
            raise OpError(ErrorCode.TOO_LARGE, f"tool {self.spec.name!r}: reply of {exc.size} bytes exceeds the "
                                               f"result limit of {self.max_result_bytes} bytes (tools max_result_bytes)") from None
        except (_Exited, BrokenPipeError):
            raise OpError(*self._death_error("before replying")) from None
        self.last_used = time.monotonic()
        self.cpu_used = float(reply.get("cpu_s") or 0.0)
        if reply.get("ok"):
            return reply.get("result")
        err = reply.get("error") or {}
        if err.get("kind") in ("memory", "protocol"):
            self.kill()  # a MemoryError may leave the interpreter half-broken: never reuse it
        raise OpError(*self._tool_error(err))

    # ------------------------------------------------------------- errors
    def _tail_note(self) -> str:
        tail = self.stderr_tail()
        return f"; stderr: {tail[-800:]}" if tail else ""

    def _memory_message(self) -> str:
        return (f"tool {self.spec.name!r} exceeded its memory limit of {self.spec.memory_mb} MB "
                f"(manifest memory_mb)")

    def _tool_error(self, err: dict[str, Any]) -> tuple[ErrorCode, str]:
        name = self.spec.name
        kind = err.get("kind")
        if kind == "memory":
            return ErrorCode.QUOTA_EXCEEDED, self._memory_message()
        if kind == "too_large":
            return ErrorCode.TOO_LARGE, (f"tool {name!r}: {err.get('message')} (tools max_result_bytes)")
        if kind == "bad_result":
            return ErrorCode.BACKEND_ERROR, f"tool {name!r}: {err.get('message')}"
        code = err.get("code")
        if code in ErrorCode.__members__ and code not in ("INTERNAL", "MANAGER_DIED", "BAD_SIGNATURE", "BAD_FRAME"):
            return ErrorCode(code), f"tool {name!r}: {err.get('message')}"
        tb = err.get("traceback", "").strip().splitlines()
        where = f" ({tb[-3].strip()})" if len(tb) >= 3 and tb[-3].strip().startswith("File") else ""
        return ErrorCode.BACKEND_ERROR, f"tool {name!r} raised {err.get('type')}: {err.get('message')}{where}"

    def _load_error(self, err: dict[str, Any]) -> tuple[ErrorCode, str]:
        name = self.spec.name
        if err.get("kind") == "jail":
            return ErrorCode.DENIED, (f"tool {name!r}: its sandbox could not be set up ({err.get('message')}); "
                                      f"the call was refused rather than run unconfined")
        message = str(err.get("message", ""))
        if err.get("kind") == "memory" or "failed to map segment" in message or "Cannot allocate memory" in message:
            return ErrorCode.QUOTA_EXCEEDED, self._memory_message() + f" while loading its code ({message[:200]})"
        return ErrorCode.BACKEND_ERROR, (f"tool {name!r} failed to load its code ({self.spec.entry}): "
                                         f"{err.get('type')}: {err.get('message')}")

    def _death_error(self, when: str) -> tuple[ErrorCode, str]:
        try:
            code = self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        self.broken = True
        tail = self.stderr_tail()
        name = self.spec.name
        memoryish = any(s in tail for s in ("MemoryError", "Cannot allocate memory", "bad_alloc", "out of memory"))
        if memoryish:
            return ErrorCode.QUOTA_EXCEEDED, self._memory_message() + f" and died {when}"
        note = f"; stderr: {tail[-800:]}" if tail else ""
        if code < 0:
            sig = -code
            if sig == signal.SIGXCPU:
                return ErrorCode.QUOTA_EXCEEDED, f"tool {name!r} used up its CPU-time limit and was killed{note}"
            if sig == signal.SIGXFSZ:
                return ErrorCode.QUOTA_EXCEEDED, (f"tool {name!r} wrote a file (or stderr) past its size limit of "
                                                  f"{self.fsize_mb} MB (tools scratch_mb) and was killed")
            try:
                signame = signal.Signals(sig).name
            except ValueError:
                signame = f"signal {sig}"
            return ErrorCode.BACKEND_ERROR, f"tool {name!r} crashed {when}: killed by {signame}{note}"
        return ErrorCode.BACKEND_ERROR, f"tool {name!r} exited {when} with status {code}{note}"

    # ---------------------------------------------------------- lifecycle
    @property
    def alive(self) -> bool:
        return not self.broken and self.proc.poll() is None

    def reusable(self) -> bool:
        """Reuse only while far from the lifetime CPU limit, so a warm worker never dies of it mid-call."""
        return (self.alive and self.spec.reuse and self.calls < MAX_CALLS_PER_WORKER
                and self.cpu_used < self.cpu_budget_s / 2)

    def kill(self) -> None:
        self.broken = True
        _killpg(self.proc)

    def close(self) -> None:
        """End the worker (EOF first, then SIGKILL to its group) and release its files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(timeout=0.5)
            except (subprocess.TimeoutExpired, OSError):
                pass
        _killpg(self.proc)
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            log.warning("tool worker %d (%s) did not exit after SIGKILL", self.proc.pid, self.spec.name)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self._stderr.close()
        if self.work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


class _TimedOut(Exception):
    pass


class _Cancelled(Exception):
    pass


class _Exited(Exception):
    pass


class _Oversized(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


# ----------------------------------------------------------------------- pool
class WorkerPool:
    """Warm workers, idle ones keyed by (tool, agent); the least recently used go first."""

    def __init__(self, planner: JailPlanner, max_idle: int, idle_s: float, max_result_bytes: int) -> None:
        self.planner = planner
        self.max_idle = max_idle
        self.idle_s = idle_s
        self.max_result_bytes = max_result_bytes
        self._scratch_root: str | None = None
        self._idle: OrderedDict[tuple[str, str], list[Worker]] = OrderedDict()
        self._lock = threading.Lock()
        self._busy: set[Worker] = set()
        self._closed = False
        self._stop = threading.Event()
        self.stats = {"cold": 0, "warm": 0}
        # Ending a worker (EOF, wait, SIGKILL, reap) takes milliseconds: done off the caller's path
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

    def _new_worker(self, spec: RegisteredTool, agent: str) -> Worker:
        # RLIMIT_CPU is a backstop for the whole life of a (possibly warm) worker; the wall-clock
        # timeout of each call is what normally stops a tool.
        cpu_budget = int(max(60, 4 * spec.timeout_s))
        jail = self.planner.spec(spec, cpu_s=cpu_budget, memory_mb=spec.memory_mb, network=spec.network)
        rlimits = {"memory_mb": spec.memory_mb, "cpu_s": cpu_budget, "fsize_mb": self.planner.scratch_mb}
        return Worker(spec, agent, jail, rlimits, self.max_result_bytes, lambda: self.scratch_root, cpu_budget)

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

    def acquire(self, spec: RegisteredTool, agent: str) -> Worker:
        key = (spec.name, agent)
        with self._lock:
            if self._closed:
                raise OpError(ErrorCode.SHUTTING_DOWN, "the tool runtime is closing")
            workers = self._idle.get(key)
            while workers:
                w = workers.pop()
                if not workers:
                    self._idle.pop(key, None)
                if w.alive:
                    self._busy.add(w)
                    self.stats["warm"] += 1
                    return w
                self._discard(w)
                workers = self._idle.get(key)
        w = self._new_worker(spec, agent)
        with self._lock:
            self._busy.add(w)
            self.stats["cold"] += 1
        return w

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
        for w in workers:
            w.kill()
        self._to_close.put(None)
        self._closer.join(timeout=30.0)  # finish the closes already queued
        for w in workers:
            w.close()
        self._janitor.join(timeout=5.0)
