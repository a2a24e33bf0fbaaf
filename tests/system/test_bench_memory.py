"""`aios bench memory --json` runs agents against a real kernel and prints one JSON object."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.paths import AIOS, REPO

pytestmark = [pytest.mark.bench, pytest.mark.timeout(240)]


def test_bench_memory_json() -> None:
    out = subprocess.run([sys.executable, str(AIOS), "bench", "memory", "--agents", "2", "--calls", "150",
                          "--turns", "10", "--budget-mb", "0.25", "--json"],
                         capture_output=True, text=True, timeout=200, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, out.stdout
    r = json.loads(lines[0])
    assert {"ops_per_s", "p99_ms", "compression_ratio", "evictions", "swap_ins", "rss_growth_bytes",
            "budget_bytes"} <= set(r)
    assert r["budget_bytes"] == 256 * 1024 and r["calls"] == 2 * 150
    assert r["evictions"] > 0  # the budget is small enough that eviction ran
    assert r["compression_ratio"] > 1
