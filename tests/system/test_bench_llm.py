"""`aios bench llm` on the labelled SIMULATED backend (fixed seconds per token, no model):
the command runs every policy on a real kernel and prints the JSON the issue specifies.
No assertion here is about speed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.paths import AIOS, REPO

pytestmark = [pytest.mark.bench, pytest.mark.timeout(240)]


def test_bench_llm_sim_json_has_every_policy_and_class() -> None:
    out = subprocess.run(
        [sys.executable, str(AIOS), "bench", "llm", "--backend", "sim", "--short", "4", "--long", "2",
         "--short-tokens", "8", "--long-tokens", "40", "--slice", "8", "--short-rounds", "2", "--json"],
        capture_output=True, text=True, timeout=200, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)
    assert set(data) == {"direct", "fifo", "rr", "las"}
    assert data["direct"]["simulated"] is True
    expected_tokens = 4 * 2 * 8 + 2 * 40
    assert data["direct"]["tokens"] == expected_tokens and data["direct"]["tokens_per_s"] > 0
    for policy in ("fifo", "rr", "las"):
        r = data[policy]
        assert r["tokens"] == expected_tokens, (policy, r)
        assert r["tokens_per_s"] > 0 and 0 <= r["switch_overhead_frac"] < 1
        for cls, count in (("short", 8), ("long", 2)):
            s = r[cls]
            assert s["count"] == count
            assert 0 <= s["wait_mean_s"] <= s["turnaround_mean_s"] <= s["turnaround_p99_s"] + 1e-9
    assert data["fifo"]["preemptions"] == 0
    assert data["rr"]["preemptions"] >= 2 * (40 // 8 - 1)
    assert data["las"]["context"]["snapshots"] == 0
