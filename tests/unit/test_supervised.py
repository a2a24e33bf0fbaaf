"""`aios.scheduler.supervised.service_down`: the scheduler's refusal of a service the supervisor gave up on."""
from __future__ import annotations

from aios.scheduler.supervised import service_down

EXPECTED = {"flaky": "flaky", "echo": "echo"}


def test_a_refusal_is_confirmed_and_worded_from_a_fresh_read() -> None:
    """The cached table said CRASH-LOOPING; by now the supervisor wrote FATAL: the answer says FATAL
    (seen in a full run: 'flaky is CRASH-LOOPING' for a process already FATAL)."""
    reads: list[bool] = []

    def state(name: str, fresh: bool = False) -> tuple[str, str]:
        reads.append(fresh)
        return ("FATAL", "gave up") if fresh else ("CRASH-LOOPING", "exited with code 1")

    why = service_down(EXPECTED, state, "flaky")
    assert why == "service 'flaky' cannot serve: flaky is FATAL (gave up)" and reads == [False, True]


def test_a_process_restarted_since_the_cached_read_is_not_refused() -> None:
    def state(name: str, fresh: bool = False) -> tuple[str, str]:
        return ("STARTING", "") if fresh else ("CRASH-LOOPING", "exited")

    assert service_down(EXPECTED, state, "flaky") is None


def test_a_running_service_costs_no_fresh_read() -> None:
    reads: list[bool] = []

    def state(name: str, fresh: bool = False) -> tuple[str, str]:
        reads.append(fresh)
        return ("RUNNING", "")

    assert service_down(EXPECTED, state, "echo") is None and reads == [False]
