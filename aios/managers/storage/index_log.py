"""The index log: full-text index changes are logged with each write and applied in batches.

A write does not change `files_fts` itself. Its index changes go, in the same
transaction, to the table `index_log`, and are applied in batches: by the
storage manager once a few thousand have gathered (after that batch's replies
went out) and when it is idle, and by every search first (read your writes:
an acknowledged write's log rows are committed, so a search always sees it).
PostgreSQL's GIN pending list does the same. Why: FTS5 writes a segment per
transaction, so indexing a batch of 7 small files cost 38 us per file, a batch
of 128 about 19 us; applying the log also takes a file written again meanwhile
only once, and moves the indexing off the path a write's answer waits on. A
crash loses nothing: the log is committed with the writes and applied by the
next flush.

`set_index` and `apply_log` are the log's two halves (used by the file
operations too, files.py); `IndexLogMixin` is the engine's part that keeps
the count of waiting changes and applies the log (see engine.py for how the
engine is composed).
"""
from __future__ import annotations

import sqlite3
from typing import Any, Callable

from . import textindex as TI
from .writer import Tx, WriteFn

#: index log changes past which a write applies the whole log at once (bounds it when nobody flushes)
INDEX_LOG_MAX = 8192


def set_index(tx: Tx, file_id: int, scope: str, path: str, plan: TI.IndexPlan | None, old_blocks: int) -> None:
    """Change the file's full-text rows from block plan.first_block on (None: remove them all):
    each change goes to the index log, each block's old row removed just before its new one
    goes in. Rows are addressed by exact rowid: measured here, deleting a rowid range made FTS5
    scan and cost about 3x more."""
    base = file_id << TI.BLOCK_SHIFT
    first = 0 if plan is None else plan.first_block
    blocks = [] if plan is None else plan.blocks
    for b in range(first, max(old_blocks, first + len(blocks))):
        if b < old_blocks:
            tx.defer((base + b, None, None, None))
        if b - first < len(blocks):
            tx.defer((base + b, scope, path, blocks[b - first]))


def apply_log(conn: sqlite3.Connection, fts_rowid: int | None = None) -> int:
    """Apply the logged changes (only those of row `fts_rowid` if given) to files_fts and take
    them off the log, inside the caller's transaction. Returns how many were applied.

    A row's changes alternate (a remove only where a row is, an insert only where none is),
    so their net effect is: remove the row if the first change removes it, then insert the
    last change's row if the last change inserts. Rows go in rowid order: FTS5 writes a
    segment out early whenever a rowid comes at or below the last one it was given
    (measured here: batches of 7 random 200-byte files cost 46 us per write unsorted,
    36 us sorted)."""
    where, params = ("", ()) if fts_rowid is None else (" WHERE fts_rowid = ?", (fts_rowid,))
    net: dict[int, list[Any]] = {}  # rowid -> [first change removes, last change's row or None]
    last_seq = n = 0
    for seq, rowid, scope, path, body in conn.execute(
            f"SELECT seq, fts_rowid, scope, path, body FROM index_log{where} ORDER BY seq", params):
        row = None if body is None else (rowid, scope, path, body)
        change = net.get(rowid)
        if change is None:
            net[rowid] = [row is None, row]
        else:
            change[1] = row
        last_seq, n = seq, n + 1
    if not n:
        return 0
    for rowid in sorted(net):
        removes_first, row = net[rowid]
        if removes_first:
            conn.execute("DELETE FROM files_fts WHERE rowid = ?", (rowid,))
        if row is not None:
            conn.execute("INSERT INTO files_fts(rowid, scope, path, body) VALUES (?, ?, ?, ?)", row)
    if fts_rowid is None:
        conn.execute("DELETE FROM index_log WHERE seq <= ?", (last_seq,))
    else:
        conn.execute("DELETE FROM index_log WHERE fts_rowid = ?", (fts_rowid,))
    return n


class IndexLogMixin:
    """The engine's part that counts the changes waiting in the index log and applies it."""

    # provided by the engine proper (engine.py)
    _write: Callable[[WriteFn[Any]], Any]

    def _init_index_log(self, conn: sqlite3.Connection) -> None:
        # changes waiting in the index log (a crash may have left some: the next flush applies them)
        self._index_pending = int(conn.execute("SELECT count(*) FROM index_log").fetchone()[0])
        self.index_flushes = 0

    def _log_index(self, conn: sqlite3.Connection, changes: list[tuple[Any, ...]]) -> None:
        """The write path's sink (writer.py `Tx.defer`): a batch's index changes, in one statement."""
        conn.executemany("INSERT INTO index_log(fts_rowid, scope, path, body) VALUES (?, ?, ?, ?)", changes)
        self._index_pending += len(changes)
        if self._index_pending >= INDEX_LOG_MAX:
            apply_log(conn)  # bounds the log for engine users that never flush
            self._index_pending = 0

    def _tx_flush_index(self, tx: Tx) -> int:
        tx.flush_deferred()
        applied = apply_log(tx.conn)
        tx.after_commit(lambda: self._index_flushed(applied))
        return applied

    def _index_flushed(self, applied: int) -> None:
        # less what was applied, not zero: operations after the flush in its batch logged more
        self._index_pending = max(0, self._index_pending - applied)
        self.index_flushes += 1

    @property
    def index_pending(self) -> int:
        """About how many full-text index changes wait in the log: a hint for when to apply it
        (a failed batch may have counted changes it did not log); searches read the log itself."""
        return self._index_pending

    def flush_index(self, min_changes: int = 1) -> int:
        """Apply the index log to the full-text index now if about `min_changes` changes wait;
        returns how many were applied. Searches do this themselves; the storage manager calls
        it after a batch once enough changes have gathered, and when it is idle."""
        if self._index_pending < max(1, min_changes):
            return 0
        return self._write(self._tx_flush_index)
