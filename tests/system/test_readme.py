"""The README's "Writing an agent" example, run as written against a kernel with the real model and
the built-in managers: what its comments say it prints is what it prints."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO

pytestmark = [pytest.mark.model, pytest.mark.timeout(180)]


def readme_agent_example() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"## Writing an agent.*?```python\n(.*?)```", text, re.S)
    assert match, "the README has no python example under 'Writing an agent'"
    return match.group(1)


def test_the_readme_agent_example_prints_what_its_comments_say(kernel, tmp_path: Path) -> None:
    k = kernel(echo=False, llm=[{"name": "llm-0", "backend": "llamacpp"}],
               builtins={"storage": {"path": str(tmp_path / "storage.sqlite3")}, "memory": {}, "tools": {}})
    code = readme_agent_example()
    assert 'sdk.connect(agent="researcher")' in code
    script = tmp_path / "agent.py"
    script.write_text(code.replace('sdk.connect(agent="researcher")',
                                   f'sdk.connect({str(k.run_dir.path)!r}, agent="researcher")'))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=150, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "Paris" in lines[0]                                   # the streamed answer
    assert "'completion_tokens'" in lines[1]                     # usage, then the wait
    assert lines[2] == "The user lives in Lyon."                 # memory search
    assert lines[3] == "Day 1: Lyon"                             # storage after the rollback
    assert "'value': 14" in lines[4]                             # the calculator tool
    assert lines[5].startswith("calculator ") and "'value': 84" in lines[5]   # the model chose the tool
