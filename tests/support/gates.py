"""Gates: a test holds a handler (a manager op, a tool, an MCP tool) until it says go.

A test that needs something to be *still running* when it looks (two slots busy, a queue
behind them, a call in flight when a process is killed) used to start a sleep and hope to
look before it ended; on a busy machine the look came too late. With a gate the handler
waits for the test instead: it runs until the test opens the gate, whatever the machine's
speed.

A gate is a file path. The handler waits until the file exists, or until the gates'
folder is gone (a test that ends without opening a gate must not leave handlers blocked:
the fixture removes the folder at teardown, which releases them), or until its request is
cancelled. Gates live under /var/tmp: a tool worker runs in a jail with a private /tmp and
the run directory hidden, but sees the rest of the machine read-only and live.

    def test_x(kernel, gates):
        gate = gates.new()
        ... c.call("echo", "sleep", seconds=0, gate=gate.path) ...  # runs until gate.open()

Handlers in processes that cannot import this module (tool workers) repeat `wait_at_gate`'s
few lines.
"""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

#: how often a waiting handler looks at its gate (an event check, not a speed assumption)
POLL_S = 0.01


def _root() -> str:
    """/var/tmp when it is there and writable (tool jails see it), else the temp directory."""
    if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK | os.X_OK):
        return "/var/tmp"
    return tempfile.gettempdir()


def wait_at_gate(path: str, cancelled: threading.Event | None = None) -> bool:
    """Wait until the gate at `path` opens (True) or `cancelled` is set (False). A gate whose
    folder is gone counts as open. An empty path is no gate."""
    if not path:
        return True
    folder = os.path.dirname(path)
    while not os.path.exists(path) and os.path.isdir(folder):
        if cancelled is None:
            time.sleep(POLL_S)
        elif cancelled.wait(POLL_S):
            return False
    return True


class Gate:
    """One gate: `path` goes to the handler, `open()` lets it go on."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def open(self) -> None:
        Path(self.path).touch()

    @property
    def is_open(self) -> bool:
        return os.path.exists(self.path)


class Gates:
    """A folder of gates for one test; `close()` removes it, releasing every handler still waiting."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="aios-gates-", dir=_root()))
        self.folder.chmod(0o755)  # a tool jail runs as nobody: it must be able to look inside
        self._names = itertools.count(1)

    def new(self, name: str = "gate") -> Gate:
        return Gate(self.folder / f"{name}-{next(self._names)}")

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
