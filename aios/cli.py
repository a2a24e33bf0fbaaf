"""Command line: `aios-start` and `aios {status,stop,bench,demo}`."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aios.config import ConfigError, load_config
from aios.procutil import pid_alive
from aios.rundir import RunDir


def _run_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default=None,
                   help="kernel run directory (default: $AIOS_RUN_DIR, else $XDG_RUNTIME_DIR/aios, else ~/.cache/aios/run)")


# ------------------------------------------------------------------ aios-start
def start_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aios-start",
        description="Start the AIOS kernel: a supervisor that runs the scheduler and every manager the "
                    "configuration names (by default one llama.cpp core with Gemma 3 270M), restarts them when "
                    "they crash, and stops them all on Ctrl-C, SIGTERM or `aios stop`.")
    p.add_argument("--config", help="TOML configuration file (default: built-in defaults)")
    _run_dir_arg(p)
    p.add_argument("--detach", action="store_true",
                   help="run in the background; exit 0 once every process is READY, non-zero with the reason if not")
    p.add_argument("--policy", help="override [scheduler] policy (fifo, rr, las)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def start_main(argv: list[str] | None = None) -> int:
    args = start_parser().parse_args(argv)
    from aios.supervisor import resolve_manager_services, run_supervisor
    overrides = {"scheduler.policy": args.policy} if args.policy else None
    try:
        config = resolve_manager_services(load_config(args.config, overrides))
        from aios.scheduler.policies import make_policy
        make_policy(config.scheduler)
    except (ConfigError, ValueError) as exc:
        print(f"aios-start: {exc}", file=sys.stderr)
        return 2
    run_dir = RunDir(args.run_dir)
    if not args.detach:
        from aios.log import setup_logging
        setup_logging("supervisor")
        return run_supervisor(run_dir, config, quiet=args.quiet)
    return _start_detached(run_dir, args)


def _start_detached(run_dir: RunDir, args: argparse.Namespace) -> int:
    """Spawn the supervisor in its own session and wait for its verdict on a pipe."""
    run_dir.path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(run_dir.path, 0o700)
    (run_dir.log_dir).mkdir(exist_ok=True, mode=0o700)
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "aios.cli", "_supervise", "--run-dir", str(run_dir.path), "--ready-fd", str(w)]
    if args.config:
        cmd += ["--config", str(Path(args.config).absolute())]
    if args.policy:
        cmd += ["--policy", args.policy]
    with open(run_dir.log_dir / "supervisor.log", "ab") as log:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, pass_fds=(w,), cwd=os.getcwd())
    os.close(w)
    if not args.quiet:
        print(f"[aios-start] starting kernel in {run_dir.path} (supervisor pid {child.pid}) ...", flush=True)
    with os.fdopen(r, "rb") as pipe:
        line = pipe.readline()
    try:
        verdict = json.loads(line)
    except json.JSONDecodeError:
        code = child.wait(timeout=10)
        print(f"aios-start: the supervisor exited (code {code}) before it was ready; "
              f"see {run_dir.log_dir / 'supervisor.log'}", file=sys.stderr)
        return 1
    if not verdict.get("ok"):
        print(f"aios-start: {verdict.get('message')}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"[aios-start] {verdict.get('message')}; stop it with: aios stop --run-dir {run_dir.path}")
    return 0


def _supervise_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="aios _supervise")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--ready-fd", type=int, required=True)
    p.add_argument("--config")
    p.add_argument("--policy")
    args = p.parse_args(argv)
    from aios.log import setup_logging
    from aios.supervisor import resolve_manager_services, run_supervisor
    setup_logging("supervisor")
    overrides = {"scheduler.policy": args.policy} if args.policy else None
    config = resolve_manager_services(load_config(args.config, overrides))
    return run_supervisor(RunDir(args.run_dir), config, ready_fd=args.ready_fd, quiet=True)


# ------------------------------------------------------------------ aios status
def status_main(args: argparse.Namespace) -> int:
    run_dir = RunDir(args.run_dir)
    pid = run_dir.read_pid()
    running = bool(pid and pid_alive(pid))
    state = run_dir.read_state() or {}
    processes = state.get("processes", []) if running else []
    kernel: dict[str, Any] | None = None
    if running and args.verbose:
        kernel = _kernel_status(run_dir)
    if args.json:
        out: dict[str, Any] = {"running": running, "run_dir": str(run_dir.path), "supervisor_pid": pid if running else None,
                               "processes": [{k: p.get(k) for k in ("name", "pid", "state", "restarts")} for p in processes]}
        if kernel is not None:
            out["kernel"] = kernel
        print(json.dumps(out, indent=2))
        return 0 if running else 1
    if not running:
        print(f"no kernel running in {run_dir.path}")
        return 1
    print(f"kernel in {run_dir.path} (supervisor pid {pid})")
    print(f"{'NAME':<14}{'PID':>8}  {'STATE':<10}{'RESTARTS':>9}  MESSAGE")
    for p in processes:
        print(f"{p['name']:<14}{p.get('pid') or '-':>8}  {p['state']:<10}{p['restarts']:>9}  {p.get('message', '')}")
    if kernel:
        print("\nqueues:", ", ".join(f"{s}={n}" for s, n in kernel.get("queues", {}).items()) or "-")
        for s, c in kernel.get("services", {}).items():
            print(f"  {s:<10} submitted={c['submitted']} completed={c['completed']} errors={c['errors']} "
                  f"wait_mean={c['wait_mean_s']:.4f}s turnaround_mean={c['turnaround_mean_s']:.4f}s")
    return 0


def _kernel_status(run_dir: RunDir) -> dict[str, Any] | None:
    from aios.sdk import AIOSError, connect
    try:
        with connect(run_dir, agent="aios-cli", timeout=2.0) as client:
            return client.call("kernel", "status")
    except AIOSError:
        return None


# -------------------------------------------------------------------- aios stop
def stop_kernel(run_dir: RunDir, timeout: float = 30.0) -> bool:
    """SIGTERM the supervisor and wait until it and every child it listed are gone."""
    pid = run_dir.read_pid()
    state = run_dir.read_state() or {}
    children = [p["pid"] for p in state.get("processes", []) if p.get("pid")]
    if pid and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    # Whatever outlived its supervisor (it was SIGKILLed, or hung) goes now.
    for child in children:
        if pid_alive(child):
            try:
                os.killpg(child, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for f in run_dir.ipc_files():
        f.unlink(missing_ok=True)
    run_dir.pid_file.unlink(missing_ok=True)
    return bool(pid)


def stop_main(args: argparse.Namespace) -> int:
    run_dir = RunDir(args.run_dir)
    pid = run_dir.read_pid()
    if not (pid and pid_alive(pid)):
        stop_kernel(run_dir)
        print(f"no kernel running in {run_dir.path}")
        return 0
    stop_kernel(run_dir, args.timeout)
    print(f"stopped the kernel in {run_dir.path}")
    return 0


# ------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_supervise"]:
        return _supervise_main(argv[1:])
    parser = argparse.ArgumentParser(prog="aios", description="Control and measure an AIOS kernel.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", help="show the kernel's processes (name, pid, state, restarts)")
    _run_dir_arg(p)
    p.add_argument("--json", action="store_true", help='print {"processes": [{name, pid, state, restarts}]}')
    p.add_argument("-v", "--verbose", action="store_true", help="also show queues and per-service counts")
    p.set_defaults(func=status_main)
    p = sub.add_parser("stop", help="stop the kernel and every process it started")
    _run_dir_arg(p)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait before SIGKILL")
    p.set_defaults(func=stop_main)
    from aios.bench.cli import add_bench_parser
    add_bench_parser(sub)
    from aios.demo import add_demo_parser
    add_demo_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
