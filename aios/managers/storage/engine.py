"""The storage engine: per-agent versioned files and owner-scoped records in one SQLite file.

This is everything below the storage manager's sockets: the manager process
wraps one `StorageEngine` and calls it from its handler threads. The database
lives in a data directory that outlives kernel runs (`default_database_path`).

Layout (schema.py): an agent's file is a row of `files`; each write adds a row
to `versions` whose manifest lists the chunks of its content (chunks.py:
content-defined chunks stored once per agent by hash, reference-counted,
zlib-compressed when that pays; content up to 1 KiB is kept inline in the
version row). The current version of every text file is in the full-text
index `files_fts`, in append-stable blocks (textindex.py). Records, the keyed
store other managers use, are rows of `records`, indexed by `records_fts`.

Decisions, and why:

- Confinement: every statement is keyed by the caller's agent id; paths are
  canonicalized and checked first (paths.py); search text is parsed into
  quoted terms, never passed as FTS5 syntax (query.py), and scoped twice (a
  per-agent token inside the index and the agent id on the joined row). So
  agent A can never read, list, change, delete or find agent B's files,
  whatever spelling it uses. Chunks are deduplicated per agent, not across
  agents, so stored sizes and quotas reveal nothing about other agents' data.
  (bm25 scores use index-wide term statistics, so the *scores* of A's hits
  depend slightly on what others stored; which files match never does.)
- Atomicity: write operations share group commits (writer.py); a failure
  (bad input found late, full quota, too large after an append) rolls back
  exactly that operation and changes nothing (its batch runs again with each
  operation in its own SAVEPOINT).
- The index log: a write does not change `files_fts` itself. Its index
  changes go, in the same transaction, to the table `index_log`, and are
  applied in batches: by the storage manager once a few thousand have
  gathered (after that batch's replies went out) and when it is idle, and by
  every search first (read your writes: an acknowledged write's log rows are
  committed, so a search always sees it). PostgreSQL's GIN pending list does
  the same. Why: FTS5 writes a segment per transaction, so indexing a batch of
  7 small files cost 38 us per file, a batch of 128 about 19 us; applying the
  log also takes a file written again meanwhile only once, and moves the
  indexing off the path a write's answer waits on. A crash loses nothing:
  the log is committed with the writes and applied by the next flush.
- Durability: WAL. With synchronous=NORMAL (the default) a commit is written
  to the log before the call returns and fsynced at checkpoints (at least
  every second while there are new commits, checkpoint.py): it survives a
  crash or kill -9 of the process (the data is in the OS page cache), not a
  power loss or OS crash, which may lose the last commits but never corrupts
  the database. synchronous=FULL fsyncs every commit and survives power loss;
  group commit shares one fsync among the writes that queued meanwhile.
- Versions: every write, append, rollback and delete adds a version;
  `versions_kept` (per file) are kept, older ones go with their unshared
  chunks. Lowering it takes effect at each file's next write.
- Deletes keep history: `delete` adds a deletion version, so `rollback`
  restores the file while old versions are kept; `purge=True` removes the
  file with its whole history and frees the space. A deleted file with
  nothing left to restore (versions_kept=1) is purged.
- Quota (`max_agent_bytes`, `[storage] quota_mb`): an agent's usage is what
  it costs on disk: the stored bytes of its files (compressed, deduplicated
  chunks + manifests, all kept versions, deleted files' history included),
  the text its files hold in the full-text index (else a file of 16 MiB of
  one repeated word would cost almost nothing stored and a lot indexed), and
  its records (key + text + meta, under every owner: one number per agent
  for everything it keeps on disk). An operation that would raise usage past
  the quota fails with QUOTA_EXCEEDED; operations that lower it always work.
- Size limit (`max_file_bytes`, `[storage] max_file_mb`) applies to a file's
  size after the operation (so to appends too) and to one record.
- Directories are implied by the files under them; a path cannot be both a
  file and a directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, TypeVar

from aios.managers.base import OpError
from aios.protocol import ErrorCode

from . import chunks as ch
from . import paths as P
from . import query as Q
from . import textindex as TI
from .checkpoint import Checkpointer
from .models import Deleted, FileInfo, Record, RecordHit, SearchHit, VersionInfo
from .schema import SchemaError, migrate
from .writer import GroupCommitter, Pending, Tx, WriteFn

log = logging.getLogger("aios.storage")
T = TypeVar("T")

MiB = 1 << 20
SYNCHRONOUS_MODES = ("NORMAL", "FULL", "EXTRA")
MAX_LIST_LIMIT = 10_000
MAX_SEARCH_LIMIT = 100
#: index log changes past which a write applies the whole log at once (bounds it when nobody flushes)
INDEX_LOG_MAX = 8192
SNIPPET_TOKENS = 16
_IN_BATCH = 500  # ids per "IN (...)" query
_KEEP = None  # index plan: leave the file's full-text rows as they are

# a files row as read by _file_row: indexes into the tuple
_ID, _HEAD, _OLDEST, _DELETED, _SIZE, _CREATED, _MODIFIED, _INDEXED, _BLOCKS, _TAIL, _INDEX_BYTES = range(11)
_FILE_COLUMNS = ("id, head, oldest, deleted, size, created_ns, modified_ns, indexed, index_blocks, index_tail, "
                 "index_bytes")
_USAGE_COLUMNS = ("file_bytes", "index_bytes", "record_bytes")


class _Reader:
    """A thread's read connection. Held by the thread's local storage only (the engine keeps a
    weak reference to close it), so it is closed when its thread goes away."""

    __slots__ = ("conn", "__weakref__")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __del__(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown, already closed
            pass


class StorageOpenError(Exception):
    """The database could not be opened (unreadable, not SQLite, not AIOS, too new)."""


def default_database_path() -> Path:
    """Where files live across kernel runs: $AIOS_DATA_DIR, else $XDG_DATA_HOME/aios, else
    ~/.local/share/aios; the file is storage.sqlite3. Not the run directory, which is per kernel run."""
    base = os.environ.get("AIOS_DATA_DIR")
    if base:
        return Path(base) / "storage.sqlite3"
    xdg = os.environ.get("XDG_DATA_HOME")
    root = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return root / "aios" / "storage.sqlite3"


def _scope_token(*parts: str) -> str:
    """A full-text token that stands for an agent (or owner+agent): digits only, so the porter
    stemmer leaves it alone, and 64 bits of hash, so two scopes do not share one."""
    digest = hashlib.blake2b("\x00".join(parts).encode("utf-8"), digest_size=8).digest()
    return str(int.from_bytes(digest, "big")).rjust(20, "0")


def _mb(n: int) -> str:
    return f"{n / MiB:g}"


def _not_found(message: str) -> OpError:
    return OpError(ErrorCode.NOT_FOUND, message)


def _invalid(message: str) -> OpError:
    return OpError(ErrorCode.INVALID_ARGUMENT, message)


def _as_bytes(data: object) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, str):
        raise _invalid("data must be bytes, not str: encode text as UTF-8 first")
    raise _invalid(f"data must be bytes, not {type(data).__name__}")


def _int_arg(value: object, what: str, low: int, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _invalid(f"{what} must be an integer, not {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _invalid(f"{what} must be {bound}, not {value}")
    return value


def _setting(value: object, what: str, low: int, high: int | None = None) -> int:
    """An engine setting (from the configuration): ValueError, not a request error, when bad."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"storage setting {what} must be an integer {bound}, not {value!r}")
    return value


