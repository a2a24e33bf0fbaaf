"""The unit layer: objects, pure functions and in-process SQLite. No kernel, no socket, no process.

`python -m pytest tests/unit` is the fast layer a developer runs after every
change. Every unit test runs under `no_processes`, which makes starting a process
an error (tests/support/no_process.py).
"""
from __future__ import annotations

from typing import Iterator

import pytest

from tests.support.no_process import ADVICE, refuse_processes


@pytest.fixture(autouse=True)
def no_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Refuse to start processes during the test; fail it if it tried, even if the error was swallowed."""
    attempts = refuse_processes(monkeypatch)
    yield attempts
    if attempts:
        pytest.fail(f"started a process: {', '.join(attempts)} ({ADVICE})", pytrace=False)
