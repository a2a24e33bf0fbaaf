"""Group commit: many threads' writes share one SQLite transaction.

The storage manager runs handlers on a pool of threads, so several writes
arrive at once. SQLite allows one writer at a time, and with WAL every commit
appends each page it changed to the log (a small file write touches the files,
versions, chunks and full-text pages: about ten 4 KiB pages) and, with
synchronous=FULL, fsyncs. Writes that queue up while a commit is in progress
are therefore run together in the next transaction and pay for one commit.

Leader/follower, no extra thread: a caller queues its operation; if no batch
is running it becomes the leader, takes everything queued (up to
`max_batch`), runs them in one transaction (should one fail, the batch runs
again with each operation in its own SAVEPOINT, so the failing one is rolled
back alone and changes nothing), commits once, and wakes the others. Every
caller returns only after the transaction holding its operation has
committed: an acknowledged write is a committed write. If the
COMMIT itself fails, every operation of the batch gets the error, since none
of them was stored. A lone writer pays no hand-off to another thread.

One thread can also queue several operations (`submit`) and then commit
them together (`wait`): the storage manager's socket thread does this with
the writes that arrive together. Measured here with 200-byte file writes in
one thread, their full-text index changes logged and applied 256 at a time
(index_log.py): 83 us per write one transaction each, 56 us in
batches of 8, 51 us in batches of 16 (fewer commits, and the pages the
writes share logged once per commit). Before the index log, when each batch
also wrote its own full-text segment: 133, 60 and 52 us.

An operation can also defer work to the end of its batch (`Tx.defer`): the
committer hands what the batch's operations deferred to its sink in the same
transaction, just before the commit (the engine logs its index changes so,
one statement per batch).

`group=False` gives one transaction per operation under a plain mutex (what a
careful program without group commit does), which is what the benchmark
compares against.
"""
from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from typing import Any, Callable, Generic, TypeVar

from aios.protocol import ErrorCode

from .errors import StorageError, closed

log = logging.getLogger("aios.storage")

T = TypeVar("T")
#: a write operation: runs inside a write transaction, returns what the caller gets once it committed
WriteFn = Callable[["Tx"], T]


#: receives, inside the transaction, the items the batch's operations deferred (`Tx.defer`)
DeferredSink = Callable[[sqlite3.Connection, list[Any]], None]


class Tx:
    """What a write operation gets: the connection, a way to act only once its data is committed,
    and a way to defer work to the end of the batch (`defer`)."""

    __slots__ = ("conn", "_after", "_deferred", "_sink")

    def __init__(self, conn: sqlite3.Connection, deferred: list[Any] | None = None,
                 sink: DeferredSink | None = None) -> None:
        self.conn = conn
        self._after: list[Callable[[], None]] = []
        self._deferred: list[Any] = [] if deferred is None else deferred
        self._sink = sink

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run `action` once the transaction holding this operation has committed (e.g. fill a cache)."""
        self._after.append(action)

    def defer(self, item: Any) -> None:
        """Hand `item` to the committer's sink at the end of the batch, in the same transaction,
        together with the batch's other deferred items (the storage engine logs its full-text
        index changes this way: one statement per batch instead of one per change)."""
        self._deferred.append(item)

    def flush_deferred(self) -> None:
        """Hand over what this batch deferred so far now (an operation about to read what the
        sink writes calls this)."""
        if self._deferred:
            if self._sink is None:
                raise RuntimeError("deferred items but no sink to take them")
            items = self._deferred[:]
            self._deferred.clear()
            self._sink(self.conn, items)


class Pending(Generic[T]):
    """One queued write operation: done once its transaction committed (or it failed)."""

    __slots__ = ("fn", "result", "error", "done", "after")

    def __init__(self, fn: Callable[[Tx], T]) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.after: list[Callable[[], None]] = []

    def outcome(self) -> T:
        """The operation's result once done; its error raised if it failed."""
        if not self.done:
            raise StorageError(ErrorCode.INTERNAL, "storage: a write was read before it was committed")
        if self.error is not None:
            raise self.error
        return self.result


