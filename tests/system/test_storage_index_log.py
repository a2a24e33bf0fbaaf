"""The storage engine's index log survives a crash: a process that logged changes and died
without closing leaves them for the next open to apply (the rest of the index log's tests are
in tests/unit/test_storage_index_log.py; this one needs a process to kill)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from aios.managers.storage import StorageEngine


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "storage.sqlite3"


_CRASH = """
import os, sys
from aios.managers.storage import StorageEngine
e = StorageEngine(sys.argv[1])
e.write("a", "kept.md", b"written just before the crash")
e.write("a", "kept.md", b"rewritten just before the crash")
os._exit(0)  # no close: the log is not applied
"""


def test_changes_logged_before_a_crash_are_applied_after_it(db: Path) -> None:
    db.parent.mkdir(parents=True)
    done = subprocess.run([sys.executable, "-c", _CRASH, str(db)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with StorageEngine(db) as e:
        assert e.index_pending == 3  # found in the log at open
        assert [h.version for h in e.search("a", "rewritten crash")] == [2]
        assert e.search("a", "written") == []  # the first version's text is no longer indexed
        assert e.integrity_check() == "ok"
