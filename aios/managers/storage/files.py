"""The engine's files: per-agent versioned files (write, append, read, list, history, rollback,
delete) and full-text search over them.

An agent's file is a row of `files`; each write adds a row to `versions`
whose manifest lists the chunks of its content (content.py). Every operation
is keyed by the caller's agent id and its path is canonicalized first
(paths.py), so no spelling reaches another agent's files. The file's text goes
to the full-text index through the index log (index_log.py). See engine.py
for the decisions (atomicity, versions, deletes, quota) and for how the
engine is composed.
"""
from __future__ import annotations

import contextlib
import sqlite3
import time
from typing import Any, Callable

from aios.protocol import ErrorCode

from . import chunks as ch
from . import content as C
from . import paths as P
from . import query as Q
from . import textindex as TI
from .checks import MAX_LIST_LIMIT, MAX_SEARCH_LIMIT, SNIPPET_TOKENS, int_arg, seconds
from .errors import StorageError, invalid, not_found
from .index_log import apply_log, set_index
from .models import Deleted, FileInfo, SearchHit, VersionInfo
from .writer import Tx, WriteFn

# a files row as read by _file_row: indexes into the tuple
_ID, _HEAD, _OLDEST, _DELETED, _SIZE, _CREATED, _MODIFIED, _INDEXED, _BLOCKS, _TAIL, _INDEX_BYTES = range(11)
_FILE_COLUMNS = ("id, head, oldest, deleted, size, created_ns, modified_ns, indexed, index_blocks, index_tail, "
                 "index_bytes")


def _as_bytes(data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, str):
        raise invalid("data must be bytes, not str: encode text as UTF-8 first")
    raise invalid(f"data must be bytes, not {type(data).__name__}")


