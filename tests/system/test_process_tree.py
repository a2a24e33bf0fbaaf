"""Process-tree tests: the real supervisor, scheduler and managers, started with bin/aios-start."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import psutil
import pytest

from aios import sdk
from aios.sdk import KernelError
from tests.support.kernel import pid_running, processes_of
from tests.support.network import free_port
from tests.support.paths import AIOS_START, REPO
from tests.support.waiting import wait_until

FLAKY = {"name": "flaky", "target": "tests.support.crash_managers:FlakyManager"}


def test_start_status_stop(kernel) -> None:
    k = kernel(managers=[{"name": "echo2", "target": "tests.support.echo_manager:EchoManager", "capacity": 3}])
    status = k.status()
    assert status["running"] is True
    assert status["supervisor_pid"] == k.supervisor_pid
    rows = status["processes"]
    assert [p["name"] for p in rows] == ["scheduler", "echo", "echo2"]
    for p in rows:
        assert set(p) == {"name", "pid", "state", "restarts", "message"}
        assert p["state"] == "RUNNING" and p["restarts"] == 0 and p["message"] == ""
    pids = [p["pid"] for p in rows]
    assert len(set(pids + [k.supervisor_pid])) == len(pids) + 1  # each its own process

    supervisor = psutil.Process(k.supervisor_pid)
    assert supervisor.is_running()
    for p in rows:
        proc = psutil.Process(p["pid"])
        assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        assert proc.ppid() == k.supervisor_pid
        cmd = " ".join(proc.cmdline())
        module = "aios.scheduler.broker" if p["name"] == "scheduler" else "aios.managers.runner"
        assert module in cmd and str(k.run_dir.path) in cmd
        assert os.getpgid(p["pid"]) == p["pid"]  # own process group, so stop can kill the group
    assert {c.pid for c in supervisor.children()} == set(pids)

    # both managers registered with the scheduler, under the pids the supervisor knows
    ks = k.kernel_status()
    assert ks["scheduler"]["pid"] == pids[0]
    assert {(m["name"], m["pid"], m["capacity"]) for m in ks["managers"]} == {
        ("echo", pids[1], 2), ("echo2", pids[2], 3)}
    assert k.run_dir.ipc_files(), "the ipc endpoints exist while the kernel runs"
    assert oct(k.run_dir.path.stat().st_mode & 0o777) == "0o700"
    assert oct(k.run_dir.key_file.stat().st_mode & 0o777) == "0o600"

    result = k.aios("stop")  # the command line's stop, as a user runs it
    assert result.returncode == 0, result.stderr
    assert "stopped the kernel" in result.stdout
    for pid in pids + [k.supervisor_pid or supervisor.pid]:
        assert not pid_running(pid)
    assert not pid_running(supervisor.pid)
    assert processes_of(k.run_dir) == []
    assert k.run_dir.ipc_files() == []
    assert not k.run_dir.pid_file.exists()
    after = k.status()
    assert after["running"] is False and after["processes"] == []


def test_sdk_round_trip_and_reply_timing(kernel) -> None:
    k = kernel()
    with k.client("alice") as c:
        assert c.call("kernel", "ping") == {"pong": True}
        reply = c.request("echo", "echo", {"text": "hi"})
        assert reply.result["text"] == "hi" and reply.result["agent"] == "alice"
        assert reply.result["pid"] == k.pid("echo")
        assert set(reply.timing) >= {"wait_s", "run_s", "turnaround_s"}
        assert reply.timing["turnaround_s"] >= reply.timing["run_s"] >= 0
        with pytest.raises(sdk.NotFound, match="nothing called 'x'"):
            c.call("echo", "fail", text="x")


@pytest.mark.timeout(120)
def test_kill9_manager_restarts_and_queued_requests_survive(kernel, gates) -> None:
    """Two sleeps held at a gate on the manager, four queued behind them; kill -9 the manager. The
    gate opens only after the new incarnation runs, so exactly the two that were running run twice."""
    k = kernel(capacity=2)
    old_pid = k.pid("echo")
    gate = gates.new()
    results: dict[int, Any] = {}
    errors: dict[int, BaseException] = {}

    def call(i: int) -> None:
        try:
            with sdk.connect(k.run_dir, agent=f"a{i}", timeout=90.0) as c:
                results[i] = c.request("echo", "sleep", {"seconds": 0.2, "tag": f"t{i}", "gate": gate.path},
                                       idempotent=True).result
        except BaseException as exc:  # noqa: BLE001
            errors[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    # two running on the manager, four queued behind them
    wait_until(lambda: k.busy("echo") == 2 and k.kernel_status()["queues"]["echo"] == 4,
               timeout=30, message="2 running + 4 queued sleeps")
    os.kill(old_pid, signal.SIGKILL)
    new_pid = k.wait_running("echo", other_than=old_pid)
    gate.open()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(results) == list(range(6))
    for i, r in results.items():
        assert r["tag"] == f"t{i}" and r["slept"] == 0.2
        assert r["pid"] == new_pid  # nothing was answered by the dead incarnation
    # the two that were running when the manager died ran a second time
    assert sorted(r["attempt"] for r in results.values()) == [1, 1, 1, 1, 2, 2]

    rows = {p["name"]: p for p in k.status()["processes"]}
    assert rows["echo"]["restarts"] == 1 and rows["echo"]["pid"] == new_pid
    assert rows["echo"]["state"] == "RUNNING"
    assert rows["scheduler"]["restarts"] == 0
    assert not pid_running(old_pid)
    stats = k.kernel_status()["services"]["echo"]
    assert stats["requeued"] == 2 and stats["errors"] == 0
    assert k.kernel_status()["pending"] == 0
    # a second kill: the restart count keeps counting
    os.kill(new_pid, signal.SIGKILL)
    k.wait_running("echo", other_than=new_pid)
    assert k.status()["processes"][1]["restarts"] == 2
    with k.client() as c:
        assert c.call("echo", "echo", text="after")["text"] == "after"
    assert "Traceback" not in k.log("scheduler")


@pytest.mark.timeout(120)
def test_kill9_manager_fails_non_idempotent_inflight_request(kernel, gates) -> None:
    k = kernel(capacity=1)
    old_pid = k.pid("echo")
    gate = gates.new()  # never opened: the call is still running when its manager dies
    outcome: dict[str, Any] = {}

    def call() -> None:
        with sdk.connect(k.run_dir, agent="once", timeout=60.0) as c:
            try:
                outcome["result"] = c.call("echo", "sleep_once", seconds=0, gate=gate.path)
            except BaseException as exc:  # noqa: BLE001
                outcome["error"] = exc

    t = threading.Thread(target=call)
    t.start()
    wait_until(lambda: k.busy("echo") == 1, timeout=30, message="sleep_once running")
    os.kill(old_pid, signal.SIGKILL)
    t.join(60)
    assert not t.is_alive()
    err = outcome.get("error")
    assert isinstance(err, KernelError), outcome
    # not safe to repeat, and it may have run: not retryable (a retry could do the work twice)
    assert err.code == "MANAGER_DIED" and err.retryable is False
    assert "died" in err.message
    k.wait_running("echo", other_than=old_pid)
    assert k.kernel_status()["services"]["echo"]["requeued"] == 0


@pytest.mark.timeout(60)
def test_kill9_scheduler_restarts_and_existing_client_recovers(kernel) -> None:
    k = kernel()
    c = k.client("survivor", timeout=20.0)
    assert c.call("echo", "echo", text="before")["text"] == "before"
    old = k.pid("scheduler")
    echo_pid = k.pid("echo")
    os.kill(old, signal.SIGKILL)
    new = k.wait_running("scheduler", other_than=old)
    # the same client object, created before the kill, carries on
    assert c.call("echo", "echo", text="after")["text"] == "after"
    assert c.call("kernel", "status")["scheduler"]["pid"] == new
    rows = {p["name"]: p for p in k.status()["processes"]}
    assert rows["scheduler"]["restarts"] == 1
    assert rows["echo"]["restarts"] == 0 and rows["echo"]["pid"] == echo_pid  # managers re-registered, not restarted
    wait_until(lambda: k.manager_info("echo") is not None, timeout=30, message="echo re-registered")
    assert k.manager_info("echo")["pid"] == echo_pid


@pytest.mark.timeout(60)
def test_kill9_supervisor_takes_children_down(kernel) -> None:
    k = kernel(managers=[{"name": "echo2", "target": "tests.support.echo_manager:EchoManager"}])
    sup = k.supervisor_pid
    children = [p["pid"] for p in k.status()["processes"]]
    assert len(children) == 3 and all(pid_running(p) for p in children)
    c = k.client("orphan")
    assert c.call("kernel", "ping") == {"pong": True}
    os.kill(sup, signal.SIGKILL)
    wait_until(lambda: not any(pid_running(p) for p in children), timeout=30,
               message=lambda: f"children to exit: {[p for p in children if pid_running(p)]}")
    assert processes_of(k.run_dir) == []
    # the kernel is gone: the SDK says so at once instead of waiting for its timeout
    t0 = time.monotonic()
    with pytest.raises(sdk.KernelUnavailable) as info:
        c.request("kernel", "ping", timeout=60)
    assert info.value.code == "UNAVAILABLE" and "no kernel running" in info.value.message
    assert time.monotonic() - t0 < 30  # not the 60 s timeout (which would end in TIMEOUT, not this)
    assert k.status()["running"] is False


def _start(run_dir, config_path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(AIOS_START), "--config", str(config_path), "--run-dir", str(run_dir),
                           "--detach"], capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize("target, expect", [
    ("tests.support.no_such_module:EchoManager", "no_such_module"),
    ("tests.support.echo_manager:NoSuchClass", "NoSuchClass"),
    ("tests.support.broken_import:Anything", "fails at import on purpose"),
    ("tests.support.crash_managers:SetupCrashManager", "setup exploded on purpose"),
])
@pytest.mark.timeout(60)
def test_detach_with_broken_manager_fails_cleanly(kernel, target: str, expect: str) -> None:
    k = kernel(managers=[{"name": "broken", "target": target}], start=False)
    result = k.start(check=False)
    assert result.returncode != 0
    assert expect in result.stderr, result.stderr
    # one clear line first (a crash in setup is followed by the tail of the manager's log)
    assert result.stderr.startswith("aios-start:"), result.stderr
    assert not result.stderr.startswith("Traceback")
    wait_until(lambda: processes_of(k.run_dir) == [], timeout=30, message="no kernel processes left")
    assert k.run_dir.ipc_files() == []
    assert k.status()["running"] is False


def test_invalid_config_is_refused(kernel, tmp_path) -> None:
    k = kernel(start=False)
    bad = tmp_path / "bad.toml"
    bad.write_text('llm = []\n[scheduler]\npolicy = "lottery"\n')
    result = _start(k.run_dir.path, bad)
    assert result.returncode != 0 and "lottery" in result.stderr
    bad.write_text('llm = []\n[kernel]\nno_such_option = 1\n')
    result = _start(k.run_dir.path, bad)
    assert result.returncode != 0 and "no_such_option" in result.stderr
    bad.write_text("this is = = not toml")
    result = _start(k.run_dir.path, bad)
    assert result.returncode != 0 and "TOML" in result.stderr
    assert processes_of(k.run_dir) == []


@pytest.mark.timeout(60)
def test_repeatedly_crashing_manager_becomes_fatal(kernel) -> None:
    # short heartbeats: the scheduler notices the dead manager (and fails its call) sooner
    k = kernel(managers=[FLAKY], kernel={"heartbeat_interval_s": 0.25},
               supervisor={"fast_crash_s": 10.0, "max_fast_crashes": 3, "backoff_initial_s": 0.05, "backoff_max_s": 0.2})
    first = k.pid("flaky")
    with k.client("crasher", timeout=20.0) as c:
        assert c.call("flaky", "ping")["pid"] == first
        with pytest.raises(KernelError) as info:
            c.call("flaky", "crash")
        assert info.value.code == "MANAGER_DIED"
    wait_until(lambda: k.state("flaky") == "FATAL", timeout=20,
               message=lambda: f"flaky FATAL: {k.processes().get('flaky')}")
    row = next(p for p in k.status()["processes"] if p["name"] == "flaky")
    assert row["pid"] is None and row["restarts"] == 3
    assert "gave up" in k.processes()["flaky"]["message"]
    assert not pid_running(first)
    # it stays FATAL (no more restarts) and the rest of the kernel keeps working
    with k.client("other") as c:
        assert c.call("echo", "echo", text="still here")["text"] == "still here"
        # a call to the dead service is answered at once, naming the process and its state (the scheduler
        # gives this answer only on arrival; a queued call would end in DEADLINE_EXCEEDED at 60 s)
        t0 = time.monotonic()
        with pytest.raises(KernelError) as unavailable:
            c.request("flaky", "ping", timeout=60.0, idempotent=True)
        assert time.monotonic() - t0 < 30
        assert unavailable.value.code == "UNAVAILABLE" and unavailable.value.retryable
        assert "flaky is FATAL" in unavailable.value.message and "gave up" in unavailable.value.message
    assert k.processes()["flaky"]["restarts"] == 3
    assert k.state("echo") == "RUNNING" and k.state("scheduler") == "RUNNING"


@pytest.mark.timeout(60)
def test_second_start_in_same_run_dir_is_refused(kernel) -> None:
    k = kernel()
    before = k.status()
    result = _start(k.run_dir.path, k.config_path)
    assert result.returncode != 0
    assert "already running" in result.stderr and str(k.supervisor_pid) in result.stderr
    # the running kernel is untouched: same processes, endpoints, key and state file
    assert k.status()["processes"] == before["processes"]
    assert k.run_dir.ipc_files()
    assert len(processes_of(k.run_dir)) == 3
    with sdk.connect(k.run_dir, agent="late", timeout=10.0) as c:
        assert c.call("echo", "echo", text="ok")["text"] == "ok"


def test_stop_when_nothing_runs(kernel) -> None:
    k = kernel(start=False)
    result = k.aios("stop")
    assert result.returncode == 0 and "no kernel running" in result.stdout
    st = k.aios("status")
    assert st.returncode == 1 and "no kernel running" in st.stdout
    with pytest.raises(sdk.KernelNotRunning):
        sdk.connect(k.run_dir, agent="nobody")


def test_kernel_status_and_shutdown_syscalls(kernel) -> None:
    k = kernel(capacity=2)
    c = k.client("operator")
    for i in range(5):
        c.call("echo", "echo", text=f"m{i}")
    status = c.call("kernel", "status")
    assert {p["name"] for p in status["processes"]} == {"scheduler", "echo"}
    assert status["queues"] == {"echo": 0}
    assert status["services"]["echo"]["completed"] >= 5
    assert [m["name"] for m in status["managers"]] == ["echo"]
    assert status["managers"][0]["capacity"] == 2
    sup = k.supervisor_pid
    assert c.call("kernel", "shutdown") == {"stopping": True}
    wait_until(lambda: not pid_running(sup), timeout=30, message="the supervisor to exit after kernel.shutdown")
    wait_until(lambda: not processes_of(k.run_dir), timeout=30, message="every kernel process to exit")
    assert not k.run_dir.ipc_files()




def test_tcp_transport_is_encrypted_with_curve(kernel) -> None:
    import zmq
    from aios.protocol import Codec
    k = kernel(kernel={"transport": "tcp", "host": "127.0.0.1",
                       "frontend_port": free_port(), "backend_port": free_port()})
    assert (k.run_dir.path / "curve.public").exists()
    assert oct((k.run_dir.path / "curve.secret").stat().st_mode & 0o777) == "0o600"
    c = k.client("remote-agent")
    assert c.call("echo", "echo", text="over tcp")["text"] == "over tcp"
    assert not k.run_dir.ipc_files()
    # A peer without the server's CURVE key cannot complete the handshake: no reply, ever.
    ctx = zmq.Context.instance()
    plain = ctx.socket(zmq.DEALER)
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(k.run_dir.frontend_endpoint(k.run_dir.load_config()))
    codec = Codec(k.run_dir.load_key())
    plain.send_multipart(codec.encode({"kind": "request", "id": "x1", "agent": "eve", "service": "kernel",
                                       "op": "ping"}, {}), zmq.NOBLOCK)
    assert plain.poll(1500, zmq.POLLIN) == 0
    plain.close(0)
    assert c.call("kernel", "ping") == {"pong": True}


@pytest.mark.timeout(120)
def test_frozen_manager_is_declared_dead_and_restarted(kernel, gates) -> None:
    """A manager that stops heartbeating without exiting (SIGSTOP: a hang) is dropped by the
    scheduler after heartbeat_liveness silent intervals, killed and restarted by the supervisor,
    and the idempotent request it held is answered by the new incarnation. The request waits at a
    gate, opened once the new incarnation runs: it is surely held when the manager freezes."""
    k = kernel(capacity=1, kernel={"heartbeat_interval_s": 0.2, "heartbeat_liveness": 3})
    old_pid = k.pid("echo")
    gate = gates.new()
    result: dict[str, Any] = {}

    def call() -> None:
        with sdk.connect(k.run_dir, agent="patient", timeout=90.0) as c:
            result["r"] = c.request("echo", "sleep", {"seconds": 0, "tag": "held", "gate": gate.path},
                                    idempotent=True).result

    t = threading.Thread(target=call)
    t.start()
    wait_until(lambda: k.busy("echo") == 1, timeout=30, message="the sleep to start")
    os.kill(old_pid, signal.SIGSTOP)
    new_pid = k.wait_running("echo", other_than=old_pid, timeout=60)
    gate.open()
    t.join(60)
    assert result["r"]["tag"] == "held" and result["r"]["pid"] == new_pid
    assert not pid_running(old_pid)
    assert k.processes()["echo"]["restarts"] == 1
    assert "no heartbeat" in k.log("scheduler")
