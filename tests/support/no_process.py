"""The rule of the unit layer, enforced: a unit test starts no process.

`refuse_processes` replaces every way Python starts a process (subprocess,
os.fork / forkpty / posix_spawn / system, multiprocessing) with one that raises
`ProcessStartRefused`, and records the attempt, so that a test whose code under
test swallows the exception still fails (tests/unit/conftest.py checks the
record after each test). A test that needs a process belongs in tests/system/.
"""
from __future__ import annotations

import multiprocessing.process
import os
import subprocess
from typing import Any, Callable, NoReturn

import pytest

ADVICE = "a unit test starts no process; a test that needs one belongs in tests/system/"


class ProcessStartRefused(RuntimeError):
    """Raised in place of starting a process during a unit test."""


def _describe(args: tuple[Any, ...]) -> str:
    if not args:
        return ""
    first = args[0]
    if isinstance(first, (list, tuple)):
        first = " ".join(str(a) for a in first)
    text = str(first)
    return text if len(text) <= 120 else text[:117] + "..."


def refuse_processes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make starting a process raise `ProcessStartRefused` until `monkeypatch` is undone.

    Returns the list every refused attempt is appended to (as "how(what)")."""
    attempts: list[str] = []

    def refuse(how: str, args: tuple[Any, ...]) -> NoReturn:
        what = f"{how}({_describe(args)})"
        attempts.append(what)
        raise ProcessStartRefused(f"{what}: {ADVICE}")

    def refusing(how: str) -> Callable[..., NoReturn]:
        def start(*args: Any, **kwargs: Any) -> NoReturn:
            refuse(how, args)
        return start

    class RefusedPopen(subprocess.Popen):  # a subclass, so isinstance checks and annotations still work
        def __new__(cls, *args: Any, **kwargs: Any) -> NoReturn:  # type: ignore[misc]
            refuse("subprocess.Popen", args)

    def refused_process_start(self: multiprocessing.process.BaseProcess) -> NoReturn:
        refuse("multiprocessing.Process.start", (getattr(self, "name", ""),))

    monkeypatch.setattr(subprocess, "Popen", RefusedPopen)
    # the low-level path every Popen takes, for code that kept a reference to the real class
    monkeypatch.setattr(subprocess, "_fork_exec", refusing("subprocess fork_exec"), raising=False)
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        monkeypatch.setattr(os, name, refusing(f"os.{name}"), raising=False)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refused_process_start)
    return attempts
