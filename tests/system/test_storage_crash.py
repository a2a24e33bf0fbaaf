"""Crash safety for real: a child process writes through the engine from several threads and
prints every acknowledged (returned) write; the test kills it with SIGKILL mid-way, reopens the
database and checks that every acknowledged write is there with its exact content, and that
SQLite's and the engine's integrity checks pass.

With WAL and synchronous=NORMAL a commit is in the OS page cache before the call returns, which
survives the death of the process (not of the machine: see engine.py).
"""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aios.managers.storage import StorageEngine
from tests.support.paths import REPO

CHILD = r"""
import sys, threading
from aios.managers.storage import StorageEngine
from aios.managers.storage.engine import MiB

path, group = sys.argv[1], sys.argv[2] == "group"
engine = StorageEngine(path, versions_kept=4, max_file_bytes=4 * MiB, max_agent_bytes=1024 * MiB, group_commit=group)
lock = threading.Lock()

def content(t, i):
    # sizes from inline (< 1 KiB) to several chunks, text and binary
    size = (0, 10, 700, 3000, 20000)[i % 5]
    return (f"t{t} i{i} ".encode() * (size // 6 + 1))[:size] + bytes([t, i % 256])

def ack(line):
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

def worker(t):
    i = 0
    while True:
        engine.write(f"agent-{t % 3}", f"t{t}/f{i}", content(t, i))
        ack(f"W {t} {i}")
        engine.write(f"agent-{t % 3}", f"t{t}/log", f"line {i}\n".encode(), append=True)
        ack(f"A {t} {i}")
        engine.record_put("memory", f"agent-{t % 3}", f"t{t}-{i}", f"record {t} {i}", {"i": i})
        ack(f"R {t} {i}")
        i += 1

for t in range(6):
    threading.Thread(target=worker, args=(t,), daemon=True).start()
ack("READY")
threading.Event().wait()
"""


def _content(t: int, i: int) -> bytes:
    size = (0, 10, 700, 3000, 20000)[i % 5]
    return (f"t{t} i{i} ".encode() * (size // 6 + 1))[:size] + bytes([t, i % 256])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["group", "single"])
def test_no_acknowledged_write_is_lost_on_kill_9(tmp_path: Path, mode: str) -> None:
    db = tmp_path / "storage.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(db), mode], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while sum(1 for x in lines if x.startswith("W")) < 150:
            line = proc.stdout.readline().decode()
            assert line, f"the writer exited early: {proc.stderr.read().decode() if proc.stderr else ''}"
            lines.append(line)
            assert time.monotonic() < deadline, "the writer is too slow"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        rest = proc.stdout.read().decode()  # acknowledged before it died, not read yet
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    # a line cut by the kill was not a complete acknowledgement
    lines += rest.splitlines(keepends=True)
    acks = [x.split() for x in lines if x.endswith("\n") and x[:2] in ("W ", "A ", "R ")]
    assert len(acks) >= 150

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with StorageEngine(db) as engine:
        appended: dict[int, int] = {}
        for kind, t_s, i_s in acks:
            t, i = int(t_s), int(i_s)
            agent = f"agent-{t % 3}"
            if kind == "W":
                assert engine.read(agent, f"t{t}/f{i}")[0] == _content(t, i), (t, i)
            elif kind == "A":
                appended[t] = max(appended.get(t, -1), i)
            else:
                record = engine.record_get("memory", agent, f"t{t}-{i}")
                assert record is not None and record.text == f"record {t} {i}" and record.meta == {"i": i}
        for t, last in appended.items():
            log = engine.read(f"agent-{t % 3}", f"t{t}/log")[0].decode()
            expected = "".join(f"line {i}\n" for i in range(last + 1))
            # every acknowledged append is there, in order; one more may have committed unacknowledged
            assert log.startswith(expected), (t, last)
            assert log in (expected, expected + f"line {last + 1}\n")
        assert engine.integrity_check() == "ok"
        # and the database still takes writes
        engine.write("agent-0", "after-crash", b"fine")
        assert engine.read("agent-0", "after-crash")[0] == b"fine"
