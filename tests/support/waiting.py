"""Synchronising with other threads and processes without fixed sleeps.

A test never sleeps for a guessed time and never asserts on a duration: it polls
for the condition it needs with `wait_until`, whose timeout is only a bound on
how long a failing test hangs.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
               message: str | Callable[[], str] = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; return that value.

    Exceptions raised by the predicate count as "not yet" (the last one is
    reported if time runs out).
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - a predicate may race with a restarting process
            last_exc = exc
        if time.monotonic() >= deadline:
            what = message() if callable(message) else message
            extra = f" (last error: {last_exc!r})" if last_exc is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run `fn` in a started thread; the dict gets "result" or "error", and "elapsed" seconds."""
    out: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            out["error"] = exc
        out["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=run)
    t.start()
    return t, out
