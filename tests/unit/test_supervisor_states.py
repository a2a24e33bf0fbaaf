"""The supervisor's process states: every move is checked against `PROCESS_MOVES`.

The table is driven twice: pair by pair on a bare `Proc`, and through the
supervisor's own code (start, READY, crash, backoff, restart, fatal, stop) on
stand-in processes. `StandInProcess` is a STAND-IN for `subprocess.Popen`, not
a process: a unit test starts none (tests/unit/conftest.py), so the supervisor
under test launches stand-ins, and the signals it sends are recorded, never
sent. Readiness comes from a stand-in for its probe, which says which managers
the scheduler has registered.
"""
from __future__ import annotations

import itertools
import json
import logging
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from aios.config import NO_BUILTINS, Config
from aios.rundir import RunDir
from aios.scheduler.request import IllegalTransition
from aios.supervisor import PROCESS_MOVES, Proc, ProcessState, StartupError, Supervisor

S = ProcessState

#: The lifecycle, written out independently of the code's table.
LEGAL: set[tuple[ProcessState, ProcessState]] = {
    (S.STOPPED, S.STARTING),
    (S.STARTING, S.RUNNING), (S.STARTING, S.BACKOFF), (S.STARTING, S.FATAL), (S.STARTING, S.STOPPING),
    (S.STARTING, S.STOPPED),
    (S.RUNNING, S.BACKOFF), (S.RUNNING, S.FATAL), (S.RUNNING, S.STOPPING), (S.RUNNING, S.STOPPED),
    (S.BACKOFF, S.STARTING), (S.BACKOFF, S.STOPPED),
    (S.STOPPING, S.STOPPED),
}


class StandInProcess:
    """A stand-in for `subprocess.Popen`: `poll()`, `pid`, `returncode`, and the calls a stop makes.
    It "exits" when the test says so or when a signal reaches it."""

    #: above any real pid (Linux's pid_max is at most 2**22), so nothing can mistake one for a process
    _pids = itertools.count(10**9)

    def __init__(self) -> None:
        self.pid = next(self._pids)
        self.returncode: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.returncode

    def exit(self, code: int) -> None:
        self.returncode = code

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        if self.returncode is None:
            self.returncode = -sig

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            raise subprocess.TimeoutExpired("stand-in", timeout or 0)
        return self.returncode


