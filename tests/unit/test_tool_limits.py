"""Per-call limits of tool workers, the parts that need no process: which method a machine gets (and why),
and what the cgroup v2 method writes, on cgroup trees laid out in a temporary directory. The limits
themselves, on real workers, are tested in tests/system/test_tool_runtime.py and test_tools_kernel.py."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from aios.managers.tools.call_limits import CgroupLimits, CgroupProbe, TreeAccounting, detect_call_limits
from tests.support.imports import PACKAGE

V1_MEMORY = "4:memory:/process_api/abc\n1:cpu:/\n0::/\n"


def fake_machine(tmp_path: Path, controllers: str, cgroup: str = "0::/kernel\n",
                 subtree: str = "") -> tuple[CgroupProbe, Path]:
    """A cgroup2 mount at tmp_path/cg whose (fake) files say what the kernel would."""
    mount = tmp_path / "cg"
    own = next(line[3:] for line in cgroup.splitlines() if line.startswith("0::"))
    base = mount / own.lstrip("/")
    base.mkdir(parents=True, exist_ok=True)
    (base / "cgroup.controllers").write_text(controllers + "\n")
    (base / "cgroup.subtree_control").write_text(subtree)
    (tmp_path / "mountinfo").write_text(
        "22 1 0:20 / /proc rw,nosuid - proc proc rw\n"
        f"30 25 0:26 / {mount} rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw\n")
    (tmp_path / "cgroup").write_text(cgroup)
    return CgroupProbe(mountinfo=str(tmp_path / "mountinfo"), cgroup=str(tmp_path / "cgroup")), base


def test_memory_under_cgroup_v1_falls_back_to_tree_accounting_and_says_why(tmp_path: Path) -> None:
    probe, _ = fake_machine(tmp_path, "hugetlb", cgroup=V1_MEMORY)
    limits = detect_call_limits(256, probe)
    try:
        assert isinstance(limits, TreeAccounting) and limits.method == "process-tree accounting"
        assert "no memory or pids controller" in limits.summary()
        assert "memory is under cgroup v1 here" in limits.summary()
    finally:
        limits.close()


def test_no_cgroup2_mount_falls_back(tmp_path: Path) -> None:
    (tmp_path / "mountinfo").write_text("22 1 0:20 / /proc rw,nosuid - proc proc rw\n")
    (tmp_path / "cgroup").write_text(V1_MEMORY)
    limits = detect_call_limits(64, CgroupProbe(str(tmp_path / "mountinfo"), str(tmp_path / "cgroup")))
    try:
        assert isinstance(limits, TreeAccounting) and "no cgroup v2 hierarchy mounted" in limits.summary()
    finally:
        limits.close()


def test_a_delegated_cgroup_v2_gives_each_worker_memory_max_and_pids_max(tmp_path: Path) -> None:
    probe, base = fake_machine(tmp_path, "cpu memory pids")
    limits = detect_call_limits(128, probe)
    assert isinstance(limits, CgroupLimits) and limits.method == "cgroup v2"
    parent = base / f"aios-tools-{os.getpid()}"
    assert limits.parent == parent and "memory.max, pids.max" in limits.summary()
    assert set((base / "cgroup.subtree_control").read_text().split()) == {"+memory", "+pids"}
    assert set((parent / "cgroup.subtree_control").read_text().split()) == {"+memory", "+pids"}
    handle = limits.admit("hog", 4242, 64, pid_namespace=True)
    cg = parent / "w1"
    assert (cg / "memory.max").read_text() == str(64 << 20)
    assert (cg / "pids.max").read_text() == "128"
    assert (cg / "cgroup.procs").read_text() == "4242"
    assert handle.limit_error() is None
    (cg / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert handle.limit_error() == ("tool 'hog' exceeded its memory limit of 64 MB per call "
                                    "(cgroup v2 memory.max; manifest memory_mb)")
    handle.kill()
    assert (cg / "cgroup.kill").read_text() == "1"


def test_a_cgroup_that_holds_processes_cannot_delegate(tmp_path: Path) -> None:
    """Writing subtree_control fails (EBUSY on a real kernel) when the cgroup holds processes: here the
    file is a directory, so the write fails too, and the reason names the cgroup."""
    probe, base = fake_machine(tmp_path, "memory pids")
    (base / "cgroup.subtree_control").unlink()
    (base / "cgroup.subtree_control").mkdir()
    limits = detect_call_limits(64, probe)
    try:
        assert isinstance(limits, TreeAccounting) and f"cannot delegate memory and pids under {base}" in limits.summary()
    finally:
        limits.close()


def test_no_select_on_descriptors_in_the_tool_runtime_or_shipped_tools() -> None:
    """select() fails once a descriptor number passes 1023 (issue 17): poll or selectors only."""
    call = re.compile(r"\bselect\.select\(")
    offenders = [str(p.relative_to(PACKAGE.parent)) for folder in ("managers/tools", "tools")
                 for p in (PACKAGE / folder).rglob("*.py") if call.search(p.read_text())]
    assert offenders == []


@pytest.mark.parametrize("status_file", ["oom_kill 0\n", "", "garbage"])
def test_no_oom_kill_means_no_limit_error(tmp_path: Path, status_file: str) -> None:
    probe, base = fake_machine(tmp_path, "memory pids")
    limits = detect_call_limits(64, probe)
    assert isinstance(limits, CgroupLimits)
    handle = limits.admit("calc", 1, 64, pid_namespace=False)
    (limits.parent / "w1" / "memory.events").write_text(status_file)
    assert handle.limit_error() is None
