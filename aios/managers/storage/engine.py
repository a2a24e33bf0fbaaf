"""The storage engine: per-agent versioned files and owner-scoped records in one SQLite file.

This is everything below the storage manager's sockets: the manager process
wraps one `StorageEngine` and calls it from its handler threads. The database
lives in a data directory that outlives kernel runs (aios/datadir.py).

How the engine is composed. `StorageEngine` is one object (one database, one
writer, one set of settings) whose operations are cut along their jobs, one
module each, joined as mixin classes:

- engine.py (this module), the engine proper: settings, opening the
  database, connections (a reader per thread, the group-committing writer,
  background checkpoints), the agents table, and the quota (`_charge`);
- files.py: versioned files and search over them (content.py stores their
  content as chunks);
- records.py: the keyed records other managers keep per agent;
- index_log.py: the full-text index log and its flushes;
- diagnostics.py: status figures, statistics, the integrity check.

Mixins rather than helper objects because every part works on the same
connections, caches and settings, and its calls are on the write path (a
helper object would add an indirection to each of them, and its state would
be the engine's anyway). Each mixin lists, as annotations, what it uses of
the engine proper and of the other parts, so a module says what it depends
on. The engine raises `StorageError` (errors.py), never a manager's error
type: the storage manager maps it to its reply.

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
- The index log: a write does not change the full-text index itself; its
  index changes go to a log in the same transaction and are applied in
  batches, and by every search first (index_log.py says why and how).
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
import logging
import os
import sqlite3
import threading
import weakref
from pathlib import Path
from typing import Any, Iterator, TypeVar

from aios.datadir import default_database_path
from aios.protocol import ErrorCode

from . import query as Q
from . import textindex as TI
from .checkpoint import Checkpointer
from .checks import MiB, mb
from .chunks import Chunker
from .diagnostics import DiagnosticsMixin
from .errors import StorageError, StorageOpenError, closed
from .files import FilesMixin
from .index_log import IndexLogMixin
from .records import RecordsMixin
from .schema import SchemaError, migrate
from .writer import GroupCommitter, Pending, Tx, WriteFn

__all__ = ["MiB", "StorageEngine", "StorageError", "StorageOpenError", "default_database_path"]

log = logging.getLogger("aios.storage")
T = TypeVar("T")

SYNCHRONOUS_MODES = ("NORMAL", "FULL", "EXTRA")
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


def _setting(value: object, what: str, low: int, high: int | None = None) -> int:
    """An engine setting (from the configuration): ValueError, not a request error, when bad."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"storage setting {what} must be an integer {bound}, not {value!r}")
    return value


class StorageEngine(FilesMixin, RecordsMixin, IndexLogMixin, DiagnosticsMixin):
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
                 max_batch: int = 128, max_index_bytes: int = 1 * MiB, chunker: Chunker | None = None,
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
        self.chunker = chunker or Chunker()
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
        self._init_index_log(conn)
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
            raise closed()
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
            raise closed()
        return self._writer.run(fn)

    def submit(self, fn: WriteFn[T]) -> Pending[T]:
        """Queue a write made by one of the `*_fn` methods without waiting for it; `wait` commits.

        A thread that has several writes in hand (the storage manager's socket
        thread, with the requests that arrived together) commits them in one
        transaction this way: see writer.py for what that saves."""
        if self._closed:
            raise closed()
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
            scope = Q.scope_token("files", agent)
            cur = conn.execute("INSERT INTO agents(name, scope) VALUES (?, ?)", (agent, scope))
            found = (int(cur.lastrowid), scope)
        else:
            found = (int(row[0]), str(row[1]))
        tx.after_commit(lambda: self._agents.__setitem__(agent, found))
        return found

    # --------------------------------------------------------------- limits
    def _too_large(self, path: str, size: int) -> StorageError:
        return StorageError(ErrorCode.TOO_LARGE,
                            f"file {path!r} would be {size} bytes, over the per-file limit of {self.max_file_bytes} "
                            f"bytes ([storage] max_file_mb = {mb(self.max_file_bytes)})")

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
        raise StorageError(ErrorCode.QUOTA_EXCEEDED,
                           f"agent {agent!r} would use {used + total} bytes of storage, over its quota of "
                           f"{self.max_agent_bytes} bytes ([storage] quota_mb = {mb(self.max_agent_bytes)}); "
                           f"it uses {used} now. Delete files with purge=true, or lower "
                           f"[storage] versions_kept, to free space")

