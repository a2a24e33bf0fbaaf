"""`aios bench syscall` runs end to end and reports its figures (never asserts on speed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from aios.config import NO_BUILTINS
from tests.support.paths import REPO

pytestmark = pytest.mark.bench

AGENTS, CALLS = 4, 50


@pytest.mark.timeout(120)
def test_bench_syscall_json() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(REPO / "bin" / "aios"), "bench", "syscall",
         "--agents", str(AGENTS), "--calls", str(CALLS), "--json"],
        capture_output=True, text=True, timeout=110, cwd=REPO, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # one JSON object and nothing else on stdout
    for key in ("p50_us", "p99_us", "throughput", "baseline_p50_us", "baseline_p99_us", "baseline_throughput",
                "single_p50_us", "baseline_single_p50_us"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, (key, result[key])
    assert result["p99_us"] >= result["p50_us"]
    assert result["baseline_p99_us"] >= result["baseline_p50_us"]
    assert result["agents"] == AGENTS and result["calls"] == CALLS
    assert result["calls_total"] == AGENTS * CALLS
    assert result["baseline_calls_total"] == AGENTS * CALLS
    assert isinstance(result["goals"]["p50_ratio_met"], bool)
    assert "[bench syscall]" in proc.stderr  # progress goes to stderr, not into the JSON
    # the temporary kernel is gone: no process of it left, its directory removed
    assert result["temporary_kernel"] is True
    run_dir = result["run_dir"]
    assert not Path(run_dir).exists()
    leftovers = [p.info for p in psutil.process_iter(["pid", "cmdline"])
                 if run_dir in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, leftovers


def test_bench_syscall_refuses_a_run_dir_without_a_kernel(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bin" / "aios"), "bench", "syscall", "--run-dir", str(tmp_path / "none"),
         "--agents", "1", "--calls", "1"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert proc.returncode == 1
    assert "no kernel running" in proc.stderr


def test_temporary_kernel_starts_answers_and_cleans_up() -> None:
    from aios.bench.common import temporary_kernel
    from aios.sdk import connect

    with temporary_kernel({"llm": [], **NO_BUILTINS}, policy="rr") as run_dir:
        with connect(run_dir, agent="t", timeout=10) as client:
            assert client.call("kernel", "ping") == {"pong": True}
            assert client.call("kernel", "status")["scheduler"]["policy"] == "rr"
        pids = [p["pid"] for p in run_dir.read_state()["processes"]] + [run_dir.read_pid()]
    assert not run_dir.path.parent.exists()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in pids if pid)


def test_temporary_kernel_reports_a_bad_config() -> None:
    from aios.bench.common import TemporaryKernelError, temporary_kernel

    with pytest.raises(TemporaryKernelError, match="bogus"):
        with temporary_kernel({"llm": [], "kernel": {"bogus": 1}}):
            pass
