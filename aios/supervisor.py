"""The supervisor: starts, watches, restarts and stops every kernel process.

Process states follow supervisord's: STARTING (spawned, not yet READY),
RUNNING (said READY: the scheduler answers ping, a manager is registered
with the scheduler under its current pid), BACKOFF (crashed, waiting to
restart), FATAL (crashed too often too fast; given up), STOPPING, STOPPED.
Every change of state is a checked move along `PROCESS_MOVES` (see there).

- Each child runs in its own process group (so a stop can SIGKILL the group)
  and gets PR_SET_PDEATHSIG plus a parent watchdog, so children exit when the
  supervisor dies, even by SIGKILL.
- A crash restarts the process after an exponential backoff; a process that
  keeps dying within `fast_crash_s` of starting becomes FATAL.
- A manager that is alive but silent (the scheduler dropped it for missed
  heartbeats and it did not come back) is killed and restarted.
- A FATAL scheduler is the kernel being down: nothing can answer a call. By
  default (`[supervisor] on_scheduler_fatal = "stop"`) the whole tree is
  stopped and the reason is left in the process table's `supervisor.message`,
  where `aios status` and the SDK's "no kernel" error find it; with
  "restart" the scheduler is restarted forever, its backoff capped at
  `SCHEDULER_BACKOFF_MAX_S` once it is past its fast-crash limit. Either way
  a client gets an answer (KernelUnavailable, or UNAVAILABLE while the
  scheduler is down past its call's deadline: the table's `restart_at`), never
  its timeout.
- Shutdown goes in reverse start order: ask (SIGINT), then SIGTERM, then
  SIGKILL to the process group; then the ipc files and the pid file go.
- The process table is written to `processes.json` at every change; that is
  what `aios status` and the scheduler's `kernel.status` show. Each row names
  the process's service, which is how the scheduler knows, before a manager
  registers, that requests for its service should wait rather than fail.
- Readiness is probed with one signed `kernel.status` call on a socket of the
  supervisor's own (not the agent SDK), every half second.

Run it as `python -m aios.supervisor --run-dir DIR [--config FILE] [--ready-fd FD]`
(what `aios-start --detach` does) or through `aios.kernel.start`.
"""
from __future__ import annotations

import argparse
import enum
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import zmq

from aios import messages
from aios.calls import PendingCall, Send, Wait, decode, match_id
from aios.config import Config, ConfigError, load_config
from aios.procutil import SUPERVISOR_PID_ENV, exit_with_parent, set_parent_death_signal
from aios.errors import AIOSError
from aios.protocol import Codec, ProtocolError
from aios.rundir import RunDir, write_atomic
from aios.scheduler.request import IllegalTransition

log = logging.getLogger("aios.supervisor")


#: how often the supervisor compares each process's resident memory with its limit
MEMORY_CHECK_S = 0.5
#: with `on_scheduler_fatal = "restart"`: the longest wait between restarts of a scheduler that is
#: past its fast-crash limit (it would be FATAL otherwise)
SCHEDULER_BACKOFF_MAX_S = 30.0


