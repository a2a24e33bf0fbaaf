"""`aios bench storage --json` runs the kernel and direct SQLite side by side and prints one JSON object."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.paths import AIOS, REPO

pytestmark = [pytest.mark.bench, pytest.mark.timeout(240)]


def test_bench_storage_json() -> None:
    out = subprocess.run([sys.executable, str(AIOS), "bench", "storage", "--agents", "2", "--calls", "20", "--json"],
                         capture_output=True, text=True, timeout=200, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, out.stdout
    r = json.loads(lines[0])
    assert {"kernel_ops_per_s", "direct_ops_per_s", "p99_ms", "versions_compression_ratio"} <= set(r)
    assert r["kernel_ops_per_s"] > 0 and r["direct_ops_per_s"] > 0 and r["p99_ms"] > 0
    assert r["rounds"] == 5 and len(r["by_op"]["write_rounds"]) == 5
    assert r["by_op"]["kernel_write"]["calls"] == 5 * 2 * 20  # pooled over the rounds
    ratios = [x["ratio"] for x in r["by_op"]["write_rounds"]]
    assert r["write_ratio"] == sorted(ratios)[2]  # the median round
    assert r["versions_compression_ratio"] > 5  # 100 appends share their chunks


def test_sigterm_stops_the_temporary_kernel() -> None:
    """`kill` of a running benchmark unwinds like Ctrl-C: its temporary kernel's processes are stopped,
    not left running as orphans."""
    import os
    import signal
    import time

    import psutil

    proc = subprocess.Popen([sys.executable, str(AIOS), "bench", "storage", "--agents", "2", "--calls", "100000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        kernel: list[psutil.Process] = []
        while time.monotonic() < deadline and not kernel:
            time.sleep(0.2)
            kernel = [p for p in psutil.Process(proc.pid).children(recursive=True)
                      if "aios.supervisor" in " ".join(p.cmdline())]
        assert kernel, "the benchmark did not start a kernel"
        tree = [kernel[0], *kernel[0].children(recursive=True)]
        time.sleep(1.0)  # let the timed phase run
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        gone, alive = psutil.wait_procs(tree, timeout=15)
        assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
