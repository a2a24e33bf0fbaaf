"""`aios bench tools --json` runs a real kernel and prints one JSON object keyed by tool name."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.paths import AIOS, REPO

pytestmark = [pytest.mark.bench, pytest.mark.timeout(180)]


def test_bench_tools_json_shape_and_limits() -> None:
    out = subprocess.run([sys.executable, str(AIOS), "bench", "tools", "--agents", "4", "--slow-calls", "4",
                          "--fast-calls", "10", "--slow-ms", "50", "--json"],
                         capture_output=True, text=True, timeout=150, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, out.stdout  # exactly one JSON object (progress goes to stderr)
    report = json.loads(lines[0])
    assert set(report) == {"bench_slow", "bench_fast"}
    for tool, r in report.items():
        assert {"limit", "max_concurrency_seen", "calls", "queue_p99_ms"} <= set(r)
        assert 1 <= r["max_concurrency_seen"] <= r["limit"], (tool, r)
    assert report["bench_slow"]["calls"] == 2 * 4 and report["bench_fast"]["calls"] == 2 * 10
    assert report["bench_slow"]["max_concurrency_seen"] == 2  # the deep queue keeps both slots busy
