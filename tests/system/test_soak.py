"""Soak: 16 agents making mixed calls while the scheduler, a manager and an LLM core are each
killed several times. Bounded (about a minute); deselect with `-m "not soak"`.

Holds: every call is answered (a result or an error, never only the client's own timeout); no call
that is not safe to repeat ran twice; calls safe to repeat completed; and at the end every process
runs and every manager's capacity is free again.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter

import pytest

from aios import sdk
from tests.support.kernel import Kernel
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.soak, pytest.mark.timeout(300)]

AGENTS = 16
DURATION_S = 45.0
KILLS_EACH = 3
#: errors a call may end with when the process serving it is killed under it
FAULT_CODES = {"MANAGER_DIED", "UNAVAILABLE", "RETRIES_EXHAUSTED", "SHUTTING_DOWN"}


def _agent(k: Kernel, i: int, stop: threading.Event, outcomes: list[tuple[str, str, str]]) -> None:
    rng = random.Random(i)
    with k.client(f"soak-{i}", timeout=60) as c:
        n = 0
        while not stop.is_set():
            n += 1
            kind = rng.choice(["echo", "peek", "append", "append", "chat"])
            token = f"{i}-{n}"
            try:
                if kind == "echo":
                    assert c.call("echo", "echo", text=token)["text"] == token
                elif kind == "peek":
                    assert c.call("ledger", "peek", token=token, work_s=0.05)["token"] == token
                elif kind == "append":
                    assert c.call("ledger", "append", token=token, work_s=0.05)["token"] == token
                else:
                    reply = c.chat(f"soak {token}", max_tokens=12)
                    assert reply.result["usage"]["completion_tokens"] == 12
                outcomes.append((kind, token, "OK"))
            except sdk.AIOSError as exc:
                outcomes.append((kind, token, exc.code))


def _killer(k: Kernel, stop: threading.Event, kills: Counter[str]) -> None:
    targets = ["scheduler", "ledger", "llm-0"] * KILLS_EACH
    random.Random(7).shuffle(targets)
    gap = DURATION_S / (len(targets) + 1)
    for name in targets:
        if stop.wait(gap):
            return
        try:
            pid = k.wait_running(name, timeout=30)
            os.kill(pid, signal.SIGKILL)
            kills[name] += 1
        except (AssertionError, ProcessLookupError):
            pass


def test_soak_kills_of_scheduler_manager_and_core_lose_and_repeat_nothing(kernel) -> None:
    k = kernel(capacity=4,
               managers=[{"name": "ledger", "target": "tests.support.ledger_manager:LedgerManager"}],
               llm=[{"name": "llm-0", "backend": "sim", "sim_seconds_per_token": 0.005}],
               kernel={"heartbeat_interval_s": 0.5},
               scheduler={"policy": "rr", "time_slice_tokens": 4},
               supervisor={"backoff_initial_s": 0.1, "fast_crash_s": 1.0, "max_fast_crashes": 10})
    stop = threading.Event()
    outcomes: list[tuple[str, str, str]] = []
    kills: Counter[str] = Counter()
    agents = [threading.Thread(target=_agent, args=(k, i, stop, outcomes)) for i in range(AGENTS)]
    killer = threading.Thread(target=_killer, args=(k, stop, kills))
    for t in agents + [killer]:
        t.start()
    time.sleep(DURATION_S)  # the soak's length itself; everything inside is event-driven
    stop.set()
    killer.join(60)
    for t in agents:
        t.join(90)
    assert not any(t.is_alive() for t in agents), "an agent's call was never answered"
    assert kills == Counter({"scheduler": KILLS_EACH, "ledger": KILLS_EACH, "llm-0": KILLS_EACH}), kills

    codes = Counter(code for _, _, code in outcomes)
    print(f"soak: {len(outcomes)} calls, outcomes {dict(codes)}, kills {dict(kills)}")
    assert codes["OK"] > 200, codes
    assert "TIMEOUT" not in codes and "DEADLINE_EXCEEDED" not in codes, codes  # never only the client's timeout
    assert set(codes) <= {"OK"} | FAULT_CODES, codes
    # calls safe to repeat were repeated, not failed, when their process died
    idem_errors = [(kind, code) for kind, _, code in outcomes if kind in ("echo", "peek") and code != "OK"]
    assert len(idem_errors) <= 2, idem_errors

    # nothing ran twice: each append token is in the ledger at most once, and every acknowledged one once
    lines = (k.run_dir.path / "ledger.log").read_text().splitlines()
    written = Counter(line for line in lines if "-" in line)
    assert all(n == 1 for n in written.values()), [t for t, n in written.items() if n > 1]
    acknowledged = {token for kind, token, code in outcomes if kind == "append" and code == "OK"}
    assert acknowledged <= set(written)

    # at the end: everything runs and all capacity is free again
    for name in ("scheduler", "echo", "ledger", "llm-0"):
        k.wait_running(name, timeout=30)
    wait_until(lambda: all(m["busy"] == 0 for m in k.kernel_status()["managers"])
               and len(k.kernel_status()["managers"]) == 3, timeout=30, message="all capacity free")
    with k.client("after-soak", timeout=20) as c:
        assert c.call("echo", "echo", text="done")["text"] == "done"
        assert c.chat("done?", max_tokens=3).result["usage"]["completion_tokens"] == 3
