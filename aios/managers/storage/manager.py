"""The storage manager: the `storage` service, one process wrapping one `StorageEngine`.

Every file op acts in the namespace of the agent on whose behalf the request
runs (`ctx.agent`, also when another manager makes the call for it), so an
agent can only ever reach its own files. The records ops are the keyed store
other managers keep per agent (the memory manager's entries): only a
manager's call may use them (`ctx.caller`), and each manager sees only its
own records.

The engine knows nothing of managers: it raises its own `StorageError`, and
every op is declared with `engine_op`, which answers it as `OpError` with the
same code and message.

Ops that only read are declared idempotent (the kernel re-sends or re-queues
them after a failure); writes are not: each run adds a version.

The common small ops run inline on the socket thread (see `Manager`): file
reads, stats, writes and appends, and the records other managers keep. Writes
are queued as they arrive and the batch's writes commit in one transaction at
its end (`end_batch`), before any of them is answered: an acknowledged write
is a committed write. Measured with `aios bench storage` (16 agents, 200-byte
writes): 2,300 writes/s when every op ran on the pool, 4,400-4,800 inline and
batched (on the pool, threads hand the GIL and the socket to each other for
every write). Ops that may take long run on the pool, where a slow one delays
nobody else: search, list, history, rollback, delete, and writes over
`INLINE_WRITE_BYTES` (chunking and compressing 8 MB takes about 0.3 s).
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from aios.datadir import database_path
from aios.managers.base import Deferred, Manager, OpError, RequestContext, op
from aios.managers.storage.engine import MiB, StorageEngine, StorageError, StorageOpenError
from aios.managers.storage.writer import WriteFn
from aios.protocol import ErrorCode
from aios.status_view import mb

log = logging.getLogger("aios.storage")
H = TypeVar("H", bound=Callable[..., Any])


def _op_error(exc: StorageError) -> OpError:
    """The reply to a request the engine refused: its code and message, as OpError. The one place
    where the engine's errors (errors.py) become the manager's."""
    return OpError(exc.code, exc.message)


def engine_op(args_model: type[BaseModel] | None = None, **spec: Any) -> Callable[[H], H]:
    """`op` for a handler that calls the engine: a StorageError raised by the handler, or by the
    `finish` of the `Deferred` it returns, is answered as `_op_error` says."""
    def wrap(handler: H) -> H:
        @functools.wraps(handler)
        def run(self: "StorageManager", args: Any, ctx: RequestContext) -> Any:
            try:
                result = handler(self, args, ctx)
            except StorageError as exc:
                raise _op_error(exc) from None
            if isinstance(result, Deferred):
                return Deferred(_answered(result.finish), result.token)
            return result
        return op(args_model, **spec)(run)  # type: ignore[return-value]
    return wrap


def _answered(finish: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        try:
            return finish()
        except StorageError as exc:
            raise _op_error(exc) from None
    return run


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PathArgs(_Args):
    path: str = Field(max_length=4096)


class WriteArgs(PathArgs):
    data: str | bytes = Field(description="text (stored as UTF-8) or bytes")


class ReadArgs(PathArgs):
    version: int | None = Field(default=None, ge=1)


class ListArgs(_Args):
    prefix: str = Field(default="", max_length=4096)
    recursive: bool = True
    include_deleted: bool = False
    after: str = Field(default="", max_length=4096)
    limit: int = Field(default=1000, ge=1, le=10_000)


class DeleteArgs(PathArgs):
    purge: bool = False


class RollbackArgs(PathArgs):
    version: int = Field(ge=1)


class SearchArgs(_Args):
    query: str = Field(min_length=1, max_length=1000)
    limit: int = Field(default=10, ge=1, le=100)
    match: Literal["all", "any"] = "all"


class NoArgs(_Args):
    pass


class RecordArgs(_Args):
    key: str = Field(min_length=1, max_length=512)


class RecordPutArgs(RecordArgs):
    text: str
    meta: dict[str, Any] = Field(default_factory=dict)


class RecordListArgs(_Args):
    after: str = ""
    offset: int = Field(default=0, ge=0)
    limit: int = Field(default=1000, ge=1, le=10_000)
    text: bool = True


class RecordSearchArgs(_Args):
    query: str = Field(min_length=1, max_length=1000)
    limit: int = Field(default=10, ge=1, le=1000)
    match: Literal["all", "any"] = "any"
    full: bool = False


#: index log changes that make the socket thread apply the log after a batch. Measured here, FTS5
#: indexed 200-byte files at 38 us each in batches of 7 (one group commit), 19 us in batches of 128;
#: and a larger window takes a file written again within it only once: with 16 agents rewriting
#: 50 files each in turn, in process, 56.9 us per write applying the log at 1,024 changes, 45.6 us
#: at 4,096 (the pause while it is applied: median 6.9 ms, then 12.3 ms; `aios bench storage`:
#: 0.55x direct, then 0.58-0.60x, and a lower p99, as fewer writes wait for a pause)
INDEX_FLUSH_CHANGES = 4096

#: writes up to this size run on the socket thread; larger ones on the pool (their chunking and
#: compression would hold up every other request: about 40 ms per MB here)
INLINE_WRITE_BYTES = 64 * 1024


def _small_write(args: "WriteArgs | RecordPutArgs") -> bool:
    data = args.data if isinstance(args, WriteArgs) else args.text
    return len(data) <= INLINE_WRITE_BYTES


def _dump(info: Any) -> dict:
    return info.model_dump()


def _bytes(data: str | bytes) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else data


class StorageManager(Manager):
    service = "storage"
    # Requests in hand at once. Inline writes that arrive together commit together, so this bounds
    # the batch (60 us per write in batches of 8, 52 us in batches of 16, against 133 us alone).
    capacity = 32
    # Threads for the ops that run on the pool (search, list, history, rollback, delete, large
    # writes): each keeps a reader connection with its own 16 MB page cache, so not 32 of them.
    pool_threads = 8

    class Options(BaseModel):
        """`[storage]` in the configuration."""

        model_config = ConfigDict(extra="forbid")
        path: str | None = Field(default=None, description="the SQLite database; default: $AIOS_DATA_DIR, "
                                 "else $XDG_DATA_HOME/aios, else ~/.local/share/aios (storage.sqlite3)")
        versions_kept: int = Field(default=32, ge=1, le=100_000, description="versions kept per file")
        max_file_mb: float = Field(default=8.0, gt=0, le=15.0,
                                   description="largest file; a read returns a whole file in one reply, so "
                                               "it must stay under [kernel] max_message_bytes (16 MB)")
        quota_mb: float = Field(default=256.0, gt=0, description="what one agent may keep on disk")
        synchronous: Literal["NORMAL", "FULL"] = Field(
            default="NORMAL", description="NORMAL: survives a crash of the process; FULL: also a power loss")
        group_commit: bool = True
        index_kb: int = Field(default=1024, ge=0, description="how much of each file full-text search covers")

    def setup(self) -> None:
        o = self.options
        path = database_path(o.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.engine = StorageEngine(path, versions_kept=o.versions_kept, max_file_bytes=int(o.max_file_mb * MiB),
                                        max_agent_bytes=int(o.quota_mb * MiB), synchronous=o.synchronous,
                                        group_commit=o.group_commit, max_index_bytes=o.index_kb * 1024)
        except (OSError, StorageOpenError, ValueError) as exc:
            raise RuntimeError(f"cannot open the storage database {path}: {exc}") from None
        self.log.info("storage database %s (synchronous=%s)", path, o.synchronous)

    def teardown(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    # ----------------------------------------------------------- batching
    def _later(self, fn: WriteFn[Any], shape: Callable[[Any], Any]) -> Deferred:
        """Queue a write for this batch's transaction; answer with `shape(result)` once committed."""
        pending = self.engine.submit(fn)
        return Deferred(lambda: shape(pending.outcome()), pending)

    def end_batch(self, tokens: list[Any]) -> None:
        self.engine.wait(tokens)

    def housekeeping(self, idle: bool) -> None:
        # Writes log their full-text index changes (index_log.py); apply them once a
        # batch's worth has gathered, after the replies of the batch that completed it went out,
        # and whatever is left when nothing else is happening.
        self.engine.flush_index(1 if idle else INDEX_FLUSH_CHANGES)

    # ---------------------------------------------------------------- files
    @engine_op(WriteArgs, inline=_small_write)
    def write(self, args: WriteArgs, ctx: RequestContext) -> Deferred:
        """Write a file (a new version each time)."""
        return self._later(self.engine.write_fn(ctx.agent, args.path, _bytes(args.data)), _dump)

    @engine_op(WriteArgs, inline=_small_write)
    def append(self, args: WriteArgs, ctx: RequestContext) -> Deferred:
        return self._later(self.engine.write_fn(ctx.agent, args.path, _bytes(args.data), append=True), _dump)

    @engine_op(ReadArgs, idempotent=True, inline=True)
    def read(self, args: ReadArgs, ctx: RequestContext) -> dict:
        """{"data": bytes, "path", "version", "size", ...}: the file (or one of its kept versions)."""
        data, info = self.engine.read(ctx.agent, args.path, args.version)
        return {"data": data, **info.model_dump()}

    @engine_op(PathArgs, idempotent=True, inline=True)
    def stat(self, args: PathArgs, ctx: RequestContext) -> dict:
        return self.engine.stat(ctx.agent, args.path).model_dump()

    @engine_op(ListArgs, name="list", idempotent=True)
    def list_files(self, args: ListArgs, ctx: RequestContext) -> dict:
        files = self.engine.list(ctx.agent, args.prefix, args.recursive, include_deleted=args.include_deleted,
                                 after=args.after, limit=args.limit)
        return {"files": [f.model_dump() for f in files]}

    @engine_op(DeleteArgs)
    def delete(self, args: DeleteArgs, ctx: RequestContext) -> dict:
        return self.engine.delete(ctx.agent, args.path, purge=args.purge).model_dump()

    @engine_op(PathArgs, idempotent=True)
    def history(self, args: PathArgs, ctx: RequestContext) -> dict:
        return {"versions": [v.model_dump() for v in self.engine.history(ctx.agent, args.path)]}

    @engine_op(RollbackArgs)
    def rollback(self, args: RollbackArgs, ctx: RequestContext) -> dict:
        return self.engine.rollback(ctx.agent, args.path, args.version).model_dump()

    @engine_op(SearchArgs, idempotent=True)
    def search(self, args: SearchArgs, ctx: RequestContext) -> dict:
        hits = self.engine.search(ctx.agent, args.query, args.limit, match=args.match)
        return {"hits": [h.model_dump() for h in hits]}

    @engine_op(NoArgs, idempotent=True)
    def stats(self, args: NoArgs, ctx: RequestContext) -> dict:
        """This agent's figures (files, versions, raw and stored bytes, quota use)."""
        return self.engine.stats(ctx.agent)

    def status_figures(self) -> dict[str, Any]:
        """The engine's own figures, for the `status` op: database size, commits and writes per
        commit, checkpoints. No agent's data (names, paths, contents) is in them."""
        return self.engine.activity()

    def status_line(self, figures: dict[str, Any]) -> str:
        d, per_commit = figures, figures.get("writes_per_commit")
        return (f"{d.get('path')} ({mb(d.get('database_bytes'))}, synchronous={d.get('synchronous')}); "
                f"{d.get('write_operations', 0)} writes in {d.get('commits', 0)} commits"
                f"{f' ({per_commit} per commit)' if per_commit else ''}, {d.get('checkpoints') or 0} checkpoints, "
                f"{d.get('index_pending') or 0} index changes pending")

    # -------------------------------------------------------------- records
    def _owner(self, ctx: RequestContext) -> str:
        if ctx.caller is None:
            raise OpError(ErrorCode.DENIED, "records are kept for other kernel managers; agents use files")
        return ctx.caller

    @engine_op(RecordPutArgs, idempotent=True, inline=_small_write)
    def record_put(self, args: RecordPutArgs, ctx: RequestContext) -> Deferred:
        key = args.key
        return self._later(self.engine.record_put_fn(self._owner(ctx), ctx.agent, key, args.text, args.meta),
                           lambda _: {"key": key})

    @engine_op(RecordArgs, idempotent=True, inline=True)
    def record_get(self, args: RecordArgs, ctx: RequestContext) -> dict:
        rec = self.engine.record_get(self._owner(ctx), ctx.agent, args.key)
        if rec is None:
            raise OpError(ErrorCode.NOT_FOUND, f"no record {args.key!r}")
        return rec.model_dump()

    @engine_op(RecordArgs, idempotent=True, inline=True)
    def record_delete(self, args: RecordArgs, ctx: RequestContext) -> Deferred:
        return self._later(self.engine.record_delete_fn(self._owner(ctx), ctx.agent, args.key),
                           lambda deleted: {"deleted": deleted})

    @engine_op(RecordListArgs, idempotent=True)
    def record_list(self, args: RecordListArgs, ctx: RequestContext) -> dict:
        owner = self._owner(ctx)
        recs = self.engine.record_list(owner, ctx.agent, after=args.after, limit=args.limit, offset=args.offset,
                                       text=args.text)
        return {"records": [r.model_dump() for r in recs], "total": self.engine.record_stats(owner, ctx.agent)["records"]}

    @engine_op(RecordSearchArgs, idempotent=True)
    def record_search(self, args: RecordSearchArgs, ctx: RequestContext) -> dict:
        hits = self.engine.record_search(self._owner(ctx), ctx.agent, args.query, args.limit, match=args.match,
                                         full=args.full)
        return {"hits": [h.model_dump() for h in hits]}
