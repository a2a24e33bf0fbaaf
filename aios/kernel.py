"""Starting, stopping and inspecting a kernel, as a library.

The command line (`aios-start`, `aios start|stop|status`), the benchmarks,
the demo and the tests all go through these three functions:

    from aios import kernel
    kernel.start(run_dir, config="aios.toml")      # returns once every process said READY
    kernel.status(run_dir)                         # {"running", "processes", ...}
    kernel.stop(run_dir)                           # the supervisor and every child are gone

`start` runs the supervisor detached (its own session, logs in the run
directory) and waits for its verdict on a pipe; the configuration is checked
in the caller first (`aios.config.load_config` and
`aios.managers.runner.resolve_managers`), so a mistake is reported before any
process starts. `stop` signals only a process that is verifiably this run
directory's supervisor (pid and start time from its pid file), never a
stranger that reused a stale pid.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aios.config import Config, ConfigError, dump_toml, load_config
from aios.procutil import SUPERVISOR_PID_ENV, pid_alive, set_parent_death_signal
from aios.rundir import RunDir, RunDirError

__all__ = ["KernelStartError", "start", "stop", "status", "load"]


class KernelStartError(RuntimeError):
    """The kernel did not come up; the message says which process and why (and the log tail)."""


def load(config: str | Path | Mapping[str, Any] | None = None, policy: str | None = None) -> Config:
    """A validated configuration (a TOML file, a mapping, or the defaults) with every manager
    class resolved and its options checked. Raises ConfigError naming each problem's place."""
    from aios.managers.runner import resolve_managers
    overrides: dict[str, Any] = dict(config) if isinstance(config, Mapping) else {}
    if policy:
        overrides["scheduler.policy"] = policy
    cfg = load_config(None if isinstance(config, Mapping) else config, overrides or None)
    resolve_managers(cfg)
    return cfg


@dataclass(frozen=True)
class Started:
    """A kernel `start` brought up: its run directory, and warnings (a degraded LLM backend)."""

    run_dir: RunDir
    warnings: list[str]


def start(run_dir: RunDir | str | Path | None = None, config: str | Path | Mapping[str, Any] | None = None, *,
          policy: str | None = None, timeout: float | None = None,
          progress: Any = None, exit_with_caller: bool = False) -> Started:
    """Start a kernel in the background and return once every process said READY.

    `config` is a TOML file, a mapping written out as TOML, or None for the
    defaults. Raises ConfigError (bad configuration), RunDirError (unusable run
    directory) or KernelStartError (a process failed to start).

    By default the kernel outlives the caller (`aios start --detach`). With
    `exit_with_caller` it stops, every process of it, when the calling process
    ends, however it ends (even SIGKILL): the supervisor gets the same parent-death
    signal and watchdog it gives its own children (`aios.procutil`), and stops its
    tree in order. For owners a kernel must never outlive, such as test fixtures.
    Linux sends that signal when the *thread* that started the kernel exits, so
    call it from a thread that lives as long as the kernel should (the main thread).
    """
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    cfg = load(config, policy)  # fail here, before any process exists
    rd.prepare_dir()
    cmd = [sys.executable, "-m", "aios.supervisor", "--run-dir", str(rd.path), "--quiet"]
    if isinstance(config, Mapping):
        path = rd.path / "start-config.toml"
        path.write_text(dump_toml(config))
        cmd += ["--config", str(path)]
    elif config is not None:
        cmd += ["--config", str(Path(config).absolute())]
    if policy:
        cmd += ["--policy", policy]
    r, w = os.pipe()
    cmd += ["--ready-fd", str(w)]
    env = dict(os.environ)
    env.pop(SUPERVISOR_PID_ENV, None)  # a supervisor watches the parent named here: only when asked
    if exit_with_caller:
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
    with open(rd.log_dir / "supervisor.log", "ab") as log:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, pass_fds=(w,), cwd=os.getcwd(), env=env,
                                 preexec_fn=set_parent_death_signal if exit_with_caller else None)
    os.close(w)
    if progress is not None:
        progress(f"starting kernel in {rd.path} (supervisor pid {child.pid}) ...")
    limit = timeout if timeout is not None else cfg.supervisor.start_timeout_s + 30
    with os.fdopen(r, "rb") as pipe:
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(pipe, selectors.EVENT_READ)
        line = pipe.readline() if sel.select(limit) else b""
        sel.close()
    try:
        verdict = json.loads(line)
    except json.JSONDecodeError:
        try:
            code = child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
        raise KernelStartError(f"the supervisor exited (code {code}) before it was ready; "
                               f"see {rd.log_dir / 'supervisor.log'}") from None
    if not verdict.get("ok"):
        child.wait(timeout=30)
        raise KernelStartError(str(verdict.get("message")))
    message = str(verdict.get("message", ""))
    return Started(rd, [w.strip() for w in message.split("; warning: ")[1:]])