def _seconds(ns: int) -> float:
    return ns / 1e9


class StorageEngine:
    """Per-agent versioned files with full-text search, and records for other services.

    Thread-safe: reads run on a connection per thread (WAL readers never wait
    for the writer); writes from all threads go through one group-committing
    writer. Call `close()` once no other thread uses the engine.

    path: the database file (its directory is created 0700, the file 0600).
    versions_kept: versions kept per file, the current one included.
    max_file_bytes: largest file (or record); keep it under the protocol's
        max_message_bytes, since a read returns a whole file in one reply.
    max_agent_bytes: each agent's quota (see the module docstring).
    synchronous: NORMAL (survives process crashes) or FULL/EXTRA (also power loss).
    group_commit: False runs one transaction per write (for comparison).
    max_batch: most writes in one group commit.
    max_index_bytes: only a file's first bytes this many are full-text indexed.
    chunker: chunk sizes (chunks.Chunker()).
    background_checkpoints: None = on with NORMAL, off with FULL (checkpoint.py).
    Settings that are out of range raise ValueError.
    """

    def __init__(self, path: str | Path, *, versions_kept: int = 32, max_file_bytes: int = 8 * MiB,
                 max_agent_bytes: int = 256 * MiB, synchronous: str = "NORMAL", group_commit: bool = True,
                 max_batch: int = 128, max_index_bytes: int = 1 * MiB, chunker: ch.Chunker | None = None,
                 background_checkpoints: bool | None = None, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self.versions_kept = _setting(versions_kept, "versions_kept", 1)
        self.max_file_bytes = _setting(max_file_bytes, "max_file_bytes", 1)
        self.max_agent_bytes = _setting(max_agent_bytes, "max_agent_bytes", 1)
        # rowids of index blocks have 16 bits for the block number (textindex.py)
        self.max_index_bytes = _setting(max_index_bytes, "max_index_bytes", 0, TI.BLOCK_MIN * (TI.MAX_BLOCKS - 1))
        sync = str(synchronous).upper()
        if sync not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, not {synchronous!r}")
        self.synchronous = sync
        self.chunker = chunker or ch.Chunker()
        self._busy_timeout_ms = busy_timeout_ms
        self._closed = False
        self._agents: dict[str, tuple[int, str]] = {}  # committed agent rows: name -> (id, files scope)
        self._local = threading.local()
        self._readers: weakref.WeakSet[_Reader] = weakref.WeakSet()
        self._readers_lock = threading.Lock()
        self._create_file()
        try:
            conn = self._connect()
        except sqlite3.Error as exc:
            raise StorageOpenError(f"cannot open the storage database {self.path}: {exc}") from None
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageOpenError(f"{self.path}: SQLite refused WAL mode (journal_mode is {mode!r})")
            applied = migrate(conn)
        except SchemaError as exc:
            conn.close()
            raise StorageOpenError(f"{self.path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StorageOpenError(f"cannot use the storage database {self.path}: {exc}") from None
        except BaseException:
            conn.close()
            raise
        if applied:
            log.info("storage database %s: applied schema migrations %s", self.path, applied)
        # With synchronous=NORMAL checkpoints run in the background, not inside a commit
        # (checkpoint.py): measured here, half as many commits over 2 ms and 10-30% more writes/s.
        # With FULL every commit fsyncs the log, and a background checkpoint's fsync of the
        # database file then competes with it (measured 5-10% fewer writes/s): SQLite's own
        # checkpoint inside the commit that fills 1000 log pages is the better choice there.
        if background_checkpoints is None:
            background_checkpoints = sync == "NORMAL"
        self._checkpointer: Checkpointer | None = None
        if background_checkpoints:
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            self._checkpointer = Checkpointer(self._connect)
        # changes waiting in the index log (a crash may have left some: the next flush applies them)
        self._index_pending = int(conn.execute("SELECT count(*) FROM index_log").fetchone()[0])
        self.index_flushes = 0
        self._writer = GroupCommitter(conn, group=group_commit, max_batch=max_batch,
                                      on_commit=self._checkpointer.committed if self._checkpointer else None,
                                      on_deferred=self._log_index)
        if self._checkpointer is not None:
            self._checkpointer.exclusive = self._writer.exclusive

    # ---------------------------------------------------------- connections
    def _create_file(self) -> None:
        """Make the directory (0700) and the database file (0600) before SQLite does, so that
        other users cannot read agents' files; SQLite gives the -wal and -shm files the same mode."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return
        except OSError as exc:
            raise StorageOpenError(f"cannot create the storage database {self.path}: {exc}") from None
        os.close(fd)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=self._busy_timeout_ms / 1000)
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        # a log that grew in a burst is cut back to 64 MiB when it restarts
        conn.execute("PRAGMA journal_size_limit = 67108864")
        conn.execute("PRAGMA cache_size = -16000")
        return conn

    def _reader(self) -> sqlite3.Connection:
        if self._closed:
            raise OpError(ErrorCode.UNAVAILABLE, "the storage engine is closed")
        reader = getattr(self._local, "reader", None)
        if reader is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only = ON")
            reader = self._local.reader = _Reader(conn)
            with self._readers_lock:
                self._readers.add(reader)
        return reader.conn

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query inside sees the same committed state."""
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def _write(self, fn: WriteFn[T]) -> T:
        if self._closed:
            raise OpError(ErrorCode.UNAVAILABLE, "the storage engine is closed")
        return self._writer.run(fn)

    def submit(self, fn: WriteFn[T]) -> Pending[T]:
        """Queue a write made by one of the `*_fn` methods without waiting for it; `wait` commits.

        A thread that has several writes in hand (the storage manager's socket
        thread, with the requests that arrived together) commits them in one
        transaction this way: see writer.py for what that saves."""
        if self._closed:
            raise OpError(ErrorCode.UNAVAILABLE, "the storage engine is closed")
        return self._writer.submit(fn)

    def wait(self, pending: list[Pending[Any]]) -> None:
        """Commit (or wait for the commit of) every submitted write in `pending`; each then holds its
        outcome (`Pending.outcome()`: the result, or the error raised)."""
        self._writer.wait(pending)

    def close(self) -> None:
        """Close every connection. Further calls get UNAVAILABLE. The last close checkpoints the WAL."""
        if self._closed:
            return
        try:
            self.flush_index()  # leave the index complete (not needed for correctness: see the index log)
        except Exception:  # noqa: BLE001 - closing must go on; the log is applied at the next open's first flush
            log.exception("storage: applying the index log at close failed")
        self._closed = True
        self._writer.close()
        if self._checkpointer is not None:
            self._checkpointer.close()
        with self._readers_lock:
            readers = list(self._readers)
        for reader in readers:
            reader.conn.close()
        conn = self._writer.conn
        try:
            conn.execute("PRAGMA optimize")
        except sqlite3.Error:
            log.exception("PRAGMA optimize failed")
        conn.close()

    def __enter__(self) -> "StorageEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- agents
    def _agent_id(self, conn: sqlite3.Connection, agent: str) -> tuple[int, str] | None:
        """(id, files scope) of an agent, or None if it never stored anything. Fills the cache
        only from a reader (committed data); the writer fills it after its commit."""
        hit = self._agents.get(agent)
        if hit is not None:
            return hit
        row = conn.execute("SELECT id, scope FROM agents WHERE name = ?", (agent,)).fetchone()
        if row is None:
            return None
        found = (int(row[0]), str(row[1]))
        if conn is not self._writer.conn:
            self._agents[agent] = found
        return found

    def _agent_for_write(self, tx: Tx, agent: str) -> tuple[int, str]:
        hit = self._agents.get(agent)
        if hit is not None:
            return hit
        conn = tx.conn
        row = conn.execute("SELECT id, scope FROM agents WHERE name = ?", (agent,)).fetchone()
        if row is None:
            scope = _scope_token("files", agent)
            cur = conn.execute("INSERT INTO agents(name, scope) VALUES (?, ?)", (agent, scope))
            found = (int(cur.lastrowid), scope)
        else:
            found = (int(row[0]), str(row[1]))
        tx.after_commit(lambda: self._agents.__setitem__(agent, found))
        return found

    # --------------------------------------------------------------- limits
    def _too_large(self, path: str, size: int) -> OpError:
        return OpError(ErrorCode.TOO_LARGE,
                       f"file {path!r} would be {size} bytes, over the per-file limit of {self.max_file_bytes} "
                       f"bytes ([storage] max_file_mb = {_mb(self.max_file_bytes)})")

    def _charge(self, conn: sqlite3.Connection, agent_id: int, agent: str, **deltas: int) -> None:
        """Add byte deltas (file_bytes=, index_bytes=, record_bytes=) to the agent's usage, refusing
        growth past the quota. Called last in an operation, so raising rolls the operation back."""
        changed = [(col, d) for col, d in deltas.items() if d]
        if not changed:
            return
        assert all(col in _USAGE_COLUMNS for col, _ in changed)
        total = sum(d for _, d in changed)
        sets = ", ".join(f"{col} = {col} + ?" for col, _ in changed)
        if total <= 0:
            conn.execute(f"UPDATE agents SET {sets} WHERE id = ?", (*(d for _, d in changed), agent_id))
            return
        # Growth: one statement that changes nothing past the quota (measured here: 1.0 us, against
        # 1.9 us for a SELECT then an UPDATE; UPDATE ... RETURNING measured 3x the two earlier)
        if conn.execute(f"UPDATE agents SET {sets} WHERE id = ? AND file_bytes + index_bytes + record_bytes + ? <= ?",
                        (*(d for _, d in changed), agent_id, total, self.max_agent_bytes)).rowcount:
            return
        used = conn.execute("SELECT file_bytes + index_bytes + record_bytes FROM agents WHERE id = ?",
                            (agent_id,)).fetchone()[0]
        raise OpError(ErrorCode.QUOTA_EXCEEDED,
                      f"agent {agent!r} would use {used + total} bytes of storage, over its quota of "
                      f"{self.max_agent_bytes} bytes ([storage] quota_mb = {_mb(self.max_agent_bytes)}); "
                      f"it uses {used} now. Delete files with purge=true, or lower "
                      f"[storage] versions_kept, to free space")

    # ------------------------------------------------------- text indexing
    @staticmethod
    def _set_index(tx: Tx, file_id: int, scope: str, path: str, plan: TI.IndexPlan | None,
                   old_blocks: int) -> None:
        """Change the file's full-text rows from block plan.first_block on (None: remove them all):
        each change goes to the index log (see "The index log" above), each block's old row
        removed just before its new one goes in. Rows are addressed by exact rowid: measured
        here, deleting a rowid range made FTS5 scan and cost about 3x more."""
        base = file_id << TI.BLOCK_SHIFT
        first = 0 if plan is None else plan.first_block
        blocks = [] if plan is None else plan.blocks
        for b in range(first, max(old_blocks, first + len(blocks))):
            if b < old_blocks:
                tx.defer((base + b, None, None, None))
            if b - first < len(blocks):
                tx.defer((base + b, scope, path, blocks[b - first]))

    def _log_index(self, conn: sqlite3.Connection, changes: list[tuple[Any, ...]]) -> None:
        """The write path's sink (writer.py `Tx.defer`): a batch's index changes, in one statement."""
        conn.executemany("INSERT INTO index_log(fts_rowid, scope, path, body) VALUES (?, ?, ?, ?)", changes)
        self._index_pending += len(changes)
        if self._index_pending >= INDEX_LOG_MAX:
            self._apply_index_log(conn)  # bounds the log for engine users that never flush
            self._index_pending = 0

    @staticmethod
    def _apply_index_log(conn: sqlite3.Connection, fts_rowid: int | None = None) -> int:
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

    def _tx_flush_index(self, tx: Tx) -> int:
        tx.flush_deferred()
        applied = self._apply_index_log(tx.conn)
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

    # --------------------------------------------------------------- chunks
    def _load(self, conn: sqlite3.Connection, ids: list[int], limit: int | None = None) -> bytes:
        """The content made of chunks `ids`, in order; stops once `limit` bytes are gathered."""
        parts: list[bytes] = []
        got = 0
        for start in range(0, len(ids), _IN_BATCH):
            group = ids[start:start + _IN_BATCH]
            distinct = list(dict.fromkeys(group))
            marks = ",".join("?" * len(distinct))
            found: dict[int, bytes] = {}
            for cid, digest, size, codec, data in conn.execute(
                    f"SELECT c.id, c.hash, c.size, c.codec, d.data FROM chunks AS c JOIN chunk_data AS d "
                    f"ON d.id = c.id WHERE c.id IN ({marks})", distinct):
                try:
                    raw = ch.decode(codec, data, size)
                except Exception as exc:  # noqa: BLE001 - zlib or size mismatch: the row is damaged
                    raise OpError(ErrorCode.INTERNAL, f"storage: chunk {cid} is corrupt ({exc})") from None
                if ch.chunk_hash(raw) != digest:
                    raise OpError(ErrorCode.INTERNAL, f"storage: chunk {cid} is corrupt (hash mismatch)")
                found[cid] = raw
            for cid in group:
                raw = found.get(cid)
                if raw is None:
                    raise OpError(ErrorCode.INTERNAL, f"storage: chunk {cid} is missing")
                parts.append(raw)
                got += len(raw)
                if limit is not None and got >= limit:
                    return b"".join(parts)
        return b"".join(parts)

    def _load_suffix(self, conn: sqlite3.Connection, ids: list[int], nbytes: int) -> bytes:
        """At least the last `nbytes` of the content made of chunks `ids` (whole chunks, from the end)."""
        parts: list[bytes] = []
        got, end = 0, len(ids)
        while got < nbytes and end > 0:
            start = max(0, end - 16)
            piece = self._load(conn, ids[start:end])
            parts.append(piece)
            got += len(piece)
            end = start
        return b"".join(reversed(parts))

    def _put_chunks(self, conn: sqlite3.Connection, agent_id: int, pieces: list[ch.Chunk]) -> tuple[list[int], int]:
        """Ids of the pieces, storing those the agent does not have yet; and the bytes added."""
        ids: list[int] = []
        added = 0
        for piece in pieces:
            row = conn.execute("SELECT id FROM chunks WHERE agent_id = ? AND hash = ?",
                               (agent_id, piece.hash)).fetchone()
            if row is not None:
                ids.append(row[0])
                continue
            cur = conn.execute("INSERT INTO chunks(agent_id, hash, size, codec, stored, refs) VALUES (?, ?, ?, ?, ?, 0)",
                               (agent_id, piece.hash, piece.size, piece.codec, len(piece.data)))
            cid = int(cur.lastrowid)
            conn.execute("INSERT INTO chunk_data(id, data) VALUES (?, ?)", (cid, piece.data))
            ids.append(cid)
            added += len(piece.data)
        return ids, added

    @staticmethod
    def _add_refs(conn: sqlite3.Connection, ids: list[int]) -> None:
        if ids:
            conn.executemany("UPDATE chunks SET refs = refs + ? WHERE id = ?",
                             [(n, cid) for cid, n in Counter(ids).items()])

    @staticmethod
    def _drop_refs(conn: sqlite3.Connection, ids: list[int]) -> int:
        """Release one reference per occurrence; delete chunks nobody uses; return the bytes freed."""
        if not ids:
            return 0
        counts = Counter(ids)
        conn.executemany("UPDATE chunks SET refs = refs - ? WHERE id = ?", [(n, cid) for cid, n in counts.items()])
        freed = 0
        distinct = list(counts)
        for start in range(0, len(distinct), _IN_BATCH):
            group = distinct[start:start + _IN_BATCH]
            marks = ",".join("?" * len(group))
            for cid, stored in conn.execute(f"DELETE FROM chunks WHERE id IN ({marks}) AND refs <= 0 "
                                            f"RETURNING id, stored", group).fetchall():
                freed += stored
                conn.execute("DELETE FROM chunk_data WHERE id = ?", (cid,))
        return int(freed)

    # ------------------------------------------------------------- versions
    def _file_row(self, conn: sqlite3.Connection, agent_id: int, path: str) -> tuple[Any, ...] | None:
        return conn.execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE agent_id = ? AND path = ?",
                            (agent_id, path)).fetchone()

    def _check_no_conflict(self, conn: sqlite3.Connection, agent_id: int, path: str) -> None:
        """A new file may not sit under a file, nor where a directory is."""
        for parent in P.parents(path):
            if conn.execute("SELECT 1 FROM files WHERE agent_id = ? AND path = ? AND deleted = 0",
                            (agent_id, parent)).fetchone():
                raise _invalid(f"cannot create {path!r}: {parent!r} is a file, not a directory")
        low, high = P.subtree_bounds(path)
        row = conn.execute("SELECT path FROM files WHERE agent_id = ? AND path >= ? AND path < ? AND deleted = 0 "
                           "LIMIT 1", (agent_id, low, high)).fetchone()
        if row:
            raise _invalid(f"cannot create file {path!r}: it is a directory (it holds {row[0]!r})")

    def _manifest(self, conn: sqlite3.Connection, file_id: int, version: int) -> list[int] | bytes:
        """A version's chunk ids, or its content if kept inline."""
        row = conn.execute("SELECT manifest FROM versions WHERE file_id = ? AND version = ?",
                           (file_id, version)).fetchone()
        if row is None:
            raise OpError(ErrorCode.INTERNAL, f"storage: version {version} of file {file_id} is missing")
        return ch.read_manifest(row[0])

    def _content(self, conn: sqlite3.Connection, manifest: bytes, limit: int | None = None) -> bytes:
        """The content a manifest stands for (at least its first `limit` bytes)."""
        found = ch.read_manifest(manifest)
        return found if isinstance(found, bytes) else self._load(conn, found, limit)

    def _prepare(self, data: bytes) -> bytes | list[ch.Chunk]:
        """What to store for `data`: an inline manifest for small content, else encoded chunks."""
        if len(data) <= ch.INLINE_MAX:
            return ch.pack_inline(data)
        return [ch.encode(piece) for piece in self.chunker.split(data)]

    def _store(self, conn: sqlite3.Connection, agent_id: int,
               prepared: bytes | list[ch.Chunk]) -> tuple[list[int], int, bytes]:
        """Store prepared content: (chunk ids, chunk bytes added, manifest)."""
        if isinstance(prepared, bytes):
            return [], 0, prepared
        ids, added = self._put_chunks(conn, agent_id, prepared)
        return ids, added, ch.pack_manifest(ids)

    def _prune(self, conn: sqlite3.Connection, file_id: int, newest: int, oldest: int) -> tuple[int, int]:
        """Drop versions beyond versions_kept; return (bytes freed, new oldest version)."""
        cutoff = newest - self.versions_kept
        if cutoff < oldest:
            return 0, oldest
        manifests = [m for (m,) in conn.execute(
            "DELETE FROM versions WHERE file_id = ? AND version <= ? RETURNING manifest", (file_id, cutoff))]
        ids = [cid for m in manifests for cid in ch.manifest_ids(m)]
        freed = sum(len(m) for m in manifests) + self._drop_refs(conn, ids)
        return freed, cutoff + 1

    def _new_version(self, tx: Tx, agent: str, agent_id: int, scope: str, path: str, row: tuple[Any, ...] | None,
                     op: str, size: int, ids: list[int], added: int, manifest: bytes, plan: TI.IndexPlan | None,
                     source: int | None = None) -> FileInfo:
        """Record a version with `manifest` (using chunks `ids`, new ones already stored: `added`
        bytes), make it the file's newest, prune old versions, update the index (plan None:
        unchanged) and charge the agent. Returns the file's info."""
        conn = tx.conn
        now = time.time_ns()
        self._add_refs(conn, ids)
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
        freed, oldest = self._prune(conn, file_id, version, oldest)
        if row is not None:
            conn.execute("UPDATE files SET head = ?, oldest = ?, deleted = 0, size = ?, modified_ns = ?, indexed = ?, "
                         "index_blocks = ?, index_tail = ?, index_bytes = ? WHERE id = ?",
                         (version, oldest, size, now, indexed, blocks, tail, index_bytes, file_id))
        if plan is not None:
            self._set_index(tx, file_id, scope, path, plan, 0 if row is None else row[_BLOCKS])
        self._charge(conn, agent_id, agent, file_bytes=added + len(manifest) - freed,
                     index_bytes=index_bytes - old_index_bytes)
        return FileInfo(path=path, size=size, version=version, versions=version - oldest + 1, oldest_version=oldest,
                        created=_seconds(created), modified=_seconds(now))

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
            raise _invalid(f"append must be true or false, not {type(append).__name__}")
        if len(data) > self.max_file_bytes:
            raise self._too_large(path, len(data))
        if append:
            return lambda tx: self._tx_append(tx, agent, path, data)
        # chunking, hashing, compressing and text checks happen here, in the caller's thread and
        # outside the write lock: zlib and hashlib release the GIL, so this overlaps other commits
        prepared = self._prepare(data)
        plan = TI.plan_full(data, len(data), self.max_index_bytes)
        return lambda tx: self._tx_write(tx, agent, path, prepared, len(data), plan)

    def _tx_write(self, tx: Tx, agent: str, path: str, prepared: bytes | list[ch.Chunk], size: int,
                  plan: TI.IndexPlan) -> FileInfo:
        conn = tx.conn
        agent_id, scope = self._agent_for_write(tx, agent)
        row = self._file_row(conn, agent_id, path)
        if row is None or row[_DELETED]:
            self._check_no_conflict(conn, agent_id, path)
        ids, added, manifest = self._store(conn, agent_id, prepared)
        return self._new_version(tx, agent, agent_id, scope, path, row, "write", size, ids, added, manifest, plan)

    def _tx_append(self, tx: Tx, agent: str, path: str, data: bytes) -> FileInfo:
        conn = tx.conn
        agent_id, scope = self._agent_for_write(tx, agent)
        row = self._file_row(conn, agent_id, path)
        if row is None or row[_DELETED] or row[_SIZE] == 0:
            # appending to nothing (or to an empty file) is writing
            if row is None or row[_DELETED]:
                self._check_no_conflict(conn, agent_id, path)
            ids, added, manifest = self._store(conn, agent_id, self._prepare(data))
            plan = TI.plan_full(data, len(data), self.max_index_bytes)
            return self._new_version(tx, agent, agent_id, scope, path, row, "append", len(data), ids, added,
                                     manifest, plan)
        old_size = row[_SIZE]
        size = old_size + len(data)
        if size > self.max_file_bytes:
            raise self._too_large(path, size)
        old = self._manifest(conn, row[_ID], row[_HEAD])
        if isinstance(old, bytes):  # small content kept inline: store the whole again
            ids: list[int] = []
            last = old
            new_ids, added, manifest = self._store(conn, agent_id, self._prepare(old + data))
        else:
            # Re-chunk from the start of the last chunk: every earlier chunk is shared (chunks.py).
            ids = old
            last = self._load(conn, ids[-1:])
            new_ids, added = self._put_chunks(conn, agent_id, [ch.encode(p) for p in self.chunker.split(last + data)])
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
            self._apply_index_log(conn, last_block)  # then bring the row up to date
            body = conn.execute("SELECT body FROM files_fts WHERE rowid = ?", (last_block,)).fetchone()
            indexed_part = body[0].encode("utf-8") if body is not None else b""
            if body is not None and len(indexed_part) == row[_INDEX_BYTES] - tail and len(last) >= pending:
                old_part = indexed_part + last[len(last) - pending:]
            else:  # not expected; rebuild from the content
                need = old_size - tail
                before = last if len(last) >= need or not ids else self._load_suffix(conn, ids, need)
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
            _int_arg(version, "version", 1)
        with self._snapshot() as conn:
            found = self._agent_id(conn, agent)
            row = self._file_row(conn, found[0], path) if found else None
            if row is None:
                raise self._no_file(conn, found, path)
            file_id, head, oldest, deleted = row[_ID], row[_HEAD], row[_OLDEST], row[_DELETED]
            if version is None:
                if deleted:
                    raise _not_found(f"file {path!r} was deleted (version {head}); read an older version, or "
                                     f"rollback to one, to get it back")
                version = head
            vrow = conn.execute("SELECT op, size, created_ns, manifest FROM versions WHERE file_id = ? AND version = ?",
                                (file_id, version)).fetchone()
            if vrow is None:
                raise _not_found(f"file {path!r} has no version {version}; the versions kept are "
                                 f"{oldest}..{head}")
            if vrow[0] == "delete":
                raise _not_found(f"version {version} of {path!r} is its deletion and has no content")
            data = self._content(conn, vrow[3])
        if len(data) != vrow[1]:
            raise OpError(ErrorCode.INTERNAL, f"storage: {path!r} version {version} is {len(data)} bytes, "
                          f"expected {vrow[1]}")
        info = FileInfo(path=path, size=vrow[1], version=version, versions=head - oldest + 1, oldest_version=oldest,
                        created=_seconds(row[_CREATED]), modified=_seconds(vrow[2]))
        return data, info

    @staticmethod
    def _is_dir(conn: sqlite3.Connection, found: tuple[int, str] | None, path: str) -> bool:
        if found is None:
            return False
        low, high = P.subtree_bounds(path)
        return conn.execute("SELECT 1 FROM files WHERE agent_id = ? AND path >= ? AND path < ? AND deleted = 0 "
                            "LIMIT 1", (found[0], low, high)).fetchone() is not None

    def _no_file(self, conn: sqlite3.Connection, found: tuple[int, str] | None, path: str) -> OpError:
        if self._is_dir(conn, found, path):
            return _not_found(f"{path!r} is a directory, not a file")
        return _not_found(f"no file {path!r}")

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
                    raise _not_found(f"file {path!r} was deleted (version {row[_HEAD]}); rollback restores it")
                raise _not_found(f"no file {path!r}")
        return self._info(path, row)

    @staticmethod
    def _info(path: str, row: tuple[Any, ...]) -> FileInfo:
        head, oldest = row[_HEAD], row[_OLDEST]
        return FileInfo(path=path, size=row[_SIZE], version=head, versions=head - oldest + 1, oldest_version=oldest,
                        created=_seconds(row[_CREATED]), modified=_seconds(row[_MODIFIED]),
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
            raise _invalid(f"after must be a string, not {type(after).__name__}")
        if not isinstance(recursive, bool) or not isinstance(include_deleted, bool):
            raise _invalid("recursive and include_deleted must be true or false")
        _int_arg(limit, "limit", 1, MAX_LIST_LIMIT)
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
        return [VersionInfo(version=v, op=op, size=size, created=_seconds(ns), source=src,
                            current=(v == head and not deleted)) for v, op, size, ns, src in rows]

    def rollback(self, agent: str, path: str, version: int) -> FileInfo:
        """Make a new version whose content is exactly that of kept `version` (restores a deleted file)."""
        agent = P.agent_name(agent)
        path = P.file_path(path)
        _int_arg(version, "version", 1)
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
            raise _not_found(f"file {path!r} has no version {version}; the versions kept are "
                             f"{row[_OLDEST]}..{row[_HEAD]}")
        op, size, manifest = vrow
        if op == "delete":
            raise _invalid(f"version {version} of {path!r} is its deletion; roll back to a version with content")
        if size > self.max_file_bytes:
            raise self._too_large(path, size)
        if row[_DELETED]:
            self._check_no_conflict(conn, agent_id, path)
        plan = TI.plan_full(self._content(conn, manifest, limit=self.max_index_bytes), size, self.max_index_bytes)
        return self._new_version(tx, agent, agent_id, scope, path, row, "rollback", size, ch.manifest_ids(manifest), 0,
                                 manifest, plan, source=version)

    def delete(self, agent: str, path: str, *, purge: bool = False) -> Deleted:
        """Delete a file. Its history is kept (rollback restores it) unless purge=True, which
        removes every version and frees their space; purge also works on a deleted file."""
        agent = P.agent_name(agent)
        path = P.file_path(path)
        if not isinstance(purge, bool):
            raise _invalid(f"purge must be true or false, not {type(purge).__name__}")
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
            raise _not_found(f"file {path!r} is already deleted; purge=true removes its history")
        index_freed = 0 if deleted else row[_INDEX_BYTES]
        self._set_index(tx, file_id, "", path, None, row[_BLOCKS])
        freed = 0
        if not purge:
            now = time.time_ns()
            version = head + 1
            tombstone = ch.pack_manifest([])
            conn.execute("INSERT INTO versions(file_id, version, op, source, size, created_ns, manifest) "
                         "VALUES (?, ?, 'delete', NULL, 0, ?, ?)", (file_id, version, now, tombstone))
            freed, oldest = self._prune(conn, file_id, version, oldest)
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
        freed += sum(len(m) for m in manifests) + self._drop_refs(
            conn, [cid for m in manifests for cid in ch.manifest_ids(m)])
        conn.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self._charge(conn, agent_id, agent, file_bytes=-freed, index_bytes=-index_freed)
        return Deleted(path=path, version=None, purged=True, freed_bytes=freed + index_freed)

    def search(self, agent: str, query: str, limit: int = 10, *, match: str = "all") -> list[SearchHit]:
        """The agent's files whose current text (or path) matches `query` (see query.py for the
        syntax), best first, one hit per file (its best block): score is -bm25, the path weighing
        twice the body."""
        agent = P.agent_name(agent)
        _int_arg(limit, "limit", 1, MAX_SEARCH_LIMIT)
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
                raise _invalid(f"query {query!r} cannot be searched: {exc}") from None
        return list(hits.values())

    # ---------------------------------------------------------------- stats
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

    # -------------------------------------------------------------- records
    def _record_scope(self, owner: str, agent: str) -> str:
        return _scope_token("records", owner, agent)

    def record_put(self, owner: str, agent: str, key: str, text: str, meta: dict[str, Any] | None = None) -> None:
        """Insert or replace the record `key` kept by service `owner` for `agent`.

        `meta` is a JSON-compatible map. The record's size (key + text + meta as JSON, in UTF-8)
        counts against the agent's quota and may not exceed the per-file limit.
        """
        self._write(self.record_put_fn(owner, agent, key, text, meta))

    def record_put_fn(self, owner: str, agent: str, key: str, text: str,
                      meta: dict[str, Any] | None = None) -> WriteFn[None]:
        """`record_put` as a write operation for `submit` (the arguments are checked now)."""
        owner = P.name(owner, "owner", P.MAX_OWNER_BYTES)
        agent = P.agent_name(agent)
        key = P.name(key, "key", P.MAX_KEY_BYTES)
        if not isinstance(text, str):
            raise _invalid(f"text must be a string, not {type(text).__name__}")
        meta = {} if meta is None else meta
        if not isinstance(meta, dict):
            raise _invalid(f"meta must be a map, not {type(meta).__name__}")
        try:
            meta_json = json.dumps(meta, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            size = len(key.encode("utf-8")) + len(text.encode("utf-8")) + len(meta_json.encode("utf-8"))
        except (TypeError, ValueError) as exc:
            raise _invalid(f"record {key!r}: meta must hold only JSON values (maps with string keys, lists, "
                           f"strings, numbers, booleans, null): {exc}") from None
        if size > self.max_file_bytes:
            raise OpError(ErrorCode.TOO_LARGE,
                          f"record {key!r} is {size} bytes (key + text + meta), over the per-record limit of "
                          f"{self.max_file_bytes} bytes ([storage] max_file_mb = {_mb(self.max_file_bytes)})")
        scope = self._record_scope(owner, agent)
        return lambda tx: self._tx_record_put(tx, owner, agent, key, text, meta_json, size, scope)

    def _tx_record_put(self, tx: Tx, owner: str, agent: str, key: str, text: str, meta_json: str, size: int,
                       scope: str) -> None:
        conn = tx.conn
        agent_id, _ = self._agent_for_write(tx, agent)
        now = time.time_ns()
        row = conn.execute("SELECT id, size FROM records WHERE owner = ? AND agent_id = ? AND key = ?",
                           (owner, agent_id, key)).fetchone()
        if row is None:
            conn.execute("INSERT INTO records(owner, agent_id, key, scope, text, meta, size, updated_ns) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (owner, agent_id, key, scope, text, meta_json, size, now))
            delta = size
        else:
            conn.execute("UPDATE records SET text = ?, meta = ?, size = ?, updated_ns = ? WHERE id = ?",
                         (text, meta_json, size, now, row[0]))
            delta = size - row[1]
        self._charge(conn, agent_id, agent, record_bytes=delta)

    def record_get(self, owner: str, agent: str, key: str) -> Record | None:
        owner = P.name(owner, "owner", P.MAX_OWNER_BYTES)
        agent = P.agent_name(agent)
        key = P.name(key, "key", P.MAX_KEY_BYTES)
        with self._snapshot() as conn:
            found = self._agent_id(conn, agent)
            if found is None:
                return None
            row = conn.execute("SELECT key, text, meta, size, updated_ns FROM records "
                               "WHERE owner = ? AND agent_id = ? AND key = ?", (owner, found[0], key)).fetchone()
        return self._record(row) if row else None

    @staticmethod
    def _record(row: tuple[Any, ...]) -> Record:
        key, text, meta, size, updated_ns = row
        return Record(key=key, text=text, meta=json.loads(meta), size=size, updated=_seconds(updated_ns))

    def record_delete(self, owner: str, agent: str, key: str) -> bool:
        """Remove a record; False if there was none."""
        return self._write(self.record_delete_fn(owner, agent, key))

    def record_delete_fn(self, owner: str, agent: str, key: str) -> WriteFn[bool]:
        """`record_delete` as a write operation for `submit` (the arguments are checked now)."""
        owner = P.name(owner, "owner", P.MAX_OWNER_BYTES)
        agent = P.agent_name(agent)
        key = P.name(key, "key", P.MAX_KEY_BYTES)

        def tx_delete(tx: Tx) -> bool:
            found = self._agent_id(tx.conn, agent)
            if found is None:
                return False
            row = tx.conn.execute("DELETE FROM records WHERE owner = ? AND agent_id = ? AND key = ? RETURNING size",
                                  (owner, found[0], key)).fetchone()
            if row is None:
                return False
            self._charge(tx.conn, found[0], agent, record_bytes=-row[0])
            return True

        return tx_delete

    def record_list(self, owner: str, agent: str, *, after: str = "", limit: int = 1000, offset: int = 0,
                    text: bool = True) -> list[Record]:
        """Records in key order, starting after key `after` and skipping `offset` (for paging);
        with `text=False` the text is left out (listings need only keys, meta and sizes)."""
        owner = P.name(owner, "owner", P.MAX_OWNER_BYTES)
        agent = P.agent_name(agent)
        if not isinstance(after, str):
            raise _invalid(f"after must be a string, not {type(after).__name__}")
        _int_arg(limit, "limit", 1, MAX_LIST_LIMIT)
        _int_arg(offset, "offset", 0, 1 << 40)
        column = "text" if text else "''"
        with self._snapshot() as conn:
            found = self._agent_id(conn, agent)
            if found is None:
                return []
            rows = conn.execute(f"SELECT key, {column}, meta, size, updated_ns FROM records "
                                "WHERE owner = ? AND agent_id = ? AND key > ? ORDER BY key LIMIT ? OFFSET ?",
                                (owner, found[0], after, limit, offset)).fetchall()
        return [self._record(r) for r in rows]

    def record_search(self, owner: str, agent: str, query: str, limit: int = 10, *,
                      match: str = "all", full: bool = False) -> list[RecordHit]:
        """Records whose text matches `query` (see query.py), best first (score = -bm25); with
        `full`, each hit carries the record itself (so the caller needs no second round trip)."""
        owner = P.name(owner, "owner", P.MAX_OWNER_BYTES)
        agent = P.agent_name(agent)
        _int_arg(limit, "limit", 1, MAX_SEARCH_LIMIT)
        expr = Q.match_expression(query, self._record_scope(owner, agent), "text", match)
        with self._snapshot() as conn:
            found = self._agent_id(conn, agent)
            if found is None:
                return []
            try:
                rows = conn.execute(
                    "SELECT r.key, records_fts.rank, "
                    f"snippet(records_fts, 1, '[', ']', '...', {SNIPPET_TOKENS}), "
                    f"{'r.text, r.meta, r.size, r.updated_ns' if full else 'NULL, NULL, NULL, NULL'} "
                    "FROM records_fts JOIN records AS r ON r.id = records_fts.rowid "
                    "WHERE records_fts MATCH ? AND records_fts.rank MATCH 'bm25(0.0, 1.0)' "
                    "AND r.owner = ? AND r.agent_id = ? ORDER BY records_fts.rank LIMIT ?",
                    (expr, owner, found[0], limit)).fetchall()
            except sqlite3.OperationalError as exc:
                raise _invalid(f"query {query!r} cannot be searched: {exc}") from None
        return [RecordHit(key=k, score=-sc, snippet=snip,
                          record=self._record((k, text, meta, size, upd)) if full else None)
                for k, sc, snip, text, meta, size, upd in rows]

    def record_stats(self, owner: str, agent: str) -> dict[str, int]:
        """{"records": how many `owner` keeps for `agent`, "bytes": their size}."""
        owner = P.name(owner, "owner", P.MAX_OWNER_BYTES)
        agent = P.agent_name(agent)
        with self._snapshot() as conn:
            found = self._agent_id(conn, agent)
            if found is None:
                return {"records": 0, "bytes": 0}
            n, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM records "
                                   "WHERE owner = ? AND agent_id = ?", (owner, found[0])).fetchone()
        return {"records": int(n), "bytes": int(size)}
