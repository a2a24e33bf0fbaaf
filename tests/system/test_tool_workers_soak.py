"""Soak: 40 agents calling tools for 60 s, more agents than the tool manager keeps warm workers for.

Issue 17: 30 agents calling `calculator` pushed the tool manager to more than 1,000 live workers and
3,000 open files within a minute (each evicted worker was ended by one thread, waiting up to 0.5 s for
it), until select() failed past descriptor 1023 and 38-50% of calls ended INTERNAL. Holds: at most
`max_workers + 1` worker processes at any moment (the tool manager's children, counted until reaped),
its descriptors under 512, and no INTERNAL. A tenth of the calls run the `python` tool, which takes a
fresh worker every call.
"""
from __future__ import annotations

import random
import threading
import time
from collections import Counter

import psutil
import pytest

from aios import sdk
from tests.support.kernel import Kernel

pytestmark = [pytest.mark.soak, pytest.mark.timeout(300)]

AGENTS = 40
DURATION_S = 60.0
MAX_WORKERS = 32  # the default of [tools] max_workers


def _agent(k: Kernel, i: int, stop: threading.Event, codes: Counter[str], lock: threading.Lock) -> None:
    rng = random.Random(i)
    with k.client(f"toolsoak-{i}", timeout=60) as c:
        while not stop.is_set():
            try:
                if rng.random() < 0.1:
                    assert c.tools.call("python", code=f"print({i} * 2)")["stdout"] == f"{i * 2}\n"
                else:
                    assert c.tools.call("calculator", expression=f"{i} + 1")["value"] == i + 1
                code = "OK"
            except sdk.AIOSError as exc:
                code = exc.code
            with lock:
                codes[code] += 1


def test_forty_agents_never_push_workers_or_descriptors_past_their_bounds(kernel) -> None:
    k = kernel(echo=False, builtins={"tools": {}})
    manager = psutil.Process(k.pid("tools"))
    stop = threading.Event()
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    agents = [threading.Thread(target=_agent, args=(k, i, stop, codes, lock)) for i in range(AGENTS)]
    for t in agents:
        t.start()
    peak_workers = peak_fds = 0
    ends = time.monotonic() + DURATION_S
    try:
        while time.monotonic() < ends:
            peak_workers = max(peak_workers, len(manager.children()))
            peak_fds = max(peak_fds, manager.num_fds())
            time.sleep(0.05)
    finally:
        stop.set()
        for t in agents:
            t.join(90)
    print(f"tool soak: {dict(codes)}; at most {peak_workers} workers and {peak_fds} descriptors")
    assert k.processes()["tools"]["restarts"] == 0
    assert codes["INTERNAL"] == 0, codes
    assert codes["OK"] > AGENTS, codes  # every agent got through, more than once
    assert peak_workers <= MAX_WORKERS + 1, f"{peak_workers} worker processes at once"
    assert peak_fds < 512, f"the tool manager held {peak_fds} descriptors"
    status = k.aios("status", "-v")
    assert f"/{MAX_WORKERS} live" in status.stdout, status.stdout
