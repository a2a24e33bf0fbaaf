"""WAL checkpoints in a background thread, mostly off the write path.

In WAL mode SQLite by default checkpoints inside the commit that pushes the
log past 1000 pages: that commit copies the log into the database file and,
with synchronous=NORMAL, fsyncs both, so one write in every ~80 small writes
waits for a checkpoint of ~4 MB and two fsyncs. The engine turns automatic
checkpoints off on its writer connection and runs them here instead, after
`every_commits` commits, or once `idle_s` passed with commits not yet
checkpointed (which also bounds how long a commit stays only in the OS page
cache: the window a power loss could take with synchronous=NORMAL).

A checkpoint is a PASSIVE pass on this thread's own connection, while writers
go on: it copies the log into the database file (and fsyncs). Measured here
over 3000 small writes on a busy shared machine: commits over 2 ms went from
85-96 to 41-48, commit p99 from 9-10 ms to 3.7 ms, and writes/s rose 10-30%
(`background_checkpoints=False` gives SQLite's own behaviour, for comparison).

SQLite restarts the log from its beginning only if the writer's transaction
began after every frame had been copied (its read lock is then on slot 0, see
walRestartLog in wal.c); under steady writes the writer has always begun its
next transaction before a concurrent pass ends, even when that pass copied
every frame it saw (measured: 1500 small writes left a 62 MB log). After an
idle period it does restart. So when the log holds more than
`max_log_frames`, a second, short pass runs while holding the writer's turn
(`GroupCommitter.exclusive`): it copies only the frames appended during the
first, the next transaction then starts on a fully copied log and restarts
it, and writers wait for the short pass (then commit in one batch). The log must stay small and be reused, not only bounded: with
synchronous=FULL a commit that extends the log file costs its fsync a size
change too (measured here: 1.7-2.2 ms per small write while the log grows,
0.45-0.65 ms once it is reused), so the bound is SQLite's own default of 1000
pages.

Should this thread fall behind, the writer checkpoints inline after
`hard_limit_commits`, so the log cannot grow without bound.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
from typing import Any, Callable

log = logging.getLogger("aios.storage")


class Checkpointer:
    def __init__(self, connect: Callable[[], sqlite3.Connection], *, every_commits: int = 64,
                 idle_s: float = 1.0, max_log_frames: int = 1000) -> None:
        self._connect = connect
        self.every_commits = every_commits
        self.max_log_frames = max_log_frames
        self.hard_limit_commits = every_commits * 16
        self.idle_s = idle_s
        #: runs a function while no write transaction is open (set by the engine to GroupCommitter.exclusive)
        self.exclusive: Callable[[Callable[[], Any]], Any] | None = None
        self._pending = 0  # commits since the last checkpoint started
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self.checkpoints = 0
        self.finishing_passes = 0
        self.inline_checkpoints = 0
        self._thread = threading.Thread(target=self._run, name="storage-checkpoint", daemon=True)
        self._thread.start()

    def committed(self, conn: sqlite3.Connection) -> None:
        """Called by the writer after each commit (on `conn`, the writer's connection)."""
        with self._lock:
            self._pending += 1
            pending = self._pending
            if pending >= self.hard_limit_commits:
                self._pending = 0
        if pending >= self.hard_limit_commits:
            # between transactions on the writer's own connection: the log restarts after this
            log.warning("storage: background checkpoints fell behind (%d commits); checkpointing inline", pending)
            self._passive(conn)
            self.inline_checkpoints += 1
        elif pending >= self.every_commits:
            self._wake.set()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(10)

    def _passive(self, conn: sqlite3.Connection) -> tuple[int, int]:
        """Checkpoint what can be; return (frames in the log, frames copied), (0, 0) on failure."""
        try:
            _, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return int(frames), int(copied)
        except sqlite3.Error as exc:  # I/O trouble: the next round tries again
            log.warning("storage: WAL checkpoint failed: %s", exc)
            return 0, 0

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            self._pending = 0
        frames, _ = self._passive(conn)
        if frames > self.max_log_frames and self.exclusive is not None:
            self.exclusive(lambda: self._passive(conn))
            self.finishing_passes += 1
        self.checkpoints += 1

    def _run(self) -> None:
        conn = self._connect()
        try:
            while not self._stop:
                self._wake.wait(self.idle_s)
                self._wake.clear()
                if self._stop:
                    break
                with self._lock:
                    pending = self._pending
                if pending:  # enough commits (woken), or idle for idle_s with some not checkpointed
                    self._checkpoint(conn)
        finally:
            conn.close()