class GroupCommitter:
    """Serializes write operations on one connection, committing queued ones together."""

    def __init__(self, conn: sqlite3.Connection, *, group: bool = True, max_batch: int = 128,
                 on_commit: Callable[[sqlite3.Connection], None] | None = None,
                 on_deferred: DeferredSink | None = None) -> None:
        self.conn = conn
        self.on_commit = on_commit
        self.on_deferred = on_deferred
        self.group = group
        self.max_batch = max_batch if group else 1
        self._mutex = threading.Lock()  # group=False: one operation, one transaction at a time
        self._cond = threading.Condition()
        self._queue: list[Pending[Any]] = []
        self._leading = False
        self._exclusive_waiting = 0  # exclusive() callers waiting: they go before queued writers
        self._closed = False
        # counters for the benchmark and for stats(): transactions and operations committed
        self.commits = 0
        self.operations = 0

    def run(self, fn: Callable[[Tx], T]) -> T:
        """Run `fn(tx)` in a write transaction; return its result once that transaction committed."""
        op = self.submit(fn)
        self.wait([op])
        return op.outcome()

    def submit(self, fn: Callable[[Tx], T]) -> Pending[T]:
        """Queue `fn(tx)` without waiting; `wait([op, ...])` runs the queue and commits.

        This is how one thread commits several operations in one transaction
        (the storage manager's socket thread does so for the writes that
        arrived together). Without group commit it runs at once, alone."""
        op: Pending[T] = Pending(fn)
        if not self.group:
            self._run_alone(op)
            return op
        with self._cond:
            if self._closed:
                raise closed()
            self._queue.append(op)
        return op

    def wait(self, ops: list[Pending[Any]]) -> None:
        """Return once every op in `ops` is done (committed, or failed), leading batches as needed:
        whichever waiting thread finds no batch running takes everything queued (up to `max_batch`)."""
        cond = self._cond
        with cond:
            while True:
                while (self._leading or self._exclusive_waiting) and not all(op.done for op in ops):
                    cond.wait()
                pending = [op for op in ops if not op.done]
                if not pending:
                    return
                if self._closed:  # closed while we waited, before anyone ran these
                    for op in pending:
                        self._queue.remove(op)
                        op.error = closed()
                        op.done = True
                    return
                self._leading = True
                batch = self._queue[:self.max_batch]
                del self._queue[:self.max_batch]
                cond.release()
                try:
                    self._execute(batch)
                finally:
                    for other in batch:  # a bug in _execute must not leave followers waiting forever
                        if not other.done:
                            other.error = StorageError(ErrorCode.INTERNAL, "storage: the write batch was abandoned")
                            other.done = True
                    cond.acquire()
                    self._leading = False
                    cond.notify_all()

    def _run_alone(self, op: Pending[Any]) -> None:
        with self._mutex:
            if self._closed:
                raise closed()
            self._execute([op])

    def exclusive(self, fn: Callable[[], T]) -> T | None:
        """Run `fn()` while no write transaction runs (writers queue meanwhile, then go in one
        batch). Used to finish a WAL checkpoint at a moment no new frames can be appended.
        Returns None without running `fn` once the committer is closed. It waits for the
        running batch only: queued writers wait for it (else busy writers, which hand the
        turn from one to the next, could starve it)."""
        if not self.group:
            with self._mutex:
                return None if self._closed else fn()
        with self._cond:
            self._exclusive_waiting += 1
            try:
                while self._leading:
                    self._cond.wait()
            finally:
                self._exclusive_waiting -= 1
            if self._closed:
                self._cond.notify_all()
                return None
            self._leading = True
        try:
            return fn()
        finally:
            with self._cond:
                self._leading = False
                self._cond.notify_all()

    def close(self) -> None:
        """Refuse new operations and wait for the running batch; queued ones get UNAVAILABLE."""
        with self._mutex if not self.group else contextlib.nullcontext():
            with self._cond:
                self._closed = True
                while self._leading:
                    self._cond.wait()
                self._cond.notify_all()

    # ---------------------------------------------------------------- batch
    def _execute(self, batch: list[Pending[Any]], isolate: bool = False) -> None:
        """Run `batch` in one transaction and commit it.

        First without savepoints: FTS5 flushes its pending index data into a new
        segment at every savepoint release, which measured 24 us per 200-byte
        write (40% of the batch's SQL time); without them the batch's index data
        goes out as one segment at COMMIT. If an operation fails, the
        transaction is rolled back and the batch runs again with each operation
        in its own savepoint (`isolate`), so the failing one is undone alone.
        Running an operation twice is safe: it is a function of the database
        state, and its effects outside the database wait for `after_commit`."""
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._fail(batch, exc, "could not start a write transaction")
            return
        single = len(batch) == 1
        ok: list[Pending[Any]] = []
        shared: list[Any] = []  # what the batch's operations deferred, handed to the sink at its end
        for op in batch:
            tx = Tx(conn, None if isolate or single else shared, self.on_deferred)
            try:
                if isolate:
                    conn.execute("SAVEPOINT op")
                op.result = op.fn(tx)
                if isolate or single:
                    tx.flush_deferred()  # part of the operation: a failure here is its own
                if isolate:
                    conn.execute("RELEASE op")
                op.after = tx._after
                ok.append(op)
            except BaseException as exc:  # noqa: BLE001 - every failure must reach its caller
                if not single and not isolate:
                    self._retry_isolated(batch)
                    return
                op.error = _as_storage_error(exc)
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back (I/O error, disk full): nothing of
                    # this batch was stored, including operations that had succeeded in it
                    self._fail(batch, exc, "the write transaction was rolled back")
                    return
                try:
                    if single:
                        conn.execute("ROLLBACK")
                        self._finish(batch)
                        return
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                except sqlite3.Error as exc2:
                    self._rollback()
                    self._fail(batch, exc2, "could not undo a failed operation")
                    return
        if shared:
            try:
                Tx(conn, shared, self.on_deferred).flush_deferred()
            except BaseException:  # noqa: BLE001 - which operation's deferred item failed is found one by one
                self._retry_isolated(batch)
                return
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self._fail(ok, exc, "the commit failed")
            self._finish(batch)
            return
        self.commits += 1
        self.operations += len(ok)
        if self.on_commit is not None:
            try:
                self.on_commit(conn)
            except Exception:  # noqa: BLE001 - the data is committed; a hook must not undo the answer
                log.exception("after-commit hook failed")
        for op in ok:
            for action in op.after:
                try:
                    action()
                except Exception:  # noqa: BLE001 - a cache fill must not turn a committed write into an error
                    log.exception("after-commit action failed")
        self._finish(batch)

    def _retry_isolated(self, batch: list[Pending[Any]]) -> None:
        """An operation of a batch run without savepoints failed: undo the batch, run it again
        with each operation in its own savepoint."""
        self._rollback()
        for op in batch:
            op.result, op.after = None, []
        self._execute(batch, isolate=True)

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("ROLLBACK failed")

    def _fail(self, ops: list[Pending[Any]], exc: BaseException, what: str) -> None:
        log.error("storage: %s: %s", what, exc)
        self._rollback()
        err = StorageError(ErrorCode.UNAVAILABLE, f"storage: {what} ({type(exc).__name__}: {exc}); nothing was written")
        for op in ops:
            op.result = None
            op.error = err
        self._finish(ops)

    @staticmethod
    def _finish(ops: list[Pending[Any]]) -> None:
        for op in ops:
            op.done = True


def _as_storage_error(exc: BaseException) -> BaseException:
    """What the caller of a failed operation gets: its StorageError, SQLite's and other errors as
    INTERNAL (logged), and KeyboardInterrupt and friends unchanged."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, sqlite3.Error):
        log.error("storage: operation failed in SQLite: %s", exc)
        return StorageError(ErrorCode.INTERNAL, f"storage: {type(exc).__name__}: {exc}")
    if isinstance(exc, Exception):
        log.exception("storage: operation failed")
        return StorageError(ErrorCode.INTERNAL, f"storage: {type(exc).__name__}: {exc}")
    return exc  # KeyboardInterrupt and friends pass through unchanged
