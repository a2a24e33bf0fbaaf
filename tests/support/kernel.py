"""A real kernel for system tests: the `Kernel` handle and the `KernelFactory` behind the fixtures.

`KernelFactory()` (the `kernel` fixture of tests/system/conftest.py) writes a TOML
config into a fresh short run directory under /tmp, starts it with the lifecycle
library (`aios.kernel.start`, which runs the supervisor detached, as `aios-start
--detach` does, but bound to the test process: `exit_with_caller`, so an
interrupted or killed pytest never leaves a kernel running) and returns a `Kernel` handle. `close()` stops every kernel it
started with `aios.kernel.stop`, and fails if any process that ever belonged to
one (supervisor, scheduler, managers, including restarted incarnations) is still
alive, or if an ipc endpoint file was left behind.

No fixed sleeps: tests synchronise with `tests.support.waiting.wait_until`, and a test that
needs a handler to be still running when it looks holds it at a gate (the `gates` fixture,
tests/support/gates.py) instead of starting a sleep and hoping to look in time. Timeouts here
are deadlines for something that will happen, generous enough for a machine whose CPUs are
all busy.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

from aios.config import BUILTIN_MANAGERS, dump_toml
from aios.rundir import RunDir
from tests.support.paths import AIOS, AIOS_START, REPO
from tests.support.waiting import wait_until

ECHO_TARGET = "tests.support.echo_manager:EchoManager"


# ------------------------------------------------------------------- processes
def processes_of(run_dir: RunDir) -> list[psutil.Process]:
    """Every live process whose command line names this run directory."""
    needle = str(run_dir.path)
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = p.info["cmdline"] or []
            if any(needle == arg or arg.startswith(needle + os.sep) for arg in cmd):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def pid_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------------- kernel
class Kernel:
    """A handle on one kernel started with bin/aios-start --detach."""

    def __init__(self, run_dir: Path, config_path: Path) -> None:
        self.run_dir = RunDir(run_dir)
        self.config_path = config_path
        self.seen_pids: set[int] = set()
        self.start_result: subprocess.CompletedProcess[str] | None = None
        self._clients: list[Any] = []

    # ------------------------------------------------------------ commands
    def start(self, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str] | None:
        """Start with the lifecycle library (`aios.kernel.start`), the kernel dying with this process
        (`exit_with_caller`); with check=False, through `bin/aios-start --detach` instead, returning
        its exit code and output for the test to inspect (that kernel outlives an interrupted test
        run: `bin/aios-start` has exited, there is no caller left to die with)."""
        if check:
            from aios import kernel as lifecycle
            lifecycle.start(self.run_dir, self.config_path, timeout=timeout, exit_with_caller=True)
            self.remember_pids()
            return None
        result = subprocess.run(
            [sys.executable, str(AIOS_START), "--config", str(self.config_path),
             "--run-dir", str(self.run_dir.path), "--detach"],
            capture_output=True, text=True, timeout=timeout, cwd=REPO,
        )
        self.start_result = result
        self.remember_pids()
        return result

    def aios(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(AIOS), *args, "--run-dir", str(self.run_dir.path)],
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def stop(self) -> bool:
        """Stop with the lifecycle library (`aios.kernel.stop`); True if a kernel was running."""
        from aios import kernel as lifecycle
        self.remember_pids()
        for c in self._clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        self._clients.clear()
        return lifecycle.stop(self.run_dir, timeout=15.0)

    def status(self) -> dict[str, Any]:
        """`aios status --json`, parsed."""
        result = self.aios("status", "--json")
        data = json.loads(result.stdout)
        assert (result.returncode == 0) == data["running"], result
        for p in data["processes"]:
            if p.get("pid"):
                self.seen_pids.add(p["pid"])
        return data

    # --------------------------------------------------------------- state
    @property
    def supervisor_pid(self) -> int | None:
        return self.run_dir.read_pid()

    def processes(self) -> dict[str, dict[str, Any]]:
        """The supervisor's process table (processes.json), by name."""
        state = self.run_dir.read_state() or {}
        rows = {p["name"]: p for p in state.get("processes", [])}
        for p in rows.values():
            if p.get("pid"):
                self.seen_pids.add(p["pid"])
        return rows

    def pid(self, name: str) -> int | None:
        return self.processes()[name].get("pid")

    def state(self, name: str) -> str:
        return self.processes()[name]["state"]

    def remember_pids(self) -> None:
        pid = self.supervisor_pid
        if pid:
            self.seen_pids.add(pid)
        self.processes()
        for p in processes_of(self.run_dir):
            self.seen_pids.add(p.pid)

    def wait_running(self, name: str, other_than: int | None = None, timeout: float = 30.0) -> int:
        """Wait until `name` is RUNNING (with a pid other than `other_than`); return its pid."""
        def ready() -> int | None:
            row = self.processes().get(name, {})
            pid = row.get("pid")
            if row.get("state") == "RUNNING" and pid and pid != other_than:
                return pid
            return None
        return wait_until(ready, timeout, message=lambda: f"{name} RUNNING: {self.processes().get(name)}")

    def kernel_status(self) -> dict[str, Any]:
        with self.client("test-status", timeout=20.0) as c:
            return c.call("kernel", "status")

    def manager_info(self, name: str) -> dict[str, Any] | None:
        return next((m for m in self.kernel_status()["managers"] if m["name"] == name), None)

    def busy(self, name: str) -> int | None:
        """Requests the scheduler has handed manager `name` and not yet seen answered (None: not registered)."""
        info = self.manager_info(name)
        return info["busy"] if info else None

    def client(self, agent: str = "test-agent", **options: Any) -> Any:
        from aios import sdk
        c = sdk.connect(self.run_dir, agent=agent, **options)
        self._clients.append(c)
        return c

    def log(self, name: str) -> str:
        try:
            return (self.run_dir.log_dir / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


class KernelFactory:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.kernels: list[Kernel] = []
        self.run_dirs: list[Path] = []

    def __call__(self, *, echo: bool = True, capacity: int | None = None, managers: list[dict[str, Any]] = (),
                 kernel: dict[str, Any] | None = None, scheduler: dict[str, Any] | None = None,
                 supervisor: dict[str, Any] | None = None, start: bool = True,
                 llm: list[dict[str, Any]] | None = None, context: dict[str, Any] | None = None,
                 builtins: dict[str, dict[str, Any]] | None = None) -> Kernel:
        """A kernel with the echo manager and no LLM core unless asked. Built-in managers
        (`BUILTIN_MANAGERS`: storage, ...) are off unless named in `builtins` ({"storage": {...}}),
        to keep process-tree tests lean; storage then keeps its database in the test's directory."""
        mgrs: list[dict[str, Any]] = []
        if echo:
            m: dict[str, Any] = {"name": "echo", "target": ECHO_TARGET}
            if capacity is not None:
                m["capacity"] = capacity
            mgrs.append(m)
        mgrs += list(managers)
        cfg: dict[str, Any] = {"llm": list(llm or []), "managers": mgrs}
        for name in BUILTIN_MANAGERS:
            table = dict((builtins or {}).get(name, {"enabled": False}))
            if name == "storage" and table.get("enabled", True):
                table.setdefault("path", str(self.base / f"storage-{len(self.run_dirs) + 1}.sqlite3"))
            cfg[name] = table
        if context:
            cfg["context"] = context
        # tests run without a model and want fast failure detection
        cfg["supervisor"] = {"start_timeout_s": 30.0, "stop_timeout_s": 3.0, **(supervisor or {})}
        if kernel:
            cfg["kernel"] = kernel
        if scheduler:
            cfg["scheduler"] = scheduler
        run_dir = Path(tempfile.mkdtemp(prefix="aios-", dir="/tmp"))
        self.run_dirs.append(run_dir)
        config_path = self.base / f"aios-{len(self.run_dirs)}.toml"
        config_path.write_text(dump_toml(cfg))
        k = Kernel(run_dir, config_path)
        self.kernels.append(k)
        if start:
            k.start()
        return k

    def close(self) -> None:
        problems: list[str] = []
        for k in self.kernels:
            k.stop()
            try:
                wait_until(lambda: not any(pid_running(p) for p in k.seen_pids) and not processes_of(k.run_dir),
                           timeout=20.0, message="kernel processes to exit")
            except AssertionError:
                alive = sorted({p for p in k.seen_pids if pid_running(p)} | {p.pid for p in processes_of(k.run_dir)})
                problems.append(f"{k.run_dir.path}: processes survived `aios stop`: {alive}")
                for pid in alive:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            if k.run_dir.ipc_files():
                problems.append(f"{k.run_dir.path}: ipc files left behind: {k.run_dir.ipc_files()}")
        for d in self.run_dirs:
            RunDir(d).remove_external_ipc_dir()
            shutil.rmtree(d, ignore_errors=True)
        assert not problems, "\n".join(problems)
