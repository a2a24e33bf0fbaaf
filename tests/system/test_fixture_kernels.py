"""A kernel a test starts dies with the test process, however that process ends (issue 17, item 13).

An interrupted pytest used to leave its fixture kernels running, re-parented to init. The
`kernel` fixture now starts them with `aios.kernel.start(exit_with_caller=True)`: the supervisor
gets the parent-death signal and watchdog it already gives its own children, and stops its
whole tree in order. Checked here the hard way: a real pytest run, holding a fixture kernel, is
SIGKILLed (so no teardown of any kind runs), and every process of that kernel must go.
"""
from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from aios.rundir import RunDir
from tests.support.kernel import pid_running, processes_of
from tests.support.paths import REPO
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(150)

#: a test module for the inner pytest: it starts a fixture kernel, says where, and waits to be killed
HOLDER = '''
import json
import time


def test_hold_a_kernel(kernel):
    k = kernel()
    k.remember_pids()
    print("KERNEL " + json.dumps({"run_dir": str(k.run_dir.path), "pids": sorted(k.seen_pids)}), flush=True)
    time.sleep(600)
'''


def _read_marker(proc: subprocess.Popen[str], deadline_s: float) -> dict[str, Any]:
    """The inner run's "KERNEL {...}" line (its kernel is up), or fail with what it printed."""
    assert proc.stdout is not None
    seen: list[str] = []
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + deadline_s
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("KERNEL "):
                return json.loads(line[len("KERNEL "):])
    finally:
        sel.close()
    raise AssertionError("the inner pytest never started its kernel:\n" + "".join(seen[-40:]))


def test_a_killed_pytest_takes_its_fixture_kernel_with_it(tmp_path: Path) -> None:
    (tmp_path / "test_holder.py").write_text(HOLDER)
    inner = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "tests.system.conftest",
         "--basetemp", str(tmp_path / "inner-tmp"), str(tmp_path / "test_holder.py")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    run_dir: RunDir | None = None
    pids: list[int] = []
    try:
        held = _read_marker(inner, deadline_s=90)
        run_dir, pids = RunDir(held["run_dir"]), held["pids"]
        assert len(pids) >= 3 and all(pid_running(p) for p in pids)  # supervisor, scheduler, echo manager

        inner.send_signal(signal.SIGKILL)  # no teardown, no finally, no atexit: only the kernel's own binding
        inner.wait(timeout=10)

        wait_until(lambda: not any(pid_running(p) for p in pids) and not processes_of(run_dir), timeout=30,
                   message=lambda: f"the kernel of a killed pytest to exit; alive: "
                                   f"{[p for p in pids if pid_running(p)]}")
        assert run_dir.ipc_files() == [], "the supervisor stopped in order, removing its endpoints"
        assert run_dir.supervisor_pid() is None
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.wait(timeout=10)
        if run_dir is not None:  # before the fix the kernel is still running: do not leave it behind
            from aios import kernel as lifecycle
            lifecycle.stop(run_dir, timeout=10)
            for pid in pids:
                if pid_running(pid):
                    os.kill(pid, signal.SIGKILL)
            run_dir.remove_external_ipc_dir()
            shutil.rmtree(run_dir.path, ignore_errors=True)
