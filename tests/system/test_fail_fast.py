"""Fail fast and say why: agents never wait out a timeout for something the kernel already knows,
and every command reports a problem a person can act on in one line, never with a traceback."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aios import sdk
from tests.support.paths import AIOS, AIOS_START, REPO
from tests.support.waiting import in_thread, wait_until

pytestmark = pytest.mark.timeout(120)


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)




# ------------------------------------------------------------------------------- no kernel
def test_connecting_where_the_kernel_was_stopped_fails_at_once(kernel) -> None:
    k = kernel()
    assert k.stop()
    assert k.run_dir.key_file.exists()  # the key stays: only the kernel is gone
    t0 = time.monotonic()
    with pytest.raises(sdk.KernelUnavailable) as info:
        sdk.connect(k.run_dir, agent="late", timeout=60)
    assert time.monotonic() - t0 < 30  # a verdict from the run directory, not the end of the 60 s timeout
    assert info.value.code == "UNAVAILABLE" and f"no kernel running in {k.run_dir.path}" in info.value.message


@pytest.mark.parametrize("op", ["sleep_once", "sleep"])  # not safe to repeat / safe to repeat
def test_a_call_in_flight_when_the_kernel_stops_fails_at_once(kernel, gates, op: str) -> None:
    k = kernel()
    gate = gates.new()  # never opened: the call is in flight when the kernel stops
    c = sdk.connect(k.run_dir, agent="mid", timeout=60)
    t, out = in_thread(lambda: c.call("echo", op, seconds=0, gate=gate.path))
    wait_until(lambda: (m := k.manager_info("echo")) is not None and m["busy"] == 1, timeout=30,
               message="the call running")
    k.stop()
    t.join(60)
    err = out.get("error")
    assert isinstance(err, sdk.AIOSError), out
    assert err.code in ("SHUTTING_DOWN", "UNAVAILABLE"), err
    # sleep_once is not safe to repeat and may have run: not retryable; sleep is safe to repeat
    assert err.retryable is (op == "sleep"), err
    assert out["elapsed"] < 45, "answered while the kernel stopped, not at the 60 s timeout"
    with pytest.raises(sdk.KernelUnavailable):
        c.call("kernel", "ping")
    c.close()


def test_agents_carry_on_across_a_kernel_restart_in_the_same_run_directory(kernel) -> None:
    k = kernel()
    c = sdk.connect(k.run_dir, agent="survivor", timeout=30)
    assert c.call("echo", "echo", text="before")["text"] == "before"
    k.stop()
    k.start()
    assert c.call("echo", "echo", text="after")["text"] == "after"  # same client: same key, reconnected
    assert c.call("kernel", "ping") == {"pong": True}
    c.close()


# --------------------------------------------------------------- a service that cannot serve
def test_a_crash_looping_manager_is_answered_at_once(kernel) -> None:
    k = kernel(managers=[{"name": "flaky", "target": "tests.support.crash_managers:FlakyManager"}],
               kernel={"heartbeat_interval_s": 0.25},
               supervisor={"fast_crash_s": 10.0, "max_fast_crashes": 50, "backoff_initial_s": 0.2,
                           "backoff_max_s": 1.0})
    with k.client("crasher", timeout=60) as c:
        with pytest.raises(sdk.KernelError):
            c.call("flaky", "crash")
        # every restart now crashes in setup: after a couple of fast crashes it is crash-looping
        wait_until(lambda: k.processes()["flaky"]["restarts"] >= 2, timeout=60, message="flaky restarted twice")
        t0 = time.monotonic()
        with pytest.raises(sdk.KernelError) as info:
            c.request("flaky", "ping", timeout=60.0, idempotent=True)
        # refused on arrival (a queued call would end in DEADLINE_EXCEEDED at 60 s instead)
        assert time.monotonic() - t0 < 30
    assert info.value.code == "UNAVAILABLE" and "flaky is CRASH-LOOPING" in info.value.message
    assert "setup" in info.value.message or "exited with code" in info.value.message


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket closes


def test_a_remote_llm_server_that_is_down_is_reported_at_start_and_fails_each_chat_at_once(kernel) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    k = kernel(echo=False, start=False,
               llm=[{"name": "gpt", "backend": "openai", "base_url": url, "model": "m"}])
    result = k.start(check=False)
    assert result is not None and result.returncode == 0, result.stderr
    assert "gpt is DEGRADED" in result.stderr and "cannot reach" in result.stderr
    status = k.aios("status")
    assert "DEGRADED" in status.stdout and url in status.stdout
    with k.client("hopeful", timeout=120) as c:
        for _ in range(2):
            t0 = time.monotonic()
            with pytest.raises(sdk.KernelError) as info:
                c.chat("hello?", max_tokens=4)
            assert time.monotonic() - t0 < 60, "not the 119 s it once took"
            assert info.value.code == "UNAVAILABLE" and info.value.retryable and "cannot reach" in info.value.message


# ------------------------------------------------------------------------ configuration
@pytest.mark.parametrize("toml, expect", [
    ('[[llm]]\nname = "gpt"\nbackend = "openai"\nbase_url = "http://x/v1"\nmodle = "m"\n',
     '[[llm]] #1 (name "gpt"), key "modle": unknown key; did you mean "model"?'),
    ('[llm]\nname = "x"\n', "write [[llm]] (double brackets)"),
    ('[schedular]\npolicy = "rr"\n', '[schedular]: unknown table; did you mean "scheduler"?'),
    ('[scheduler]\nweights = { a = -1.0 }\n', "weights must be positive"),
    ('[scheduler]\npolicy = "lottery"\n', "unknown scheduling policy 'lottery'"),
    ('[[llm]]\nmodel_path = "/no/such/model.gguf"\n', "model file '/no/such/model.gguf' does not exist"),
    ('[kernel]\ntransport = "tcp"\nfrontend_port = 6000\nbackend_port = 6000\n', "both 6000"),
    ('[[managers]]\nname = "m"\ntarget = "tests.support.echo_manager:EchoManager"\noptions = { shout = true }\n',
     '[[managers]] #1 (name "m"), key "shout": unknown option'),
    ("this is = not toml [", "not valid TOML"),
    ('[[llm]]\nmax_batch = 0\n', '[[llm]] #1, key "max_batch": Input should be greater than or equal to 1'),
    ('[context]\nram_budget_mb = 64\n[[llm]]\nprefix_cache_mb = 100\n',
     'prefix_cache_mb = 100 exceeds [context] ram_budget_mb = 64'),
    ('[[llm]]\nbackend = "ollama"\nmodel = "m"\nmax_batch = 4\n', "max_batch applies to the llamacpp backend only"),
    ('[[llm]]\nmax_inflight = 4\n', "max_inflight applies to remote backends"),
    ('[[llm]]\noptions = { max_batch = 4 }\n', "set max_batch in the [[llm]] entry itself, not in its options (write max_batch = 4"),
])
def test_config_errors_are_one_line_each_with_their_place(tmp_path: Path, toml: str, expect: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    for cmd in ([str(AIOS), "config", "check", str(path)],
                [str(AIOS_START), "--config", str(path), "--run-dir", str(tmp_path / "run"), "--detach"]):
        out = _run(*cmd)
        assert out.returncode == 2, out
        assert expect in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and "pydantic" not in out.stderr and "errors.pydantic.dev" not in out.stderr


def test_config_check_accepts_a_good_file(tmp_path: Path) -> None:
    path = tmp_path / "good.toml"
    path.write_text('llm = []\n[scheduler]\npolicy = "las"\n[[managers]]\nname = "echo"\n'
                    'target = "tests.support.echo_manager:EchoManager"\n')
    out = _run(str(AIOS), "config", "check", str(path))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout and "policy las" in out.stdout and "echo (echo)" in out.stdout


def test_an_unusable_run_directory_is_one_line_for_every_command(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the run directory should be")
    config = tmp_path / "k.toml"
    config.write_text('llm = []\n')
    for cmd, code in (([str(AIOS_START), "--config", str(config), "--run-dir", str(blocker), "--detach"], 2),
                      ([str(AIOS), "start", "--config", str(config), "--run-dir", str(blocker), "--detach"], 2),
                      ([str(AIOS), "status", "--run-dir", str(blocker)], 1),
                      ([str(AIOS), "stop", "--run-dir", str(blocker)], 0),
                      ([str(AIOS), "logs", "--run-dir", str(blocker)], 1)):
        out = _run(*cmd)
        assert out.returncode == code, (cmd, out)
        text = (out.stdout + out.stderr).strip()
        assert "Traceback" not in text and len(text.splitlines()) == 1, (cmd, text)
        assert str(blocker) in text


# ------------------------------------------------------------------------------ commands
def test_version_start_synonym_logs_and_status(kernel, tmp_path: Path) -> None:
    out = _run(str(AIOS), "--version")
    assert out.returncode == 0 and out.stdout.startswith("aios ")
    k = kernel(start=False, scheduler={"policy": "las"})
    started = _run(str(AIOS), "start", "--config", str(k.config_path), "--run-dir", str(k.run_dir.path), "--detach")
    assert started.returncode == 0, started.stderr
    k.remember_pids()
    with k.client("someone", timeout=10) as c:
        c.call("echo", "echo", text="hi")
    status = k.aios("status")
    assert status.returncode == 0
    assert "policy las" in status.stdout and "BUSY" in status.stdout and "PREEMPT" in status.stdout
    assert "echo" in status.stdout and "0/2" in status.stdout
    logs = k.aios("logs", "scheduler", "-n", "5")
    assert logs.returncode == 0 and "aios.scheduler" in logs.stdout
    missing = k.aios("logs", "nosuch")
    assert missing.returncode == 1 and "no log named 'nosuch'" in missing.stderr and "scheduler" in missing.stderr


def test_foreground_start_prints_progress_lines_not_log_noise(kernel) -> None:
    k = kernel(start=False)
    proc = subprocess.Popen([sys.executable, str(AIOS_START), "--config", str(k.config_path),
                             "--run-dir", str(k.run_dir.path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if "kernel ready" in line:
                break
        k.remember_pids()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines += out.splitlines()
    assert any("kernel ready" in line for line in lines), lines
    assert all(line.startswith("[aios-start] ") for line in lines if line), lines
    assert " INFO " not in err and " WARNING " not in err, err  # the supervisor logs to its file
    assert "started scheduler" in k.log("supervisor")
    assert proc.returncode == 0
