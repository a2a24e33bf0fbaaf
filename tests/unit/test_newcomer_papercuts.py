"""Issue 17, item 14, the pure parts: what a newcomer's first run tripped over, one test each.

The same papercuts are checked end to end, through the commands and a real kernel, in
tests/system/test_newcomer_papercuts.py.
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

from aios.cli import build_parser, start_parser
from aios.config import ConfigError, load_config
from aios.demo import finished_line, times
from aios.managers.llm.options import LLMCoreConfig
from aios.managers.runner import load_manager_class, resolve_managers
from aios.managers.tools.runtime import ToolRuntimeOptions
from aios.status_view import header_line
from tests.support.newcomer import OUTSIDE_MANAGER, tools_readme_config
from tests.support.paths import REPO


# ------------------------------------------------------------- the tools/README.md example
def test_the_tools_readme_example_is_a_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # its dirs are relative to where the kernel starts: a checkout's root
    cfg = load_config(None, tomllib.loads(tools_readme_config()) | {"llm": []})
    resolved = {r.name: r for r in resolve_managers(cfg)}
    assert resolved["tools"].options.dirs == ["./tools"]


# ------------------------------------------------------------- [tools] dirs that are not there
def test_a_tool_directory_that_does_not_exist_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValidationError, match=r"tool directory './mytools' does not exist \(relative to the "
                                              r"current directory, " + str(tmp_path)):
        ToolRuntimeOptions(dirs=["./mytools"])
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValidationError, match="tool directory 'afile' is not a directory"):
        ToolRuntimeOptions(dirs=["afile"])
    (tmp_path / "mytools").mkdir()
    assert ToolRuntimeOptions(dirs=["./mytools"]).dirs == ["./mytools"]
    cfg = load_config(None, {"llm": [], "tools": {"dirs": ["./nope"]}})
    with pytest.raises(ConfigError, match=r'\[tools\], key "dirs": tool directory \'./nope\' does not exist'):
        resolve_managers(cfg)


# ------------------------------------------------------------- a model file that is not GGUF
def test_a_model_file_that_is_not_gguf_is_refused_in_one_line(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text("<html>404 not found</html>")  # what a failed download leaves behind
    with pytest.raises(ConfigError) as info:
        load_config(None, {"llm": [{"name": "llm-0", "model_path": str(fake)}]})
    assert str(info.value).count("\n") == 0
    assert f"model file '{fake}' is not a GGUF file" in str(info.value)
    real = tmp_path / "real.gguf"
    real.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(32))
    assert LLMCoreConfig(model_path=str(real)).model_path == str(real)


# ------------------------------------------------------------- "did you mean --json"
@pytest.mark.parametrize("argv, usage, hint", [
    (["status", "--jsn"], "usage: aios status", "unrecognized argument: --jsn; did you mean --json?"),
    (["files", "search", "q", "--agent", "a", "--limt", "3"], "usage: aios files search",
     "unrecognized arguments: --limt 3; did you mean --limit for --limt?"),
    (["stop", "--run_dir", "x"], "usage: aios stop", "did you mean --run-dir for --run_dir?"),
])
def test_a_misspelled_option_is_answered_by_its_command_with_a_guess(
        capsys: pytest.CaptureFixture[str], argv: list[str], usage: str, hint: str) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and hint in err, err
    assert "COMMAND ..." not in err  # not the top-level usage


def test_aios_start_guesses_too(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        start_parser().parse_args(["--detatch"])
    assert "did you mean --detach?" in capsys.readouterr().err


# ------------------------------------------------------------- [[managers]] path
def test_a_managers_path_puts_its_directory_on_the_import_path(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "outside_unit_manager.py").write_text(OUTSIDE_MANAGER)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(REPO)
    entry = {"name": "outside", "target": "outside_unit_manager:OutsideManager"}
    with pytest.raises(ConfigError) as info:
        resolve_managers(load_config(None, {"llm": [], "managers": [entry]}))
    assert "set path = \"DIR\" in its [[managers]] entry" in str(info.value)
    cfg = load_config(None, {"llm": [], "managers": [{**entry, "path": str(plugins)}]})
    assert {r.name: r.service for r in resolve_managers(cfg)}["outside"] == "outside"
    assert load_manager_class(entry["target"], str(plugins)).service == "outside"
    with pytest.raises(ConfigError, match=r'\[\[managers\]\] #1 \(name "outside"\), key "path": '
                                          r"'/no/such/dir' is not a directory"):
        load_config(None, {"llm": [], "managers": [{**entry, "path": "/no/such/dir"}]})


# ------------------------------------------------------------- the status header
def _status(scheduler_row: dict, kernel: dict | None = None) -> dict:
    return {"running": True, "run_dir": "/tmp/k", "supervisor_pid": 41, "kernel": kernel,
            "processes": [{"name": "scheduler", "service": "kernel", **scheduler_row}]}


def test_the_status_header_says_the_scheduler_is_down_rather_than_policy_unknown_up_0s() -> None:
    fatal = header_line(_status({"state": "FATAL", "pid": None,
                                 "message": "crashed 6 times within 5.0s of starting; gave up"}))
    assert fatal == ("kernel in /tmp/k (supervisor pid 41); the scheduler is down (FATAL: crashed 6 times within "
                     "5.0s of starting; gave up): no call can be served")
    backoff = header_line(_status({"state": "BACKOFF", "pid": None, "message": "exited with code -9 after 0.4s"}))
    assert "the scheduler is down (BACKOFF: exited with code -9" in backoff
    silent = header_line(_status({"state": "RUNNING", "pid": 42, "message": ""}))
    assert "the scheduler (pid 42) is not answering" in silent
    for line in (fatal, backoff, silent):
        assert "policy ?" not in line and "up 0s" not in line
    up = header_line(_status({"state": "RUNNING", "pid": 42}, {"scheduler": {"policy": "las", "uptime_s": 12.4}}))
    assert up == "kernel in /tmp/k (supervisor pid 41), policy las, up 12s"


# ------------------------------------------------------------- the demo's lines
def test_the_demos_unstreamed_lines_say_when_a_request_finished_and_label_its_turnaround() -> None:
    line = finished_line({"agent": "qa", "request": "What is the capital of France?", "done_at_s": 4.31,
                          "turnaround_s": 1.2, "wait_s": 0.8})
    assert line == ("[demo]   at   4.3s qa finished: What is the capital of France? "
                    "(its turnaround 1.2s, 0.8s of it queued)")
    assert finished_line({"agent": "qa", "request": "q", "done_at_s": 1.0, "turnaround_s": None,
                          "wait_s": None}) == "[demo]   at   1.0s qa finished: q"


def test_counts_of_times_are_spelled_for_a_sentence() -> None:
    assert [times(n) for n in (0, 1, 1.0, 2, 7)] == ["0 times", "1 time", "1 time", "2 times", "7 times"]
