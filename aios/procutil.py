"""Process helpers shared by the supervisor and its children."""
from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

PR_SET_PDEATHSIG = 1
SUPERVISOR_PID_ENV = "AIOS_SUPERVISOR_PID"


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to signal us when our parent dies (survives exec; no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def exit_with_parent(poll_s: float = 0.5, hard_exit_after_s: float | None = 3.0) -> None:
    """Make a supervised child exit when its supervisor is gone.

    PR_SET_PDEATHSIG (set before exec by the supervisor) delivers SIGTERM at
    once; the watchdog thread covers the race where the parent died before
    that, and children whose SIGTERM handler cannot run (stuck in C code):
    `hard_exit_after_s` after the SIGTERM it exits outright. None leaves the
    SIGTERM to do its work however long it takes: the supervisor itself, when
    its caller asked it to die with it (`aios.kernel.start(exit_with_caller=True)`),
    must stop its whole tree in order, which takes longer than a few seconds.

    The parent is the pid in `SUPERVISOR_PID_ENV`; without it this does nothing.
    """
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    if not expected:
        return
    parent = int(expected)
    set_parent_death_signal(signal.SIGTERM)

    def watch() -> None:
        orphaned_since: float | None = None
        while True:
            if os.getppid() != parent:
                if orphaned_since is None:
                    orphaned_since = time.monotonic()
                    os.kill(os.getpid(), signal.SIGTERM)
                elif hard_exit_after_s is not None and time.monotonic() - orphaned_since > hard_exit_after_s:
                    os._exit(70)
            time.sleep(poll_s)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return True
