"""Backings for the memory engine outside a kernel: the storage service's stand-ins in benchmarks and tests.

The real manager's backing calls the storage service (another process), so
evicted entries leave the memory manager's RAM.  `SqliteBacking` does the same
in one process with a small, bounded page cache (so RSS figures mean
something), and with `fts` it also searches like the storage service does.
`NullBacking` forgets everything: with it only the store's own objects stay
(the calibration of object sizes).
"""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import msgpack

from aios.managers.memory.bm25 import query_terms
from aios.managers.memory.records import MemoryRecord


class SqliteBacking:
    """A Backing on one SQLite file (benchmarks and tests; see the module docstring).
    With `fts`, it also searches with an FTS5 index ranked by bm25, as a storage service would."""

    def __init__(self, path: str | Path, cache_kib: int = 512, fts: bool = False) -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE IF NOT EXISTS entries (agent TEXT, id TEXT, content TEXT, meta BLOB, "
                         "created REAL, updated REAL, PRIMARY KEY (agent, id))")
        self.fts = fts
        if fts:
            self._db.execute("CREATE VIRTUAL TABLE IF NOT EXISTS entries_fts USING fts5(content, agent UNINDEXED, "
                             "id UNINDEXED)")
        self._lock = threading.Lock()
        self.puts = self.gets = 0

    def put(self, agent: str, record: MemoryRecord, via: Any) -> None:
        meta = msgpack.packb(record.metadata) if record.metadata else None
        with self._lock:
            self.puts += 1
            self._db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?)",
                             (agent, record.id, record.content, meta, record.created, record.updated))
            if self.fts:
                self._db.execute("DELETE FROM entries_fts WHERE agent=? AND id=?", (agent, record.id))
                self._db.execute("INSERT INTO entries_fts VALUES (?, ?, ?)", (record.content, agent, record.id))

    def get(self, agent: str, entry_id: str, via: Any) -> MemoryRecord | None:
        with self._lock:
            self.gets += 1
            row = self._db.execute("SELECT content, meta, created, updated FROM entries WHERE agent=? AND id=?",
                                   (agent, entry_id)).fetchone()
        if row is None:
            return None
        return MemoryRecord(entry_id, row[0], msgpack.unpackb(row[1]) if row[1] else {}, row[2], row[3])

    def delete(self, agent: str, entry_id: str, via: Any) -> bool:
        with self._lock:
            if self.fts:
                self._db.execute("DELETE FROM entries_fts WHERE agent=? AND id=?", (agent, entry_id))
            return self._db.execute("DELETE FROM entries WHERE agent=? AND id=?", (agent, entry_id)).rowcount > 0

    def list(self, agent: str, offset: int, limit: int, via: Any) -> tuple[list[dict[str, Any]], int]:
        with self._lock:
            rows = self._db.execute("SELECT id, meta, created, updated, length(CAST(content AS BLOB)) FROM entries "
                                    "WHERE agent=? ORDER BY created, id LIMIT ? OFFSET ?",
                                    (agent, limit, offset)).fetchall()
            total = self._db.execute("SELECT count(*) FROM entries WHERE agent=?", (agent,)).fetchone()[0]
        return [{"id": r[0], "metadata": msgpack.unpackb(r[1]) if r[1] else {}, "created": r[2],
                 "updated": r[3], "size": r[4]} for r in rows], total

    def search(self, agent: str, query: str, limit: int, via: Any) -> list[tuple[MemoryRecord, float]] | None:
        if not self.fts:
            return None  # no index: the store ranks what it has in RAM
        terms = query_terms(query)
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        with self._lock:
            rows = self._db.execute(
                "SELECT e.id, e.content, e.meta, e.created, e.updated, bm25(entries_fts) AS rank "
                "FROM entries_fts JOIN entries e ON e.agent = entries_fts.agent AND e.id = entries_fts.id "
                "WHERE entries_fts MATCH ? AND entries_fts.agent = ? ORDER BY rank LIMIT ?",
                (match, agent, limit)).fetchall()
        # FTS5's bm25 is negated (lower is better): flip it so higher is better
        return [(MemoryRecord(r[0], r[1], msgpack.unpackb(r[2]) if r[2] else {}, r[3], r[4]), -r[5]) for r in rows]

    def key_at(self, rowid: int) -> tuple[str, str]:
        """(agent, id) of the rowid-th entry written (benchmark bookkeeping without RAM)."""
        with self._lock:
            row = self._db.execute("SELECT agent, id FROM entries WHERE rowid=?", (rowid,)).fetchone()
        return row[0], row[1]

    def close(self) -> None:
        self._db.close()


class NullBacking:
    """A Backing that keeps nothing and finds nothing."""

    def put(self, agent: str, record: MemoryRecord, via: Any) -> None: ...
    def get(self, agent: str, entry_id: str, via: Any) -> None: return None
    def delete(self, agent: str, entry_id: str, via: Any) -> bool: return False
    def list(self, agent: str, offset: int, limit: int, via: Any) -> tuple[list, int]: return [], 0
    def search(self, agent: str, query: str, limit: int, via: Any) -> None: return None
