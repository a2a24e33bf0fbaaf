"""Reliability defects whose fix needs no kernel to check (the others are in
tests/system/test_reliability.py, with the story of how they were found).
"""
from __future__ import annotations

import os

import pytest


# ------------------------------------------------------- 5. the ipc directory of a deep run directory
def test_a_recorded_ipc_directory_that_is_not_ours_is_refused(tmp_path) -> None:
    from aios.rundir import RunDir, RunDirError
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    rd = RunDir(deep)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)  # someone else could have planted sockets here
    rd.ipc_pointer_file.write_text(str(shared))
    with pytest.raises(RunDirError, match="mode"):
        rd.ipc_dir
    link = tmp_path / "link"
    link.symlink_to(shared)
    rd.ipc_pointer_file.write_text(str(link))
    with pytest.raises(RunDirError, match="not a directory"):
        rd.ipc_dir
