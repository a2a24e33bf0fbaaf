"""Isolated execution of subprocess tools: one worker process, from spawn to its last call.

One call of a subprocess tool runs in a worker process (worker.py) confined by
jail.py, as isolation.py planned it. The manager side here

- spawns workers (plain Popen, new session; no preexec_fn, since the tool
  manager is multi-threaded) and puts each under its per-call limits
  (call_limits.py) before it runs any tool code;
- waits for a reply with the call's deadline and cancellation (poll(2): no
  descriptor-number limit), killing the worker's whole process tree when either
  fires, and turns every way a worker can fail into a clear OpError (raised,
  crashed, exited, killed by a signal, out of memory, over its per-call limit,
  result too large);
- ends a worker by killing its tree at once: an idle worker holds no call, so
  there is nothing to wait for, and ending must keep up with eviction.

Warm workers are kept for reuse by worker_pool.py.
"""
from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from aios.managers.base import OpError
from aios.managers.tools import worker as wire
from aios.managers.tools.call_limits import CallLimits, LimitHandle
from aios.managers.tools.isolation import WORKER_SCRIPT, kill_group, worker_env
from aios.managers.tools.registry import RegisteredTool
from aios.protocol import ErrorCode

log = logging.getLogger("aios.tools")

#: how long a new worker may take to confine itself and import its tool before it counts as broken
#: (measured cold start here: about 40-60 ms; generous for a loaded 2-core machine)
READY_TIMEOUT_S = 15.0
STDERR_TAIL_BYTES = 2000
#: a warm worker is replaced after this many calls (bounds slow leaks in a tool's own state)
MAX_CALLS_PER_WORKER = 1000
_HEADER = struct.Struct(">I")


class Worker:
    """One worker process serving one tool (for one agent, when reused)."""

    def __init__(self, spec: RegisteredTool, agent: str, jail: dict[str, Any] | None, rlimits: dict[str, Any],
                 max_result_bytes: int, scratch_root: str | Callable[[], str], cpu_budget_s: int,
                 limits: CallLimits) -> None:
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
        self._poll = select.poll()
        self._poll.register(self._out, select.POLLIN)
        try:  # before the spec is sent: until then the worker only waits to read it, and has not forked
            self.limit: LimitHandle = limits.admit(spec.name, self.proc.pid, spec.memory_mb,
                                                   bool(jail and jail.get("pid")))
        except OSError as exc:
            kill_group(self.proc)
            self.proc.wait()
            self._release_files()
            raise OpError(ErrorCode.UNAVAILABLE, f"tool {spec.name!r}: cannot put its worker under the per-call "
                                                 f"limits ({limits.method}): {exc}") from None
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
            if not self._poll.poll(max(0.0, wait) * 1000):
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
             cancelled: threading.Event | None, budget_s: float | None = None) -> Any:
        """Run one call within timeout_s (what is left of the call's budget_s once a worker was found);
        on any failure the worker is marked broken (killed) and OpError raised."""
        self.calls += 1
        try:
            self._stderr_mark = os.fstat(self._stderr.fileno()).st_size
        except ValueError:
            raise OpError(ErrorCode.SHUTTING_DOWN, "the tool runtime is closing") from None
        deadline = time.monotonic() + timeout_s
        self.limit.begin_call()
        try:
            if not self.isolation:
                self.wait_ready(deadline, cancelled)
            wire.write_frame(self._in, {"args": args, "settings": settings, "timeout_s": timeout_s})
            reply = self._read_reply(deadline, cancelled, self.max_result_bytes + 4096)
        except _TimedOut:
            self.kill()
            raise OpError(ErrorCode.DEADLINE_EXCEEDED,
                          f"tool {self.spec.name!r} did not finish within {budget_s or timeout_s:.3g} s and was killed "
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
        finally:
            self.limit.end_call()
        if reply.get("strays"):
            self.kill()  # the call left processes the worker could not reach (no pid namespace, /proc hidden)
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

    def _limit_message(self) -> str:
        """The per-call limit's own account when it ended the call, else the per-process one."""
        return self.limit.limit_error() or self._memory_message()

    def _tool_error(self, err: dict[str, Any]) -> tuple[ErrorCode, str]:
        name = self.spec.name
        kind = err.get("kind")
        if kind == "memory":
            return ErrorCode.QUOTA_EXCEEDED, self._limit_message()
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
        self.limit.end_call()  # before the reap: from then on its pid may name another process
        try:
            code = self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        self.broken = True
        over = self.limit.limit_error()
        if over:
            return ErrorCode.QUOTA_EXCEEDED, over
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
        """End the worker and every process of its call (its tree, or its cgroup), now."""
        self.broken = True
        if self.proc.returncode is None:
            self.limit.kill()
        kill_group(self.proc)

    def close(self) -> None:
        """End the worker (its whole tree, at once), reap it and release its files. Idempotent.

        No grace period: a worker is closed only when idle (its call, and the call's processes, are over)
        or broken. Waiting for it to exit on EOF cost up to 0.5 s per worker, and one closing thread then
        fell behind eviction: 30 agents left hundreds of workers alive (issue 17)."""
        if self._closed:
            return
        self._closed = True
        self.kill()
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            log.warning("tool worker %d (%s) did not exit after SIGKILL", self.proc.pid, self.spec.name)
        self.limit.release()
        self._release_files()

    def _release_files(self) -> None:
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