class ProcessState(str, enum.Enum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    BACKOFF = "BACKOFF"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    FATAL = "FATAL"


#: The moves a supervised process may make, checked like a request's (scheduler/request.py):
#:
#:     STOPPED ──▶ STARTING                          spawned
#:     STARTING ──▶ RUNNING                          said READY
#:     STARTING, RUNNING ──▶ BACKOFF ──▶ STARTING    crashed; restarted after its backoff
#:     STARTING, RUNNING ──▶ FATAL                   crashed too often too fast, or died before READY
#:     STARTING, RUNNING ──▶ STOPPING ──▶ STOPPED    stopped: asked, then SIGTERM, then SIGKILL
#:     STARTING, RUNNING, BACKOFF ──▶ STOPPED        a stop found it already gone
#:
#: FATAL is final (it stays visible after a stop). Any other move is a bug: `Proc.move` raises
#: `IllegalTransition`, and the supervisor logs it and leaves the process's books as they were.
PROCESS_MOVES: dict[ProcessState, frozenset[ProcessState]] = {
    ProcessState.STOPPED: frozenset({ProcessState.STARTING}),
    ProcessState.STARTING: frozenset({ProcessState.RUNNING, ProcessState.BACKOFF, ProcessState.FATAL,
                                      ProcessState.STOPPING, ProcessState.STOPPED}),
    ProcessState.RUNNING: frozenset({ProcessState.BACKOFF, ProcessState.FATAL, ProcessState.STOPPING,
                                     ProcessState.STOPPED}),
    ProcessState.BACKOFF: frozenset({ProcessState.STARTING, ProcessState.STOPPED}),
    ProcessState.STOPPING: frozenset({ProcessState.STOPPED}),
    ProcessState.FATAL: frozenset(),
}


@dataclass(eq=False)
class Proc:
    name: str
    argv: list[str]
    service: str
    state: ProcessState = ProcessState.STOPPED
    popen: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    fast_crashes: int = 0
    next_start: float = 0.0
    unseen_since: float | None = None
    message: str = ""
    memory_limit_mb: int | None = None
    kill_reason: str = ""
    last_exit: str = ""  # why it last stopped running (kept across restarts, for the scheduler's errors)
    restart_at: float | None = None  # wall-clock time of its next start, while in BACKOFF

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def can_move(self, to: ProcessState) -> bool:
        return to in PROCESS_MOVES[self.state]

    def move(self, to: ProcessState) -> None:
        """Change state along `PROCESS_MOVES`; an illegal move raises `IllegalTransition` and changes nothing."""
        if not self.can_move(to):
            raise IllegalTransition(f"process {self.name} cannot go from {self.state.value} to {to.value}")
        self.state = to

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "service": self.service, "memory_limit_mb": self.memory_limit_mb,
                "last_exit": self.last_exit, "fast_crashes": self.fast_crashes,
                "pid": self.pid if self.state not in (ProcessState.STOPPED, ProcessState.FATAL, ProcessState.BACKOFF) else None,
                "state": self.state.value, "restarts": self.restarts, "message": self.message,
                "restart_at": self.restart_at if self.state == ProcessState.BACKOFF else None}


class StartupError(Exception):
    """The kernel could not be brought up; the message says which process and why."""


