"""Run a snippet with `python -I -c` as a child of the (already confined) worker.

The worker this runs in is the sandbox: network namespace, read-only filesystem
with a private tmpfs /tmp as working directory, pid namespace, uid nobody (or no
capabilities in a user namespace), RLIMIT_AS/CPU/NPROC/FSIZE; the snippet's
process inherits all of it. Running the snippet as a child rather than with
exec() in the worker keeps its output (including output written by C code or
subprocesses) apart from the worker's protocol, gives a real exit code, and lets
the tool stop the snippet at its own timeout and still report what it printed.
`ctx.isolation` says which confinement is in force; it is returned with every
result so nobody mistakes a reduced sandbox for a full one.
"""
from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time

OUTPUT_LIMIT = 64 * 1024  # per stream: what an agent can use; more is cut and flagged
DEFAULT_TIMEOUT_S = 10.0
MARGIN_S = 1.0  # leave the worker time to report before the manager's own deadline
DRAIN_READS = 64  # reads of what a stream still holds once the snippet has exited (a pipe holds 64 KB)


def run(args: dict, ctx) -> dict:
    code = args["code"]
    stdin = args.get("stdin", "").encode()
    limit = float(args.get("timeout_s", DEFAULT_TIMEOUT_S))
    remaining = ctx.remaining()
    if remaining is not None:
        limit = max(0.1, min(limit, remaining - MARGIN_S))
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": ctx.work_dir, "TMPDIR": ctx.work_dir,
           "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-I", "-c", code], cwd=ctx.work_dir, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    out, err, timed_out = _communicate(proc, stdin, started + limit)
    elapsed = time.monotonic() - started
    code_ = proc.returncode
    result = {
        "exit_code": code_,
        "stdout": out[0].decode(errors="replace"),
        "stderr": err[0].decode(errors="replace"),
        "stdout_truncated": out[1],
        "stderr_truncated": err[1],
        "timed_out": timed_out,
        "elapsed_s": round(elapsed, 3),
        "sandbox": _describe(ctx.isolation),
    }
    if timed_out:
        result["error"] = f"the snippet ran longer than {limit:g} s and was killed"
    elif code_ is not None and code_ < 0:
        sig = signal.Signals(-code_).name if -code_ in signal.Signals._value2member_map_ else str(-code_)
        result["error"] = f"the snippet was killed by {sig}" + (
            " (CPU-time limit)" if sig == "SIGXCPU" else "")
    elif "MemoryError" in result["stderr"]:
        result["error"] = "the snippet ran out of memory (limit: the tool's memory_mb, for each process and for all together)"
    return result


def _communicate(proc: subprocess.Popen, stdin: bytes, deadline: float) -> tuple[tuple[bytes, bool], tuple[bytes, bool], bool]:
    """Feed stdin, collect at most OUTPUT_LIMIT bytes per stream (draining the rest), stop at deadline.

    The call ends when the snippet's process does, not when its output pipes close: a background
    child may hold them open for ever. What is already in the pipes is read; the worker then ends
    every process the snippet left (worker.py), before the reply.
    """
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    cut = {fd: False for fd in bufs}
    pending = memoryview(stdin)
    if not pending:
        proc.stdin.close()
    exited = _exit_watch(proc)
    timed_out = False
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            sel.register(fd, selectors.EVENT_READ)
        if pending:
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
        if exited is not None:
            sel.register(exited, selectors.EVENT_READ)
        while proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(min(left, 0.5 if exited is not None else 0.05)):
                if key.fd in bufs:
                    if not _read_into(key.fd, bufs, cut):
                        sel.unregister(key.fd)
                elif key.fd != exited:
                    pending = _feed(proc, pending)
                    if not pending:
                        sel.unregister(key.fd)
                        _close_stdin(proc)
        # the snippet is over (or out of time): take what its pipes already hold, without waiting for EOF
        for fd in bufs:
            if fd in sel.get_map():
                os.set_blocking(fd, False)
                for _ in range(DRAIN_READS):  # bounded: a background child may write for ever
                    if not _read_into(fd, bufs, cut):
                        break
    if exited is not None:
        os.close(exited)
    _close_stdin(proc)
    if timed_out:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        timed_out = True
    fo, fe = proc.stdout.fileno(), proc.stderr.fileno()
    return (bytes(bufs[fo]), cut[fo]), (bytes(bufs[fe]), cut[fe]), timed_out


def _exit_watch(proc: subprocess.Popen) -> int | None:
    """A descriptor readable once the snippet's process exits (pidfd, Linux 5.3+); None: poll for it."""
    try:
        return os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        return None


def _read_into(fd: int, bufs: dict, cut: dict) -> bool:
    """Read one chunk into the stream's buffer (what passes OUTPUT_LIMIT is dropped); False at EOF or when
    a non-blocking read finds nothing more."""
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        return False
    if not chunk:
        return False
    room = OUTPUT_LIMIT - len(bufs[fd])
    if room > 0:
        bufs[fd] += chunk[:room]
    if len(chunk) > room:
        cut[fd] = True
    return True


def _feed(proc: subprocess.Popen, pending: memoryview) -> memoryview:
    try:
        n = os.write(proc.stdin.fileno(), pending[:65536])
        return pending[n:]
    except BrokenPipeError:
        return pending[:0]


def _close_stdin(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()
    except OSError:
        pass


def _describe(iso: dict) -> str:
    if not iso or not (iso.get("net") or iso.get("fs")):
        return "REDUCED: rlimits only (no namespaces on this machine); the snippet can reach the network and the host's files"
    parts = ["no network" if iso.get("net") else "HOST NETWORK",
             "read-only filesystem with private /tmp" if iso.get("fs") else "HOST FILESYSTEM",
             "own pid namespace" if iso.get("pid") else "shared pid namespace",
             f"runs as {iso.get('user')}"]
    return ", ".join(parts)
