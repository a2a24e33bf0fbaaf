"""The unit layer's rule holds: every way of starting a process is refused, and recorded."""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
from typing import Callable

import pytest

from tests.support.no_process import ProcessStartRefused

STARTS: dict[str, Callable[[], object]] = {
    "subprocess.run": lambda: subprocess.run([sys.executable, "-c", "pass"], check=False),
    "subprocess.Popen": lambda: subprocess.Popen([sys.executable, "-c", "pass"]),
    "os.fork": lambda: os.fork(),
    "os.posix_spawn": lambda: os.posix_spawn(sys.executable, [sys.executable, "-c", "pass"], os.environ),
    "os.system": lambda: os.system("true"),
    "multiprocessing": lambda: multiprocessing.get_context("fork").Process(target=print).start(),
    "asyncio": lambda: asyncio.run(asyncio.create_subprocess_exec(sys.executable, "-c", "pass")),
}


@pytest.mark.parametrize("how", list(STARTS))
def test_starting_a_process_is_refused_and_recorded(how: str, no_processes: list[str]) -> None:
    with pytest.raises(ProcessStartRefused, match="belongs in tests/system/"):
        STARTS[how]()
    assert len(no_processes) == 1, no_processes
    no_processes.clear()  # seen: this test must not fail at teardown for it


def test_a_swallowed_refusal_is_still_recorded(no_processes: list[str]) -> None:
    try:
        subprocess.run(["true"], check=False)
    except Exception:  # noqa: BLE001 - what careless code under test might do
        pass
    assert no_processes and no_processes[0].startswith("subprocess.Popen(true")
    no_processes.clear()