class StandInProbe:
    """A stand-in for the supervisor's `Probe`: the scheduler's status, with the managers in
    `registered` listed under their current pids."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.registered: set[str] = set()

    def status(self, timeout: float = 1.0) -> dict[str, Any]:
        return {"managers": [{"name": p.name, "pid": p.pid} for p in self.sup.procs[1:] if p.name in self.registered]}

    def close(self) -> None:
        pass


class StandInSupervisor(Supervisor):
    """The real supervisor, launching stand-ins and recording the signals it would send to process groups."""

    def __init__(self, run_dir: RunDir, config: Config) -> None:
        super().__init__(run_dir, config)
        self.launched: dict[str, list[StandInProcess]] = {p.name: [] for p in self.procs}
        self.group_signals: list[tuple[str, int]] = []
        self.probe_stand_in = StandInProbe(self)
        self._probe = self.probe_stand_in  # type: ignore[assignment]

    def _launch(self, proc: Proc) -> Any:
        stand_in = StandInProcess()
        self.launched[proc.name].append(stand_in)
        return stand_in

    def _signal_group(self, proc: Proc, sig: int) -> None:  # type: ignore[override]
        if proc.popen is not None:
            self.group_signals.append((proc.name, sig))

    def current(self, name: str) -> StandInProcess:
        return self.launched[name][-1]

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def table(self) -> dict[str, str]:
        """The states as processes.json shows them (what `aios status` reads)."""
        rows = json.loads(self.run_dir.state_file.read_text())["processes"]
        return {row["name"]: row["state"] for row in rows}


def make_supervisor(tmp_path: Path, **supervisor: Any) -> StandInSupervisor:
    echo = "tests.support.echo_manager:EchoManager"
    config = Config.model_validate({
        "llm": [], **NO_BUILTINS,
        "managers": [{"name": "crasher", "target": echo}, {"name": "steady", "target": echo}],
        # fast_crash_s is an hour so that every crash here counts as fast, however slow the machine
        "supervisor": {"backoff_initial_s": 0.0, "fast_crash_s": 3600.0, "max_fast_crashes": 1, **supervisor},
    })
    return StandInSupervisor(RunDir(tmp_path), config)


# ------------------------------------------------------------------ the table itself
def test_the_table_is_the_lifecycle() -> None:
    assert {(a, b) for a, tos in PROCESS_MOVES.items() for b in tos} == LEGAL
    assert set(PROCESS_MOVES) == set(ProcessState)


@pytest.mark.parametrize("frm,to", list(itertools.product(ProcessState, ProcessState)),
                         ids=lambda s: s.value)
def test_every_pair_is_allowed_or_refused_without_changing_the_state(frm: ProcessState, to: ProcessState) -> None:
    proc = Proc("p", [], "svc", state=frm)
    assert proc.can_move(to) == ((frm, to) in LEGAL)
    if (frm, to) in LEGAL:
        proc.move(to)
        assert proc.state == to
    else:
        with pytest.raises(IllegalTransition, match=f"p cannot go from {frm.value} to {to.value}"):
            proc.move(to)
        assert proc.state == frm


# -------------------------------------------------------- through the supervisor's code
def test_start_crash_backoff_restart_fatal_and_stop(tmp_path: Path) -> None:
    sup = make_supervisor(tmp_path)
    sup.probe_stand_in.registered = {"crasher", "steady"}
    assert {p.state for p in sup.procs} == {S.STOPPED}

    sup.start_all()  # spawned, then promoted by the (stand-in) probe's answer
    assert sup.table() == {"scheduler": "RUNNING", "crasher": "RUNNING", "steady": "RUNNING"}

    first = sup.current("crasher")
    first.exit(1)  # crash; the scheduler forgets it
    sup.probe_stand_in.registered.discard("crasher")
    sup.watch_once()
    crasher = sup.proc("crasher")
    assert crasher.state == S.BACKOFF and crasher.fast_crashes == 1
    assert crasher.message.startswith("exited with code 1") and sup.table()["crasher"] == "BACKOFF"

    sup.watch_once()  # the backoff (0 s here) is over: restarted
    second = sup.current("crasher")
    assert second is not first and crasher.state == S.STARTING and crasher.restarts == 1
    sup.probe_stand_in.registered.add("crasher")  # READY under its new pid
    sup.probe(force=True)
    assert crasher.state == S.RUNNING

    second.exit(1)  # a second fast crash: more than max_fast_crashes (1)
    sup.watch_once()
    assert crasher.state == S.FATAL and "gave up" in crasher.message
    sup.watch_once()
    assert crasher.state == S.FATAL and len(sup.launched["crasher"]) == 2  # never restarted

    sup.current("steady").exit(1)  # crashed, waiting in BACKOFF when the stop comes
    sup.watch_once()
    assert sup.proc("steady").state == S.BACKOFF
    sup.stop_all()
    assert sup.table() == {"scheduler": "STOPPED", "crasher": "FATAL", "steady": "STOPPED"}
    assert sup.current("scheduler").signals == [signal.SIGINT]  # asked first, and it went
    assert sup.launched["steady"][0].signals == []  # already gone: nothing to ask


def test_a_manager_that_dies_before_ready_is_fatal_at_start(tmp_path: Path) -> None:
    sup = make_supervisor(tmp_path)
    sup.probe_stand_in.registered = {"steady"}  # crasher never says READY

    original_launch = sup._launch

    def launch_dying(proc: Proc) -> Any:
        stand_in = original_launch(proc)
        if proc.name == "crasher":
            stand_in.exit(3)
        return stand_in

    sup._launch = launch_dying  # type: ignore[method-assign]
    with pytest.raises(StartupError, match="crasher exited with code 3 before it was ready"):
        sup.start_all()
    assert sup.proc("crasher").state == S.FATAL
    sup.stop_all()
    assert sup.table() == {"scheduler": "STOPPED", "crasher": "FATAL", "steady": "STOPPED"}


def test_an_illegal_move_is_logged_and_leaves_the_books_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sup = make_supervisor(tmp_path)
    sup.probe_stand_in.registered = {"crasher", "steady"}
    sup.start_all()
    steady = sup.proc("steady")
    running = sup.current("steady")
    caplog.set_level(logging.ERROR, logger="aios.supervisor")

    sup.spawn(steady)  # a second start of a running process: refused before anything is launched
    assert steady.state == S.RUNNING and steady.popen is running and len(sup.launched["steady"]) == 1

    assert not sup._move(steady, S.STARTING)
    assert steady.state == S.RUNNING
    assert [r.getMessage() for r in caplog.records] == [
        "not starting steady: it is RUNNING", "process steady cannot go from RUNNING to STARTING"]
    sup.stop_all()


# ------------------------------------------------------------- a FATAL scheduler (issue 17 item 3)
def _crash_scheduler(sup: StandInSupervisor) -> Proc:
    """The current scheduler dies; the supervisor sees it; a pending backoff is cut short, so the
    next `watch_once` restarts it at once, however long its backoff."""
    sched = sup.proc("scheduler")
    sup.current("scheduler").exit(-9)
    sup.watch_once()
    return sched


def test_a_fatal_scheduler_stops_the_kernel_and_says_why(tmp_path: Path) -> None:
    sup = make_supervisor(tmp_path, max_fast_crashes=2)
    sup.probe_stand_in.registered = {"crasher", "steady"}
    sup.start_all()
    for _ in range(2):
        sched = _crash_scheduler(sup)
        assert sched.state == S.BACKOFF and not sup.stopping
        sup.watch_once()  # restarted (a 0 s backoff here) ...
        sup.probe(force=True)  # ... and READY
        assert sched.state == S.RUNNING
    sched = _crash_scheduler(sup)  # the third fast crash: more than max_fast_crashes (2)
    assert sched.state == S.FATAL and sup.stopping
    assert "the scheduler is FATAL" in sup.stop_message and 'on_scheduler_fatal = "stop"' in sup.stop_message
    assert "crashed 3 times" in sup.stop_message and "exited with code -9" in sup.stop_message
    sup.stop_all()  # what run_forever does once `stopping` is set
    state = json.loads(sup.run_dir.state_file.read_text())
    assert state["supervisor"]["message"] == sup.stop_message
    assert sup.table() == {"scheduler": "FATAL", "crasher": "STOPPED", "steady": "STOPPED"}


def test_on_scheduler_fatal_restart_keeps_restarting_it_with_backoff_capped_at_30s(tmp_path: Path) -> None:
    sup = make_supervisor(tmp_path, max_fast_crashes=1, backoff_initial_s=10.0, backoff_max_s=8.0,
                          on_scheduler_fatal="restart")
    sup.probe_stand_in.registered = {"crasher", "steady"}
    sup.start_all()
    delays = []
    for crash in range(1, 6):
        sched = _crash_scheduler(sup)
        assert sched.state == S.BACKOFF and not sup.stopping and not sup.stop_message
        delays.append(float(sched.message.split("restarting in ")[1].split("s")[0]))
        assert ('on_scheduler_fatal = "restart"' in sched.message) == (crash > 1)  # past the limit: says so
        row = json.loads(sup.run_dir.state_file.read_text())["processes"][0]
        assert row["state"] == "BACKOFF" and row["restart_at"] is not None
        sched.next_start = 0.0  # no waiting in a unit test
        sup.watch_once()
        sup.probe(force=True)
        assert sched.state == S.RUNNING
    # within the fast-crash limit the usual cap (backoff_max_s = 8); past it, up to 30 s
    assert delays == [8.0, 20.0, 30.0, 30.0, 30.0]
    assert len(sup.launched["scheduler"]) == 6
    sup.stop_all()
    assert "message" not in json.loads(sup.run_dir.state_file.read_text())["supervisor"]
