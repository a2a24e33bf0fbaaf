"""The README's main job: `aios demo` starts the kernel with the real model, runs agent
processes, prints their answers and the timing table, and stops the kernel."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import AIOS, REPO

pytestmark = pytest.mark.timeout(240)


@pytest.mark.model
def test_demo_runs_agents_on_the_real_model_and_cleans_up() -> None:
    before = {p.name for p in Path("/tmp").glob("aios-demo-*")}
    out = subprocess.run([sys.executable, str(AIOS), "demo", "--policy", "rr", "--agents", "qa,summarizer"],
                         capture_output=True, text=True, timeout=200, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[qa] What is the capital of France?" in out.stdout
    assert "Paris" in out.stdout
    assert "per agent, under policy rr:" in out.stdout
    rows = {line.split()[0]: line.split() for line in out.stdout.split("per agent, under policy rr:")[1].splitlines()
            if line.split() and line.split()[0] in ("qa", "summarizer")}
    assert rows["qa"][1] == "3" and rows["summarizer"][1] == "1"  # requests per agent
    # the summarizer's 64 tokens outlast rr's slice: it is preempted, and its answer must match the
    # uninterrupted fifo baseline character for character
    resume = [line for line in out.stdout.splitlines() if line.startswith("exact resume: summarizer")]
    assert resume and "IDENTICAL" in resume[0], out.stdout[-2000:]
    after = {p.name for p in Path("/tmp").glob("aios-demo-*")}
    assert after <= before, "the demo's temporary run directory must be removed"


def test_demo_refuses_an_unknown_agent() -> None:
    out = subprocess.run([sys.executable, str(AIOS), "demo", "--agents", "nobody"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 2 and "nobody" in out.stderr
