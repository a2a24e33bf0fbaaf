"""`aios bench llm --concurrency` on the labelled SIMULATED backend: the command runs a batched and a
one-at-a-time core side by side and prints one JSON object with the figures the issue specifies.
No assertion here is about speed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.paths import AIOS, REPO

pytestmark = [pytest.mark.bench, pytest.mark.timeout(240)]


def test_bench_llm_concurrency_sim_prints_one_json_object() -> None:
    out = subprocess.run(
        [sys.executable, str(AIOS), "bench", "llm", "--concurrency", "--backend", "sim", "--levels", "1,2,4",
         "--tokens", "6", "--rounds", "1", "--max-batch", "4", "--sim-speedup", "2", "--json"],
        capture_output=True, text=True, timeout=200, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)  # exactly one JSON object on stdout; progress went to stderr
    assert set(data) == {"concurrency", "unbatched_tokens_per_s", "details"}
    assert set(data["concurrency"]) == {"1", "2", "4"} and all(v > 0 for v in data["concurrency"].values())
    assert data["unbatched_tokens_per_s"] > 0
    d = data["details"]["concurrency"]
    assert d["simulated"] is True and d["max_batch"] == 4 and d["sim_speedup"] == 2
    assert set(d["speedup"]) == {"1", "2", "4"}
    assert "concurrency" in out.stderr  # progress lines


def test_bench_llm_concurrency_sim_report_is_labelled() -> None:
    out = subprocess.run(
        [sys.executable, str(AIOS), "bench", "llm", "--concurrency", "--backend", "sim", "--levels", "1,2",
         "--tokens", "4", "--rounds", "1", "--max-batch", "2"],
        capture_output=True, text=True, timeout=200, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SIMULATED" in out.stdout and "one-at-a-time" in out.stdout
    assert "goals:" not in out.stdout  # goals are about the real model, not the simulation


@pytest.mark.model
def test_raw_llamacpp_reference_runs_the_workload_without_a_kernel() -> None:
    """The reference the batched core's goal is stated against: the real model, straight on llama.cpp."""
    out = subprocess.run([sys.executable, "-m", "aios.bench.llamacpp_raw", "--levels", "1,2", "--tokens", "4"],
                         capture_output=True, text=True, timeout=200, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)
    assert set(data) == {"batched", "one_at_a_time", "speedup"}
    for part in data.values():
        assert set(part) == {"1", "2"} and all(v > 0 for v in part.values())
    assert data["speedup"]["2"] == pytest.approx(data["batched"]["2"] / data["one_at_a_time"]["2"], rel=0.01)


@pytest.mark.model
@pytest.mark.timeout(400)
def test_bench_llm_concurrency_real_model_reports_the_raw_reference() -> None:
    out = subprocess.run(
        [sys.executable, str(AIOS), "bench", "llm", "--concurrency", "--levels", "1,2", "--tokens", "4",
         "--rounds", "1", "--max-batch", "2", "--json"],
        capture_output=True, text=True, timeout=380, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)
    assert set(data["raw_speedup"]) == set(data["of_raw"]) == {"1", "2"}
    d = data["details"]["concurrency"]
    assert len(d["raw_llamacpp_runs"]) == 1 and d["simulated"] is False
    assert data["of_raw"]["2"] == pytest.approx(d["speedup"]["2"] / data["raw_speedup"]["2"], abs=0.002)
    assert "llama.cpp directly" in out.stderr  # its progress line
