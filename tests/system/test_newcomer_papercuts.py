"""Issue 17, item 14: the papercuts of a newcomer's first run, each through the commands a newcomer
types and, where one is involved, a real kernel. The pure parts have unit tests too
(tests/unit/test_newcomer_papercuts.py).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from aios import sdk
from tests.support.kernel import KernelFactory
from tests.support.newcomer import OUTSIDE_MANAGER, tools_readme_config
from tests.support.paths import AIOS, AIOS_START, REPO
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)


def _run(*args: str, cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _refused_in_one_line(config: Path, tmp_path: Path, expect: str, cwd: Path = REPO) -> None:
    """`aios config check` and `aios-start` both refuse `config` with exit code 2 and one line naming `expect`."""
    for cmd in ([str(AIOS), "config", "check", str(config)],
                [str(AIOS_START), "--config", str(config), "--run-dir", str(tmp_path / "run"), "--detach"]):
        out = _run(*cmd, cwd=cwd)
        assert out.returncode == 2, (cmd, out)
        assert expect in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr


# -------------------------------------------------------------- 1. the tools/README.md example
def test_the_tools_readme_example_config_checks_starts_and_serves_the_example_tool(
        kernel: KernelFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = tools_readme_config()
    config = tmp_path / "aios.toml"
    config.write_text("llm = []\n" + block)
    out = _run(str(AIOS), "config", "check", str(config))  # from the checkout's root, where ./tools is
    assert out.returncode == 0, out.stderr
    monkeypatch.chdir(REPO)  # the kernel starts in the current directory; the block's dirs are relative to it
    k = kernel(echo=False, builtins={"tools": tomllib.loads(block)["tools"]})
    with k.client("newcomer", timeout=30) as c:
        assert "word_count" in {t["name"] for t in c.tools.list()}
        assert c.tools.call("word_count", text="one two one")["words"] == 3


# -------------------------------------------------------------- 2. [tools] dirs that are not there
def test_a_tool_directory_that_does_not_exist_is_refused_at_check_and_at_start(tmp_path: Path) -> None:
    config = tmp_path / "aios.toml"
    config.write_text('llm = []\n[tools]\ndirs = ["./my_tools"]\n')
    _refused_in_one_line(config, tmp_path, f"[tools], key \"dirs\": tool directory './my_tools' does not exist "
                                           f"(relative to the current directory, {tmp_path})", cwd=tmp_path)


# -------------------------------------------------------------- 3. a model file that is not GGUF
def test_a_model_file_that_is_not_gguf_is_one_line_at_config_check_not_a_traceback_at_start(tmp_path: Path) -> None:
    fake = tmp_path / "gemma.gguf"
    fake.write_text("<html>404 Not Found</html>\n")  # what a failed download leaves behind
    config = tmp_path / "aios.toml"
    config.write_text(f'[[llm]]\nname = "llm-0"\nmodel_path = "{fake}"\n[memory]\nenabled = false\n'
                      f'[tools]\nenabled = false\n[storage]\nenabled = false\n')
    _refused_in_one_line(config, tmp_path, f"[[llm]] #1 (name \"llm-0\"), key \"model_path\": model file '{fake}' "
                                           f"is not a GGUF file")


# -------------------------------------------------------------- 4. "did you mean --json"
def test_a_misspelled_option_names_the_one_it_meant_with_the_commands_usage() -> None:
    out = _run(str(AIOS), "status", "--jsn")
    assert out.returncode == 2
    assert out.stderr.startswith("usage: aios status"), out.stderr
    assert "unrecognized argument: --jsn; did you mean --json?" in out.stderr


# -------------------------------------------------------------- 5. [[managers]] path
def test_a_manager_outside_the_current_directory_runs_from_its_path(kernel: KernelFactory, tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "outside_manager.py").write_text(OUTSIDE_MANAGER)
    entry = {"name": "outside", "target": "outside_manager:OutsideManager"}
    config = tmp_path / "aios.toml"
    config.write_text(f'llm = []\n[[managers]]\nname = "outside"\ntarget = "{entry["target"]}"\n')
    out = _run(str(AIOS), "config", "check", str(config))
    assert out.returncode == 2 and "set path = \"DIR\" in its [[managers]] entry" in out.stderr, out.stderr

    k = kernel(echo=False, managers=[{**entry, "path": str(plugins)}])
    with k.client("newcomer", timeout=20) as c:
        assert c.call("outside", "hello", name="ada") == {"hello": "ada", "module": str(plugins / "outside_manager.py")}


# -------------------------------------------------------------- 6. a FATAL process's message in --json
def test_status_json_carries_each_processs_message_so_a_fatal_one_says_why(kernel: KernelFactory) -> None:
    k = kernel(managers=[{"name": "flaky", "target": "tests.support.crash_managers:FlakyManager"}],
               kernel={"heartbeat_interval_s": 0.25},
               supervisor={"fast_crash_s": 10.0, "max_fast_crashes": 2, "backoff_initial_s": 0.05,
                           "backoff_max_s": 0.2})
    with k.client("crasher", timeout=20) as c:
        with pytest.raises(sdk.KernelError):
            c.call("flaky", "crash")
    wait_until(lambda: k.state("flaky") == "FATAL", timeout=30, message=lambda: f"flaky FATAL: {k.processes()}")
    rows = {p["name"]: p for p in k.status()["processes"]}
    assert rows["flaky"]["state"] == "FATAL"
    assert "gave up" in rows["flaky"]["message"], rows["flaky"]
    assert rows["echo"]["message"] == ""


# -------------------------------------------------------------- 7. the header with the scheduler down
def test_the_status_header_says_the_scheduler_is_not_answering_instead_of_policy_unknown(
        kernel: KernelFactory) -> None:
    """A FATAL scheduler's header is covered in the unit test (the supervisor's handling of a FATAL
    scheduler is another item of this issue); here the scheduler is alive but cannot answer."""
    k = kernel()
    pid = k.wait_running("scheduler")
    os.kill(pid, signal.SIGSTOP)
    try:
        out = k.aios("status")
    finally:
        os.kill(pid, signal.SIGCONT)
    header = out.stdout.splitlines()[0]
    assert f"the scheduler (pid {pid}) is not answering: no call can be served" in header, out.stdout
    assert "policy ?" not in header and "up 0s" not in header
    wait_until(lambda: "policy fifo, up" in k.aios("status").stdout.splitlines()[0], timeout=20,
               message="the header of a scheduler that answers again")


# -------------------------------------------------------------- 8. the demo's fifo lines
def test_the_demos_baseline_lines_give_when_each_request_finished_and_label_its_turnaround(tmp_path: Path) -> None:
    """`aios demo` on the simulated backend (no model): the fifo baseline prints, per request as it
    finishes, the elapsed time it finished at (increasing), then its own turnaround, labelled."""
    config = tmp_path / "sim.toml"
    config.write_text('[[llm]]\nname = "llm-0"\nbackend = "sim"\nsim_seconds_per_token = 0.01\n'
                      '[memory]\nenabled = false\n[tools]\nenabled = false\n[storage]\nenabled = false\n')
    out = _run(str(AIOS), "demo", "--config", str(config), "--policy", "rr", "--agents", "qa,summarizer",
               "--run-dir", str(tmp_path / "run"), timeout=100)
    lines = [line for line in out.stdout.splitlines() if line.startswith("[demo]   ")]
    assert len(lines) == 4, out.stdout  # 3 questions and 1 summary, under fifo
    pattern = re.compile(r"\[demo\]   at +(\d+\.\d)s (qa|summarizer) finished: .+ \(its turnaround (\d+\.\d)s, "
                         r"(\d+\.\d)s of it queued\)$")
    matches = [pattern.match(line) for line in lines]
    assert all(matches), lines
    finished_at = [float(m.group(1)) for m in matches if m]
    assert finished_at == sorted(finished_at)
    assert not re.search(r"\b1 times\b", out.stdout), out.stdout


# -------------------------------------------------------------- 9. a storage search score
def test_a_storage_search_score_is_printed_with_its_digits_not_as_zero(kernel: KernelFactory) -> None:
    k = kernel(echo=False, builtins={"storage": {}})
    with k.client("reader", timeout=20) as c:
        c.storage.write("notes/plan.md", "the scheduler orders the requests of every agent")
        c.storage.write("notes/other.md", "memory keeps entries")
        raw = c.storage.search("scheduler")
    assert len(raw) == 1 and raw[0]["score"] > 0  # tiny (about 1e-6): bm25 on a small index
    out = k.aios("files", "search", "scheduler", "--agent", "reader")
    assert out.returncode == 0, out.stderr
    score, rest = out.stdout.split(None, 1)
    assert float(score) == pytest.approx(raw[0]["score"], rel=1e-3) and score != "0.000", out.stdout
    assert rest.startswith("notes/plan.md (v1): the [scheduler] orders")
    as_json = json.loads(k.aios("files", "search", "scheduler", "--agent", "reader", "--json").stdout)
    assert as_json[0]["score"] == raw[0]["score"]