class Probe:
    """Asks the scheduler for `kernel.status` over a DEALER of its own: one signed request,
    one reply or a timeout. A fresh socket after every failure, so a restarted scheduler
    is reached at once."""

    def __init__(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir
        self.ctx = zmq.Context()
        self.sock: zmq.Socket | None = None
        self.codec: Codec | None = None

    def status(self, timeout: float = 1.0) -> dict[str, Any] | None:
        from aios.sockets import dealer
        if self.sock is None:
            self.codec = Codec(self.run_dir.load_key())
            endpoint = self.run_dir.read_endpoint()
            self.sock = dealer(self.ctx, self.run_dir, endpoint, role="agent")
            self.sock.connect(endpoint.frontend)
        assert self.codec is not None
        call = PendingCall(self.codec, messages.Request(id="", service="kernel", op="status", agent="supervisor"),
                           {}, timeout=timeout, idempotent=False, now=time.monotonic(), where="the scheduler")
        try:
            while True:
                step = call.step(time.monotonic())
                if isinstance(step, Send):
                    self.sock.send_multipart(step.frames, zmq.NOBLOCK)
                elif isinstance(step, Wait):
                    if self.sock.poll(max(1, int((step.until - time.monotonic()) * 1000) + 1), zmq.POLLIN):
                        msg = decode(self.codec, self.sock.recv_multipart())
                        if match_id(msg) == call.rid:
                            call.feed(msg)  # type: ignore[arg-type]
                else:
                    return step.result if isinstance(step.result, dict) else None
        except (zmq.ZMQError, AIOSError, ProtocolError):
            pass
        self.reset()
        return None

    def reset(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    def close(self) -> None:
        self.reset()
        self.ctx.term()


class Supervisor:
    def __init__(self, run_dir: RunDir, config: Config) -> None:
        from aios.managers.runner import resolve_managers
        self.run_dir = run_dir
        self.config = config
        self.cfg = config.supervisor
        py = sys.executable
        rd = str(run_dir.path)
        self.procs = [Proc("scheduler", [py, "-m", "aios.scheduler.broker", "--run-dir", rd], "kernel")]
        self.procs += [Proc(r.name, [py, "-m", "aios.managers.runner", "--run-dir", rd, "--name", r.name], r.service,
                            memory_limit_mb=r.spec.memory_limit_mb or r.cls.default_memory_limit_mb(r.options, config))
                       for r in resolve_managers(config)]
        self.stopping = False
        self.stop_message = ""  # why the supervisor stopped the kernel by itself (a FATAL scheduler)
        self._probe: Probe | None = None
        self._last_probe = 0.0
        self._last_memory_check = 0.0
        self.last_status: dict[str, Any] = {}

    # ------------------------------------------------------------ public
    def prepare(self) -> None:
        """Create the run directory; refuse if a live kernel already uses it."""
        pid = self.run_dir.supervisor_pid()
        if pid and pid != os.getpid():
            raise StartupError(f"a kernel is already running in {self.run_dir.path} (supervisor pid {pid}); "
                               f"stop it with: aios stop --run-dir {self.run_dir.path}")
        for stale in self.run_dir.ipc_files():
            stale.unlink(missing_ok=True)
        self.run_dir.create(self.config)
        self.run_dir.write_pid()
        self.write_state()

    def start_all(self, progress: Callable[[str], None] = lambda s: None) -> None:
        """Start every process and wait until each said READY (raise StartupError if not)."""
        deadline = time.monotonic() + self.cfg.start_timeout_s
        for proc in self.procs:
            self.spawn(proc)
            if proc.name == "scheduler":
                self._wait_ready([proc], deadline, progress)
        managers = self.procs[1:]
        if managers:
            progress(f"waiting for {', '.join(p.name for p in managers)} to load")
            self._wait_ready(managers, deadline, progress)

    def run_forever(self) -> None:
        """Watch the tree until asked to stop, then stop it."""
        while not self.stopping:
            self.watch_once()
            time.sleep(0.1)
        self.stop_all()

    def request_stop(self, *_: Any) -> None:
        self.stopping = True

    # -------------------------------------------------------------- states
    def _move(self, proc: Proc, to: ProcessState) -> bool:
        """Move `proc` to `to`. An illegal move is logged as an error and leaves its books as they were."""
        try:
            proc.move(to)
        except IllegalTransition as exc:
            log.error("%s", exc)
            return False
        return True

    # ----------------------------------------------------------- spawning
    def spawn(self, proc: Proc) -> None:
        if not proc.can_move(ProcessState.STARTING):  # checked first: a live child is never replaced
            log.error("not starting %s: it is %s", proc.name, proc.state.value)
            return
        proc.popen = self._launch(proc)
        self._move(proc, ProcessState.STARTING)
        proc.started_at = time.monotonic()
        proc.unseen_since = None
        proc.message = ""
        proc.kill_reason = ""
        log.info("started %s (pid %d)", proc.name, proc.popen.pid)
        self.write_state()

    def _launch(self, proc: Proc) -> subprocess.Popen[bytes]:
        """Start the process itself: its own session, its log file, and death with the supervisor."""
        env = dict(os.environ)
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        env.setdefault("PYTHONUNBUFFERED", "1")
        logfile = open(self.run_dir.log_dir / f"{proc.name}.log", "ab")
        try:
            return subprocess.Popen(
                proc.argv, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=set_parent_death_signal, close_fds=True,
            )
        finally:
            logfile.close()

    def _wait_ready(self, procs: list[Proc], deadline: float, progress: Callable[[str], None]) -> None:
        while True:
            if self.stopping:  # SIGTERM while starting (or the caller it exits with is gone): stop now
                raise StartupError("asked to stop while starting")
            for proc in procs:
                if proc.state == ProcessState.STARTING and proc.popen is not None and proc.popen.poll() is not None:
                    tail = self.log_tail(proc.name)
                    self._move(proc, ProcessState.FATAL)
                    proc.message = f"exited with code {proc.popen.returncode} before it was ready"
                    self.write_state()
                    raise StartupError(f"{proc.name} {proc.message}; last log lines:\n{tail}")
            self.probe(force=True)
            if all(p.state == ProcessState.RUNNING for p in procs):
                return
            if time.monotonic() > deadline:
                waiting = [p.name for p in procs if p.state != ProcessState.RUNNING]
                raise StartupError(f"not ready within {self.cfg.start_timeout_s:.0f}s: {waiting}; "
                                   f"see logs in {self.run_dir.log_dir}")
            time.sleep(0.05)

    # ----------------------------------------------------------- readiness
    def probe(self, force: bool = False) -> None:
        """Ask the scheduler who is READY; promote STARTING processes and catch hung managers."""
        now = time.monotonic()
        if not force and now - self._last_probe < 0.5:
            return
        self._last_probe = now
        sched = self.procs[0]
        if sched.popen is None or sched.popen.poll() is not None:
            return
        if self._probe is None:
            self._probe = Probe(self.run_dir)
        status = self._probe.status()
        if status is None:
            return
        self.last_status = status
        changed = False
        if sched.state == ProcessState.STARTING:
            changed = self._move(sched, ProcessState.RUNNING)
        registered = {(m["name"], m["pid"]) for m in status.get("managers", [])}
        sched_age = now - sched.started_at
        expiry = self.config.kernel.heartbeat_interval_s * self.config.kernel.heartbeat_liveness
        for proc in self.procs[1:]:
            if proc.popen is None or proc.state not in (ProcessState.STARTING, ProcessState.RUNNING):
                continue
            if (proc.name, proc.popen.pid) in registered:
                proc.unseen_since = None
                if proc.state == ProcessState.STARTING:
                    changed = self._move(proc, ProcessState.RUNNING) or changed
            elif proc.state == ProcessState.RUNNING:
                proc.unseen_since = proc.unseen_since or now
                if now - proc.unseen_since > 2 * expiry and sched_age > 2 * expiry:
                    log.warning("%s is alive but not registered with the scheduler; killing it to restart", proc.name)
                    self._signal_group(proc, signal.SIGKILL)
        if changed:
            self.write_state()

    # ------------------------------------------------------------ watching
    def watch_once(self) -> None:
        now = time.monotonic()
        for proc in self.procs:
            if proc.state in (ProcessState.STARTING, ProcessState.RUNNING) and proc.popen is not None:
                code = proc.popen.poll()
                if code is not None:
                    self._crashed(proc, code, now)
            elif proc.state == ProcessState.BACKOFF and now >= proc.next_start:
                proc.restarts += 1
                self.spawn(proc)
        if now - self._last_memory_check >= MEMORY_CHECK_S:
            self._last_memory_check = now
            self.enforce_memory_limits()
        self.probe()

    def enforce_memory_limits(self) -> None:
        """Kill a process whose resident memory passed its limit; it is restarted like any crash.
        Resident memory, not address space (RLIMIT_AS): thread arenas and mapped model files make a
        healthy llama.cpp process reserve far more address space than it ever touches."""
        import psutil
        for proc in self.procs:
            if proc.memory_limit_mb is None or proc.popen is None or proc.state not in (ProcessState.STARTING, ProcessState.RUNNING):
                continue
            try:
                rss = psutil.Process(proc.popen.pid).memory_info().rss
            except psutil.Error:
                continue
            if rss > proc.memory_limit_mb * 1024 * 1024:
                proc.kill_reason = (f"killed: its resident memory ({rss >> 20} MB) passed its limit of "
                                    f"{proc.memory_limit_mb} MB (memory_limit_mb)")
                log.error("%s %s", proc.name, proc.kill_reason)
                self._signal_group(proc, signal.SIGKILL)
                proc.message = proc.kill_reason
                self.write_state()

    def _crashed(self, proc: Proc, code: int, now: float) -> None:
        ran = now - proc.started_at
        fast_crashes = proc.fast_crashes + 1 if ran < self.cfg.fast_crash_s else 1
        past_limit = fast_crashes > self.cfg.max_fast_crashes
        is_scheduler = proc is self.procs[0]
        keep_restarting = past_limit and is_scheduler and self.cfg.on_scheduler_fatal == "restart"
        fatal = past_limit and not keep_restarting
        if not self._move(proc, ProcessState.FATAL if fatal else ProcessState.BACKOFF):
            return
        proc.fast_crashes = fast_crashes
        why = proc.kill_reason or f"exited with code {code}"
        proc.last_exit = f"{why} after {ran:.1f}s"
        if fatal:
            proc.message = f"crashed {proc.fast_crashes} times within {self.cfg.fast_crash_s}s of starting; gave up"
            log.error("%s is FATAL: %s", proc.name, proc.message)
            if is_scheduler:
                self._scheduler_fatal(proc)
        else:
            cap = max(self.cfg.backoff_max_s, SCHEDULER_BACKOFF_MAX_S) if keep_restarting else self.cfg.backoff_max_s
            delay = min(self.cfg.backoff_initial_s * 2 ** min(proc.fast_crashes - 1, 32), cap)
            proc.next_start = now + delay
            proc.restart_at = time.time() + delay
            proc.message = f"{proc.last_exit}; restarting in {delay:.2f}s"
            if keep_restarting:
                proc.message = (f"crashed {proc.fast_crashes} times within {self.cfg.fast_crash_s}s of starting "
                                f"(last: {proc.last_exit}); restarting in {delay:.2f}s "
                                f'([supervisor] on_scheduler_fatal = "restart")')
            log.warning("%s %s", proc.name, proc.message)
        self.write_state()

    def _scheduler_fatal(self, sched: Proc) -> None:
        """Without a scheduler nothing can answer a call: stop the whole kernel, and say why where
        `aios status` and the SDK look (`on_scheduler_fatal = "restart"` never gets here)."""
        self.stop_message = (f"the scheduler is FATAL ({sched.message}; last: {sched.last_exit}), so the kernel "
                             f'was stopped ([supervisor] on_scheduler_fatal = "stop"); see its log: '
                             f"aios logs scheduler --run-dir {self.run_dir.path}")
        log.error("%s", self.stop_message)
        self.stopping = True

    # ------------------------------------------------------------ stopping
    def stop_all(self) -> None:
        """Reverse start order: ask, then SIGTERM, then SIGKILL the process group."""
        self.stopping = True
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        for proc in reversed(self.procs):
            self._stop(proc)
        owner = self.run_dir.supervisor_pid()
        if owner is not None and owner != os.getpid():
            # prepare() refused to start because another live kernel owns this run directory:
            # its endpoints and process table are not ours to remove
            log.info("stopped (run directory belongs to supervisor %d)", owner)
            return
        for f in self.run_dir.ipc_files():
            f.unlink(missing_ok=True)
        self.run_dir.remove_external_ipc_dir()
        self.write_state()
        if self.run_dir.read_pid() == os.getpid():
            self.run_dir.pid_file.unlink(missing_ok=True)
        log.info("stopped")

    def _stop(self, proc: Proc) -> None:
        p = proc.popen
        if p is None or p.poll() is not None:
            if proc.state not in (ProcessState.STOPPED, ProcessState.FATAL):  # FATAL stays visible
                self._move(proc, ProcessState.STOPPED)
            self._signal_group(proc, signal.SIGKILL)  # any grandchildren it left behind
            return
        self._move(proc, ProcessState.STOPPING)
        self.write_state()
        budget = self.cfg.stop_timeout_s
        for sig, share in ((signal.SIGINT, 0.5), (signal.SIGTERM, 0.5)):
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                break
            try:
                p.wait(timeout=budget * share)
                break
            except subprocess.TimeoutExpired:
                log.warning("%s ignored %s", proc.name, sig.name)
        if p.poll() is None:
            log.warning("killing %s's process group", proc.name)
            self._signal_group(proc, signal.SIGKILL)
            p.wait(timeout=5)
        else:
            self._signal_group(proc, signal.SIGKILL)
        self._move(proc, ProcessState.STOPPED)
        proc.message = ""

    @staticmethod
    def _signal_group(proc: Proc, sig: int) -> None:
        if proc.popen is None:
            return
        try:
            os.killpg(proc.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # --------------------------------------------------------------- state
    def write_state(self) -> None:
        supervisor: dict[str, Any] = {"pid": os.getpid(), "stopping": self.stopping}
        if self.stop_message:
            supervisor["message"] = self.stop_message
        write_atomic(self.run_dir.state_file, json.dumps({
            "supervisor": supervisor,
            "processes": [p.row() for p in self.procs],
        }, indent=2))

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.run_dir.log_dir / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])


def run_supervisor(run_dir: RunDir, config: Config, ready_fd: int | None = None, quiet: bool = False) -> int:
    """Bring the kernel up, report readiness, supervise until told to stop."""

    def report(ok: bool, text: str) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, json.dumps({"ok": ok, "message": text}).encode() + b"\n")
            except OSError:
                pass  # the caller waiting for the verdict is gone (it may be why we are stopping)
            os.close(ready_fd)

    try:
        sup = Supervisor(run_dir, config)
    except ConfigError as exc:
        report(False, str(exc))
        if not quiet:
            print(f"[aios-start] {exc}", file=sys.stderr, flush=True)
        return 2
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    signal.signal(signal.SIGHUP, sup.request_stop)

    def progress(line: str) -> None:
        if not quiet:
            print(f"[aios-start] {line}", flush=True)

    try:
        sup.prepare()
        progress(f"run directory {run_dir.path}")
        sup.start_all(progress)
    except Exception as exc:
        msg = str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"
        log.error("startup failed: %s", msg)
        sup.stop_all()
        report(False, msg)
        if not quiet:
            print(f"[aios-start] startup failed: {msg}", file=sys.stderr, flush=True)
        return 1
    if sup.stopping:
        sup.stop_all()
        report(False, "stopped during startup")
        return 1
    pids = ", ".join(f"{p.name}={p.pid}" for p in sup.procs)
    progress(f"kernel ready ({pids})")
    warnings = [f"{m['name']} is DEGRADED: {m.get('detail')}" for m in sup.last_status.get("managers", [])
                if m.get("health") == "degraded"]
    for w in warnings:
        progress(f"warning: {w}")
    report(True, f"kernel ready in {run_dir.path}" + "".join(f"; warning: {w}" for w in warnings))
    sup.run_forever()
    if sup.stop_message:
        if not quiet:
            print(f"[aios-start] stopped: {sup.stop_message}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m aios.supervisor`: run a kernel's supervisor (what `aios-start --detach` spawns)."""
    p = argparse.ArgumentParser(prog="aios-supervisor", description="Run the AIOS supervisor for one run directory.")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--config", help="TOML configuration file (default: built-in defaults)")
    p.add_argument("--policy", help="override [scheduler] policy")
    p.add_argument("--ready-fd", type=int, help="write one JSON line {ok, message} here once ready (or failed)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    # started with `aios.kernel.start(exit_with_caller=True)`: stop the whole tree, in order, when
    # that caller is gone (SIGTERM -> request_stop); no hard exit, the stop is bounded by its own timeouts
    exit_with_parent(hard_exit_after_s=None)
    from aios.log import setup_logging
    setup_logging("supervisor")
    try:
        config = load_config(args.config, {"scheduler.policy": args.policy} if args.policy else None)
    except ConfigError as exc:
        if args.ready_fd is not None:
            os.write(args.ready_fd, json.dumps({"ok": False, "message": str(exc)}).encode() + b"\n")
        print(f"aios-supervisor: {exc}", file=sys.stderr)
        return 2
    return run_supervisor(RunDir(args.run_dir), config, ready_fd=args.ready_fd, quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
