"""The engine's diagnostics: figures for `aios status` and benchmarks, per-agent statistics, and
an integrity check of SQLite's structures and of the engine's own invariants.

None of these change data (the integrity check applies the index log first,
as any search does). See engine.py for how the engine is composed.
"""
from __future__ import annotations

import contextlib
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from . import chunks as ch
from . import paths as P
from . import textindex as TI
from .checkpoint import Checkpointer
from .writer import GroupCommitter, Tx, WriteFn


class DiagnosticsMixin:
    """The status, statistics and integrity operations of `StorageEngine` (engine.py)."""

    # provided by the engine proper (engine.py)
    path: Path
    synchronous: str
    max_agent_bytes: int
    _writer: GroupCommitter
    _checkpointer: Checkpointer | None
    _snapshot: Callable[[], contextlib.AbstractContextManager[sqlite3.Connection]]
    _write: Callable[[WriteFn[Any]], Any]
    _agent_id: Callable[[sqlite3.Connection, str], "tuple[int, str] | None"]
    # provided by the index log (index_log.py)
    _index_pending: int
    index_flushes: int
    _tx_flush_index: Callable[[Tx], int]

    def activity(self) -> dict[str, Any]:
        """Cheap whole-engine figures (no table scans): the database's size on disk and the
        write path's counters. writes_per_commit > 1 means group commit is sharing transactions;
        index_pending is about how many index changes wait in the index log."""
        commits, ops = self._writer.commits, self._writer.operations
        cp = self._checkpointer
        return {
            "path": str(self.path), "synchronous": self.synchronous,
            "database_bytes": self._database_bytes(),
            "commits": commits, "write_operations": ops,
            "writes_per_commit": round(ops / commits, 2) if commits else None,
            "checkpoints": cp.checkpoints if cp else None,
            "index_pending": self._index_pending, "index_flushes": self.index_flushes,
        }

    def _database_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm"))
                   if p.exists())

    def stats(self, agent: str | None = None) -> dict[str, Any]:
        """Counts and sizes, for one agent or for the whole database.

        raw_bytes: the sizes of every kept version added up (what storing each whole would take);
        stored_bytes: what they take here (compressed, deduplicated chunks + manifests);
        compression_ratio = raw_bytes / stored_bytes; index_bytes: text held by the full-text
        index; used_bytes = stored_bytes + index_bytes + record_bytes, what the quota limits.
        """
        with self._snapshot() as conn:
            if agent is None:
                where, args = "", ()
                agents, file_bytes, index_bytes, record_bytes = conn.execute(
                    "SELECT count(*), coalesce(sum(file_bytes), 0), coalesce(sum(index_bytes), 0), "
                    "coalesce(sum(record_bytes), 0) FROM agents").fetchone()
            else:
                agent = P.agent_name(agent)
                found = self._agent_id(conn, agent)
                if found is None:
                    return self._stats_dict(dict.fromkeys(("files", "deleted_files", "versions", "current_bytes",
                                                           "raw_bytes", "stored_bytes", "index_bytes", "chunks",
                                                           "chunk_bytes", "records", "record_bytes"), 0), agent)
                where, args = " WHERE agent_id = ?", (found[0],)
                agents = 1
                file_bytes, index_bytes, record_bytes = conn.execute(
                    "SELECT file_bytes, index_bytes, record_bytes FROM agents WHERE id = ?", (found[0],)).fetchone()
            files, deleted, current = conn.execute(
                f"SELECT count(*) - coalesce(sum(deleted), 0), coalesce(sum(deleted), 0), coalesce(sum(size), 0) "
                f"FROM files{where}", args).fetchone()
            versions, raw = conn.execute(
                "SELECT count(*), coalesce(sum(v.size), 0) FROM versions AS v JOIN files AS f ON f.id = v.file_id"
                + (" WHERE f.agent_id = ?" if where else ""), args).fetchone()
            chunks, chunk_bytes = conn.execute(
                f"SELECT count(*), coalesce(sum(stored), 0) FROM chunks{where}", args).fetchone()
            records = conn.execute(f"SELECT count(*) FROM records{where}", args).fetchone()[0]
        out = self._stats_dict({
            "files": files, "deleted_files": deleted, "versions": versions, "current_bytes": current,
            "raw_bytes": raw, "stored_bytes": file_bytes, "index_bytes": index_bytes, "chunks": chunks,
            "chunk_bytes": chunk_bytes, "records": records, "record_bytes": record_bytes}, agent)
        if agent is None:
            out["agents"] = agents
            act = self.activity()
            out.update({k: act[k] for k in ("database_bytes", "commits", "write_operations", "checkpoints")})
        return out

    def _stats_dict(self, counts: dict[str, int], agent: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {"agent": agent} if agent is not None else {}
        out.update(counts)
        stored = counts["stored_bytes"]
        out["compression_ratio"] = round(counts["raw_bytes"] / stored, 3) if stored else None
        out["used_bytes"] = stored + counts["index_bytes"] + counts["record_bytes"]
        out["quota_bytes"] = self.max_agent_bytes
        return out

    def integrity_check(self) -> str:
        """"ok", or what is wrong: SQLite's integrity_check, both full-text indexes, and the
        engine's own invariants (chunk reference counts, per-agent usage, versions, index rows)."""
        return self._write(self._tx_integrity)

    def _tx_integrity(self, tx: Tx) -> str:
        self._tx_flush_index(tx)  # the invariants below are about the index with the log applied
        conn = tx.conn
        problems = [r[0] for r in conn.execute("PRAGMA integrity_check") if r[0] != "ok"]
        for table in ("files_fts", "records_fts"):
            try:
                conn.execute(f"INSERT INTO {table}({table}) VALUES ('integrity-check')")
            except sqlite3.DatabaseError as exc:
                problems.append(f"{table}: {exc}")
        refs: Counter[int] = Counter()
        manifest_bytes: Counter[int] = Counter()
        for agent_id, manifest in conn.execute(
                "SELECT f.agent_id, v.manifest FROM versions AS v JOIN files AS f ON f.id = v.file_id"):
            refs.update(ch.manifest_ids(manifest))
            manifest_bytes[agent_id] += len(manifest)
        chunk_bytes: Counter[int] = Counter()
        for cid, agent_id, stored_refs, size, data_size in conn.execute(
                "SELECT c.id, c.agent_id, c.refs, c.stored, length(d.data) FROM chunks AS c "
                "LEFT JOIN chunk_data AS d ON d.id = c.id"):
            chunk_bytes[agent_id] += size
            if data_size != size:
                problems.append(f"chunk {cid}: {size} bytes recorded, {data_size} stored")
            used = refs.pop(cid, 0)
            if stored_refs != used:
                problems.append(f"chunk {cid}: refs is {stored_refs}, manifests use it {used} times")
        if refs:
            problems.append(f"{len(refs)} chunks used by manifests are missing")
        orphans = conn.execute("SELECT count(*) FROM chunk_data WHERE id NOT IN (SELECT id FROM chunks)").fetchone()[0]
        if orphans:
            problems.append(f"{orphans} chunk_data rows belong to no chunk")
        record_bytes = dict(conn.execute("SELECT agent_id, sum(size) FROM records GROUP BY agent_id").fetchall())
        index_bytes = dict(conn.execute("SELECT agent_id, sum(index_bytes) FROM files GROUP BY agent_id").fetchall())
        for agent_id, name, file_b, index_b, record_b in conn.execute(
                "SELECT id, name, file_bytes, index_bytes, record_bytes FROM agents"):
            expected = chunk_bytes.get(agent_id, 0) + manifest_bytes.get(agent_id, 0)
            for what, have, want in (("file_bytes", file_b, expected), ("index_bytes", index_b,
                                     index_bytes.get(agent_id, 0)), ("record_bytes", record_b,
                                     record_bytes.get(agent_id, 0))):
                if have != want:
                    problems.append(f"agent {name!r}: {what} is {have}, its data takes {want}")
        for file_id, path, head, oldest, n, lo, hi in conn.execute(
                "SELECT f.id, f.path, f.head, f.oldest, count(v.version), min(v.version), max(v.version) "
                "FROM files AS f LEFT JOIN versions AS v ON v.file_id = f.id GROUP BY f.id"):
            if (n, lo, hi) != (head - oldest + 1, oldest, head):
                problems.append(f"file {file_id} ({path!r}): head {head}, oldest {oldest}, "
                                f"but {n} versions {lo}..{hi} are stored")
        blocks = Counter(rowid >> TI.BLOCK_SHIFT for (rowid,) in conn.execute("SELECT rowid FROM files_fts"))
        for file_id, path, want in conn.execute("SELECT id, path, index_blocks FROM files"):
            have = blocks.pop(file_id, 0)
            if have != want:
                problems.append(f"file {file_id} ({path!r}): {have} full-text rows, expected {want}")
        if blocks:
            problems.append(f"full-text rows of {len(blocks)} files that do not exist")
        return "ok" if not problems else "\n".join(problems)

