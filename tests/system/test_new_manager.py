"""A manager is one module plus one configuration entry, for status and the SDK too."""
from __future__ import annotations

import json

import pytest


pytestmark = pytest.mark.timeout(120)

GAUGE = {"name": "gauge", "target": "tests.support.gauge_manager:GaugeManager"}


def test_a_new_manager_gets_the_sdk_and_its_own_status_line_from_one_entry(kernel) -> None:
    """`tests/support/gauge_manager.py` is named in `[[managers]]` and nowhere else: the kernel, the
    CLI and the status view have no line about it, yet `aios status -v` prints its summary, and
    `--json -v` its figures; the echo manager, which writes no line, gets the generic one."""
    k = kernel(managers=[GAUGE])
    with k.client("adder", timeout=20) as c:
        assert c.call("gauge", "add", n=2) == {"total": 2}
        assert c.call("gauge", "add", n=3) == {"total": 5}
        assert c.call("gauge", "status") == {"total": 5, "calls": 2, "summary": "total 5 from 2 calls"}
    verbose = k.aios("status", "-v")
    assert verbose.returncode == 0, verbose.stderr
    lines = verbose.stdout.splitlines()
    assert "gauge: total 5 from 2 calls" in lines
    assert any(line.startswith("echo: echo service, capacity 2; ops: ") for line in lines), lines
    details = json.loads(k.aios("status", "--json", "-v").stdout)["details"]
    assert details["gauge"] == {"total": 5, "calls": 2, "summary": "total 5 from 2 calls"}
    assert set(details) == {"echo", "gauge"}