def stop(run_dir: RunDir | str | Path | None = None, timeout: float = 30.0) -> bool:
    """Stop the kernel: SIGTERM its supervisor, wait for it and every child it listed to be gone.

    Returns whether a live kernel was found. Leftovers (children of a supervisor
    that was killed) are killed, and the ipc endpoints and pid file removed.
    """
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    pid = rd.supervisor_pid()
    state = rd.read_state() or {}
    children = [p["pid"] for p in state.get("processes", []) if isinstance(p, dict) and p.get("pid")]
    if pid:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    _kill_leftovers(rd, children)
    for f in rd.ipc_files():
        f.unlink(missing_ok=True)
    if rd.supervisor_pid() is None:
        rd.remove_external_ipc_dir()
        try:
            rd.pid_file.unlink(missing_ok=True)
        except OSError:
            pass  # not a directory there at all: nothing of ours to remove
    return bool(pid)


def _kill_leftovers(rd: RunDir, pids: list[int]) -> None:
    """Kill children that outlived their supervisor, but only processes that are this kernel's."""
    import psutil
    needle = str(rd.path)
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if needle not in " ".join(proc.cmdline()):
                continue  # the pid was reused by something else
            os.killpg(pid, signal.SIGKILL)
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass


def status(run_dir: RunDir | str | Path | None = None, *, verbose: bool = False,
           details: bool = False) -> dict[str, Any]:
    """{"running", "run_dir", "supervisor_pid", "processes": [{name, pid, state, restarts, message}],
    "message"?, "kernel"?}.

    "message" says why a kernel cannot answer: it was stopped by its supervisor (a FATAL scheduler,
    `[supervisor] on_scheduler_fatal = "stop"`), or it runs but its scheduler is down.
    With `verbose`, "kernel" holds the scheduler's own `kernel.status` (queues,
    managers, per-service counts) when it answers. With `details`, "details"
    holds, by process name, what each registered manager answers to the
    standard `status` op: its figures and its one-line "summary".
    """
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    pid = rd.supervisor_pid()
    running = pid is not None
    state = rd.read_state() or {}
    out: dict[str, Any] = {"running": running, "run_dir": str(rd.path), "supervisor_pid": pid,
                           "processes": state.get("processes", []) if running else []}
    message = _why_not_answering(state, running)
    if message:
        out["message"] = message
    if running and (verbose or details):
        out.update(_kernel_status(rd, details))
    return out


def _why_not_answering(state: dict[str, Any], running: bool) -> str | None:
    """From the supervisor's table: why it stopped the kernel by itself, or why the scheduler of a
    running kernel is not there to answer."""
    sup = state.get("supervisor")
    if not running:
        return str(sup["message"]) if isinstance(sup, dict) and sup.get("message") else None
    sched = next((p for p in state.get("processes", []) if isinstance(p, dict) and p.get("name") == "scheduler"), None)
    if sched is None or sched.get("state") in ("RUNNING", "STARTING", "STOPPING"):
        return None
    return f"the scheduler is {sched.get('state')} ({sched.get('message') or 'no reason given'}): nothing can answer"


def _kernel_status(rd: RunDir, details: bool) -> dict[str, Any]:
    from aios.sdk import AIOSError, connect
    out: dict[str, Any] = {"kernel": None}
    try:
        with connect(rd, agent="aios-cli", timeout=2.0) as client:
            out["kernel"] = ks = client.call("kernel", "status")
            if details:
                managers = ks.get("managers", [])
                out["details"] = {m["name"]: _manager_status(client, ks, m, managers) for m in managers}
    except AIOSError:
        pass
    return out


def _per_target(ks: dict[str, Any], manager: dict[str, Any]) -> dict[str, dict[str, int]] | None:
    """For a manager with per-target limits (the tool manager): each target's limit, instances
    running and requests queued, from the scheduler's own view (a manager cannot see its queue)."""
    if not manager.get("limits"):
        return None
    queued = ks.get("queued_by_target", {}).get(manager["service"], {})
    return {t: {"limit": limit, "running": manager.get("running", {}).get(t, 0), "queued": queued.get(t, 0)}
            for t, limit in sorted(manager["limits"].items())}


def _route(manager: dict[str, Any], managers: list[dict[str, Any]]) -> str | None:
    """The target that reaches this very manager: none when it is its service's only one; else
    one of its targets (the scheduler routes by target), preferably one without a concurrency
    limit, so the question never waits behind a saturated target (LLM cores: a model they serve)."""
    if sum(1 for m in managers if m.get("service") == manager.get("service")) < 2:
        return None
    targets, limits = manager.get("targets") or [], manager.get("limits") or {}
    return next((t for t in targets if t not in limits), targets[0] if targets else None)


def _manager_status(client: Any, ks: dict[str, Any], manager: dict[str, Any],
                    managers: list[dict[str, Any]]) -> dict[str, Any]:
    from aios.sdk import AIOSError
    per_target = _per_target(ks, manager)
    args = {"per_target": per_target} if per_target is not None else {}
    try:
        result = client.request(manager["service"], "status", args, target=_route(manager, managers), timeout=5.0,
                                idempotent=True).result
    except AIOSError as exc:
        return {"error": f"{exc.code}: {exc.message}"}
    if per_target is not None and isinstance(result, dict):
        result.setdefault("per_target", per_target)
    return result


__all__ += ["ConfigError", "RunDirError"]