class FilesMixin:
    """The file operations of `StorageEngine` (engine.py)."""

    # provided by the engine proper (engine.py)
    max_file_bytes: int
    max_index_bytes: int
    versions_kept: int
    chunker: ch.Chunker
    _snapshot: Callable[[], contextlib.AbstractContextManager[sqlite3.Connection]]
    _reader: Callable[[], sqlite3.Connection]
    _write: Callable[[WriteFn[Any]], Any]
    _agent_id: Callable[[sqlite3.Connection, str], "tuple[int, str] | None"]
    _agent_for_write: Callable[[Tx, str], tuple[int, str]]
    _charge: Callable[..., None]
    _too_large: Callable[[str, int], StorageError]
    # provided by the index log (index_log.py)
    _tx_flush_index: Callable[[Tx], int]

    # ------------------------------------------------------------- versions
    def _file_row(self, conn: sqlite3.Connection, agent_id: int, path: str) -> tuple[Any, ...] | None:
        return conn.execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE agent_id = ? AND path = ?",
                            (agent_id, path)).fetchone()

    def _check_no_conflict(self, conn: sqlite3.Connection, agent_id: int, path: str) -> None:
        """A new file may not sit under a file, nor where a directory is."""
        for parent in P.parents(path):
            if conn.execute("SELECT 1 FROM files WHERE agent_id = ? AND path = ? AND deleted = 0",
                            (agent_id, parent)).fetchone():
                raise invalid(f"cannot create {path!r}: {parent!r} is a file, not a directory")
        low, high = P.subtree_bounds(path)
        row = conn.execute("SELECT path FROM files WHERE agent_id = ? AND path >= ? AND path < ? AND deleted = 0 "
                           "LIMIT 1", (agent_id, low, high)).fetchone()
        if row:
            raise invalid(f"cannot create file {path!r}: it is a directory (it holds {row[0]!r})")

    def _new_version(self, tx: Tx, agent: str, agent_id: int, scope: str, path: str, row: tuple[Any, ...] | None,
                     op: str, size: int, ids: list[int], added: int, manifest: bytes, plan: TI.IndexPlan | None,
                     source: int | None = None) -> FileInfo:
        """Record a version with `manifest` (using chunks `ids`, new ones already stored: `added`
        bytes), make it the file's newest, prune old versions, update the index (plan None:
        unchanged) and charge the agent. Returns the file's info."""
        conn = tx.conn
        now = time.time_ns()
        C.add_refs(conn, ids)
        if plan is None:
            assert row is not None, "a new file needs an index plan"
            indexed, blocks, tail, index_bytes = row[_INDEXED], row[_BLOCKS], row[_TAIL], row[_INDEX_BYTES]
        else:
            indexed, blocks, tail, index_bytes = plan.indexed, plan.block_count, plan.tail, plan.index_bytes
        old_index_bytes = 0 if row is None or row[_DELETED] else row[_INDEX_BYTES]
        if row is None:
            cur = conn.execute(
                "INSERT INTO files(agent_id, path, head, oldest, deleted, size, created_ns, modified_ns, indexed, "
                "index_blocks, index_tail, index_bytes) VALUES (?, ?, 1, 1, 0, ?, ?, ?, ?, ?, ?, ?)",
                (agent_id, path, size, now, now, indexed, blocks, tail, index_bytes))
            file_id, version, oldest, created = int(cur.lastrowid), 1, 1, now
        else:
            file_id, version, oldest, created = row[_ID], row[_HEAD] + 1, row[_OLDEST], row[_CREATED]
        conn.execute("INSERT INTO versions(file_id, version, op, source, size, created_ns, manifest) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?)", (file_id, version, op, source, size, now, manifest))
        freed, oldest = C.prune(conn, file_id, version, oldest, self.versions_kept)
        if row is not None:
            conn.execute("UPDATE files SET head = ?, oldest = ?, deleted = 0, size = ?, modified_ns = ?, indexed = ?, "
                         "index_blocks = ?, index_tail = ?, index_bytes = ? WHERE id = ?",
                         (version, oldest, size, now, indexed, blocks, tail, index_bytes, file_id))
        if plan is not None:
            set_index(tx, file_id, scope, path, plan, 0 if row is None else row[_BLOCKS])
        self._charge(conn, agent_id, agent, file_bytes=added + len(manifest) - freed,
                     index_bytes=index_bytes - old_index_bytes)
        return FileInfo(path=path, size=size, version=version, versions=version - oldest + 1, oldest_version=oldest,
                        created=seconds(created), modified=seconds(now))

    # ---------------------------------------------------------------- files
    def write(self, agent: str, path: str, data: bytes, *, append: bool = False) -> FileInfo:
        """Store `data` as a new version of the file (created if missing), or append it to the
        current content. Returns the file's info (its new version number)."""
        return self._write(self.write_fn(agent, path, data, append=append))

    def write_fn(self, agent: str, path: str, data: bytes, *, append: bool = False) -> WriteFn[FileInfo]:
        """`write` as a write operation for `submit`: the arguments are checked (and the content
        chunked) now, so a bad one raises here; the rest runs in the transaction."""
        agent = P.agent_name(agent)
        path = P.file_path(path)
        data = _as_bytes(data)
        if not isinstance(append, bool):
            raise invalid(f"append must be true or false, not {type(append).__name__}")
        if len(data) > self.max_file_bytes:
            raise self._too_large(path, len(data))
        if append:
            return lambda tx: self._tx_append(tx, agent, path, data)
        # chunking, hashing, compressing and text checks happen here, in the caller's thread and
        # outside the write lock: zlib and hashlib release the GIL, so this overlaps other commits
        prepared = C.prepare(self.chunker, data)
        plan = TI.plan_full(data, len(data), self.max_index_bytes)
        return lambda tx: self._tx_write(tx, agent, path, prepared, len(data), plan)

    def _tx_write(self, tx: Tx, agent: str, path: str, prepared: bytes | list[ch.Chunk], size: int,
                  plan: TI.IndexPlan) -> FileInfo:
        conn = tx.conn
        agent_id, scope = self._agent_for_write(tx, agent)
        row = self._file_row(conn, agent_id, path)
        if row is None or row[_DELETED]:
            self._check_no_conflict(conn, agent_id, path)
        ids, added, manifest = C.store(conn, agent_id, prepared)
        return self._new_version(tx, agent, agent_id, scope, path, row, "write", size, ids, added, manifest, plan)

    def _tx_append(self, tx: Tx, agent: str, path: str, data: bytes) -> FileInfo:
        conn = tx.conn
        agent_id, scope = self._agent_for_write(tx, agent)
        row = self._file_row(conn, agent_id, path)
        if row is None or row[_DELETED] or row[_SIZE] == 0:
            # appending to nothing (or to an empty file) is writing
            if row is None or row[_DELETED]:
                self._check_no_conflict(conn, agent_id, path)
            ids, added, manifest = C.store(conn, agent_id, C.prepare(self.chunker, data))
            plan = TI.plan_full(data, len(data), self.max_index_bytes)
            return self._new_version(tx, agent, agent_id, scope, path, row, "append", len(data), ids, added,
                                     manifest, plan)
        old_size = row[_SIZE]
        size = old_size + len(data)
        if size > self.max_file_bytes:
            raise self._too_large(path, size)
        old = C.version_manifest(conn, row[_ID], row[_HEAD])
        if isinstance(old, bytes):  # small content kept inline: store the whole again
            ids: list[int] = []
            last = old
            new_ids, added, manifest = C.store(conn, agent_id, C.prepare(self.chunker, old + data))
        else:
            # Re-chunk from the start of the last chunk: every earlier chunk is shared (chunks.py).
            ids = old
            last = C.load(conn, ids[-1:])
            new_ids, added = C.put_chunks(conn, agent_id, [ch.encode(p) for p in self.chunker.split(last + data)])
            new_ids = ids[:-1] + new_ids
            manifest = ch.pack_manifest(new_ids)
        # binary, text indexed up to the cap, or a cap lowered since it was indexed: the index stays
        plan: TI.IndexPlan | None = None
        cap = self.max_index_bytes
        if row[_INDEXED] == TI.TEXT and row[_TAIL] <= cap:
            # re-index from the start of the last block: content[tail:old_size] + data. The last
            # block's text is in the index; only an incomplete last character (`pending`) is not.
            tail, pending = row[_TAIL], old_size - row[_INDEX_BYTES]
            last_block = (row[_ID] << TI.BLOCK_SHIFT) + row[_BLOCKS] - 1
            tx.flush_deferred()  # earlier writes of this batch may have changed the row: log them,
            apply_log(conn, last_block)  # then bring the row up to date
            body = conn.execute("SELECT body FROM files_fts WHERE rowid = ?", (last_block,)).fetchone()
            indexed_part = body[0].encode("utf-8") if body is not None else b""
            if body is not None and len(indexed_part) == row[_INDEX_BYTES] - tail and len(last) >= pending:
                old_part = indexed_part + last[len(last) - pending:]
            else:  # not expected; rebuild from the content
                need = old_size - tail
                before = last if len(last) >= need or not ids else C.load_suffix(conn, ids, need)
                old_part = before[len(before) - need:]
            region = (old_part + data)[:cap - tail]
            plan = TI.plan_append(region, tail, row[_BLOCKS] - 1, size, cap)
        return self._new_version(tx, agent, agent_id, scope, path, row, "append", size, new_ids, added, manifest,
                                 plan)

    def read(self, agent: str, path: str, version: int | None = None) -> tuple[bytes, FileInfo]:
        """The content of the file's current version, or of a kept `version`, and that version's info."""
        agent = P.agent_name(agent)
        path = P.file_path(path)
        if version is not None:
            int_arg(version, "version", 1)
        with self._snapshot() as conn:
            found = self._agent_id(conn, agent)
            row = self._file_row(conn, found[0], path) if found else None
            if row is None:
                raise self._no_file(conn, found, path)
            file_id, head, oldest, deleted = row[_ID], row[_HEAD], row[_OLDEST], row[_DELETED]
            if version is None:
                if deleted:
                    raise not_found(f"file {path!r} was deleted (version {head}); read an older version, or "
                                    f"rollback to one, to get it back")
                version = head
            vrow = conn.execute("SELECT op, size, created_ns, manifest FROM versions WHERE file_id = ? AND version = ?",
                                (file_id, version)).fetchone()
            if vrow is None:
                raise not_found(f"file {path!r} has no version {version}; the versions kept are "
                                f"{oldest}..{head}")
            if vrow[0] == "delete":
                raise not_found(f"version {version} of {path!r} is its deletion and has no content")
            data = C.content(conn, vrow[3])
        if len(data) != vrow[1]:
            raise StorageError(ErrorCode.INTERNAL, f"storage: {path!r} version {version} is {len(data)} bytes, "
                               f"expected {vrow[1]}")
        info = FileInfo(path=path, size=vrow[1], version=version, versions=head - oldest + 1, oldest_version=oldest,
                        created=seconds(row[_CREATED]), modified=seconds(vrow[2]))
        return data, info

    @staticmethod
    def _is_dir(conn: sqlite3.Connection, found: tuple[int, str] | None, path: str) -> bool:
        if found is None:
            return False
        low, high = P.subtree_bounds(path)
        return conn.execute("SELECT 1 FROM files WHERE agent_id = ? AND path >= ? AND path < ? AND deleted = 0 "
                            "LIMIT 1", (found[0], low, high)).fetchone() is not None

    def _no_file(self, conn: sqlite3.Connection, found: tuple[int, str] | None, path: str) -> StorageError:
        if self._is_dir(conn, found, path):
            return not_found(f"{path!r} is a directory, not a file")
        return not_found(f"no file {path!r}")

    def stat(self, agent: str, path: str) -> FileInfo:
        """Info on a file (or, if `path` is a directory, an entry with kind "dir")."""
        agent = P.agent_name(agent)
        path = P.file_path(path)
        with self._snapshot() as conn:
            found = self._agent_id(conn, agent)
            row = self._file_row(conn, found[0], path) if found else None
            if row is None or row[_DELETED]:
                if self._is_dir(conn, found, path):
                    return FileInfo(path=path, kind="dir")
                if row is not None:
                    raise not_found(f"file {path!r} was deleted (version {row[_HEAD]}); rollback restores it")
                raise not_found(f"no file {path!r}")
        return self._info(path, row)

    @staticmethod
    def _info(path: str, row: tuple[Any, ...]) -> FileInfo:
        head, oldest = row[_HEAD], row[_OLDEST]
        return FileInfo(path=path, size=row[_SIZE], version=head, versions=head - oldest + 1, oldest_version=oldest,
                        created=seconds(row[_CREATED]), modified=seconds(row[_MODIFIED]),
                        deleted=bool(row[_DELETED]))

    def list(self, agent: str, prefix: str = "", recursive: bool = True, *, include_deleted: bool = False,
             after: str = "", limit: int = 1000) -> list[FileInfo]:
        """Files under directory `prefix` ("" is the root), in path order.

        recursive=False lists the directory's own files and its subdirectories (kind "dir").
        If `prefix` names a file, that file alone is listed. Paging: pass the last path you
        got as `after`. Deleted files are listed only with include_deleted.
        """
        agent = P.agent_name(agent)
        directory = P.dir_prefix(prefix)
        if not isinstance(after, str):
            raise invalid(f"after must be a string, not {type(after).__name__}")
        if not isinstance(recursive, bool) or not isinstance(include_deleted, bool):
            raise invalid("recursive and include_deleted must be true or false")
        int_arg(limit, "limit", 1, MAX_LIST_LIMIT)
        live = "" if include_deleted else " AND deleted = 0"
        out: list[FileInfo] = []
        with self._snapshot() as conn:
            found = self._agent_id(conn, agent)
            if found is None:
                return out
            agent_id = found[0]
            if directory:
                row = self._file_row(conn, agent_id, directory)
                if row is not None and (include_deleted or not row[_DELETED]) and after < directory:
                    return [self._info(directory, row)]
            low, high = P.subtree_bounds(directory)
            cursor = max(low, after + "\x00") if after else low
            bound = " AND path < ?" if high is not None else ""
            sql = f"SELECT path, {_FILE_COLUMNS} FROM files WHERE agent_id = ? AND path >= ?{bound}{live} ORDER BY path"
            extra = (high,) if high is not None else ()
            if recursive:
                for r in conn.execute(sql + " LIMIT ?", (agent_id, cursor, *extra, limit)):
                    out.append(self._info(r[0], r[1:]))
                return out
            # one entry per file or subdirectory: after a subdirectory, seek past its whole subtree
            sql += " LIMIT 1"
            while len(out) < limit:
                r = conn.execute(sql, (agent_id, cursor, *extra)).fetchone()
                if r is None:
                    break
                rest = r[0][len(low):]
                if "/" in rest:
                    sub = low + rest.split("/", 1)[0]
                    if sub > after:
                        out.append(FileInfo(path=sub, kind="dir"))
                    cursor = sub + "0"  # '0' follows '/': the first path after sub's subtree
                else:
                    out.append(self._info(r[0], r[1:]))
                    cursor = r[0] + "\x00"
        return out

    def history(self, agent: str, path: str) -> list[VersionInfo]:
        """The kept versions of a file (also of a deleted one), newest first."""
        agent = P.agent_name(agent)
        path = P.file_path(path)
        with self._snapshot() as conn:
            found = self._agent_id(conn, agent)
            row = self._file_row(conn, found[0], path) if found else None
            if row is None:
                raise self._no_file(conn, found, path)
            head, deleted = row[_HEAD], row[_DELETED]
            rows = conn.execute("SELECT version, op, size, created_ns, source FROM versions WHERE file_id = ? "
                                "ORDER BY version DESC", (row[_ID],)).fetchall()
        return [VersionInfo(version=v, op=op, size=size, created=seconds(ns), source=src,
                            current=(v == head and not deleted)) for v, op, size, ns, src in rows]

    def rollback(self, agent: str, path: str, version: int) -> FileInfo:
        """Make a new version whose content is exactly that of kept `version` (restores a deleted file)."""
        agent = P.agent_name(agent)
        path = P.file_path(path)
        int_arg(version, "version", 1)
        return self._write(lambda tx: self._tx_rollback(tx, agent, path, version))

    def _tx_rollback(self, tx: Tx, agent: str, path: str, version: int) -> FileInfo:
        conn = tx.conn
        found = self._agent_id(conn, agent)
        row = self._file_row(conn, found[0], path) if found else None
        if found is None or row is None:
            raise self._no_file(conn, found, path)
        agent_id, scope = found
        vrow = conn.execute("SELECT op, size, manifest FROM versions WHERE file_id = ? AND version = ?",
                            (row[_ID], version)).fetchone()
        if vrow is None:
            raise not_found(f"file {path!r} has no version {version}; the versions kept are "
                            f"{row[_OLDEST]}..{row[_HEAD]}")
        op, size, manifest = vrow
        if op == "delete":
            raise invalid(f"version {version} of {path!r} is its deletion; roll back to a version with content")
        if size > self.max_file_bytes:
            raise self._too_large(path, size)
        if row[_DELETED]:
            self._check_no_conflict(conn, agent_id, path)
        plan = TI.plan_full(C.content(conn, manifest, limit=self.max_index_bytes), size, self.max_index_bytes)
        return self._new_version(tx, agent, agent_id, scope, path, row, "rollback", size, ch.manifest_ids(manifest), 0,
                                 manifest, plan, source=version)

    def delete(self, agent: str, path: str, *, purge: bool = False) -> Deleted:
        """Delete a file. Its history is kept (rollback restores it) unless purge=True, which
        removes every version and frees their space; purge also works on a deleted file."""
        agent = P.agent_name(agent)
        path = P.file_path(path)
        if not isinstance(purge, bool):
            raise invalid(f"purge must be true or false, not {type(purge).__name__}")
        return self._write(lambda tx: self._tx_delete(tx, agent, path, purge))

    def _tx_delete(self, tx: Tx, agent: str, path: str, purge: bool) -> Deleted:
        conn = tx.conn
        found = self._agent_id(conn, agent)
        row = self._file_row(conn, found[0], path) if found else None
        if found is None or row is None:
            raise self._no_file(conn, found, path)
        agent_id = found[0]
        file_id, head, oldest, deleted = row[_ID], row[_HEAD], row[_OLDEST], row[_DELETED]
        if deleted and not purge:
            raise not_found(f"file {path!r} is already deleted; purge=true removes its history")
        index_freed = 0 if deleted else row[_INDEX_BYTES]
        set_index(tx, file_id, "", path, None, row[_BLOCKS])
        freed = 0
        if not purge:
            now = time.time_ns()
            version = head + 1
            tombstone = ch.pack_manifest([])
            conn.execute("INSERT INTO versions(file_id, version, op, source, size, created_ns, manifest) "
                         "VALUES (?, ?, 'delete', NULL, 0, ?, ?)", (file_id, version, now, tombstone))
            freed, oldest = C.prune(conn, file_id, version, oldest, self.versions_kept)
            freed -= len(tombstone)
            if oldest < version:  # something is left to restore
                conn.execute("UPDATE files SET head = ?, oldest = ?, deleted = 1, size = 0, modified_ns = ?, "
                             "indexed = 0, index_blocks = 0, index_tail = 0, index_bytes = 0 WHERE id = ?",
                             (version, oldest, now, file_id))
                self._charge(conn, agent_id, agent, file_bytes=-freed, index_bytes=-index_freed)
                return Deleted(path=path, version=version, purged=False, freed_bytes=max(freed + index_freed, 0))
            # nothing left to restore (versions_kept = 1): purge after all
        manifests = [m for (m,) in conn.execute("DELETE FROM versions WHERE file_id = ? RETURNING manifest",
                                                (file_id,))]
        freed += sum(len(m) for m in manifests) + C.drop_refs(
            conn, [cid for m in manifests for cid in ch.manifest_ids(m)])
        conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self._charge(conn, agent_id, agent, file_bytes=-freed, index_bytes=-index_freed)
        return Deleted(path=path, version=None, purged=True, freed_bytes=freed + index_freed)

    def search(self, agent: str, query: str, limit: int = 10, *, match: str = "all") -> list[SearchHit]:
        """The agent's files whose current text (or path) matches `query` (see query.py for the
        syntax), best first, one hit per file (its best block): score is -bm25, the path weighing
        twice the body."""
        agent = P.agent_name(agent)
        int_arg(limit, "limit", 1, MAX_SEARCH_LIMIT)
        # Read your writes: every acknowledged write's index changes are committed in the log,
        # so if the log holds any, apply it before searching (a read of one row when it is empty).
        if self._reader().execute("SELECT EXISTS (SELECT 1 FROM index_log)").fetchone()[0]:
            self._write(self._tx_flush_index)
        with self._snapshot() as conn:
            found = self._agent_id(conn, agent)
            expr = Q.match_expression(query, found[1] if found else "0", "{path body}", match)
            if found is None:
                return []
            # Rows are blocks: keep each file's best. FTS5 sorts by its own rank (bm25 with these
            # column weights) and rows are stepped lazily, so snippet() runs only for rows read.
            # Measured here: 0.32 ms per search, against 1.1 ms ranking first and asking for the
            # chosen rows' snippets afterwards (FTS5 evaluates the whole match again for those).
            hits: dict[int, SearchHit] = {}
            try:
                cursor = conn.execute(
                    f"SELECT files_fts.rowid >> {TI.BLOCK_SHIFT}, f.path, f.head, files_fts.rank, "
                    f"snippet(files_fts, 2, '[', ']', '...', {SNIPPET_TOKENS}) "
                    f"FROM files_fts JOIN files AS f ON f.id = (files_fts.rowid >> {TI.BLOCK_SHIFT}) "
                    "WHERE files_fts MATCH ? AND files_fts.rank MATCH 'bm25(0.0, 2.0, 1.0)' "
                    "AND f.agent_id = ? AND f.deleted = 0 ORDER BY files_fts.rank", (expr, found[0]))
                try:
                    for file_id, path, head, rank, snip in cursor:
                        if file_id not in hits:
                            hits[file_id] = SearchHit(path=path, version=head, score=-rank, snippet=snip)
                            if len(hits) == limit:
                                break
                finally:
                    cursor.close()  # we may stop early: end the statement before the read transaction
            except sqlite3.OperationalError as exc:
                raise invalid(f"query {query!r} cannot be searched: {exc}") from None
        return list(hits.values())

