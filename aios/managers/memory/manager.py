"""The memory manager: the `memory` service, one process wrapping one `MemoryStore`.

Each agent's entries (text, a small metadata map, timestamps) live in RAM in a
radix tree per agent, so entries that share prefixes (conversation logs,
repeated prompts) share their bytes, counted against `[memory] budget_mb`.

No acknowledged write is lost: memory is write-through. Every add, update and
delete is first made durable in the storage service's records (a call through
the scheduler, on behalf of the agent, like the agent's own calls) and only
then applied in RAM and acknowledged. So a kill -9 of the memory manager loses
nothing: the restarted manager reads entries back from storage on access.
Above 80% of the budget, the least valuable entries by LRU-K (K = 2) leave RAM
until it is below 70%; since storage already holds them, eviction copies
nothing, and a read or search that needs an evicted entry brings it back.

Search: ranked keyword search (BM25) over all of an agent's entries, done by
storage's full-text index (it holds every entry, hot or cold); each hit says
which ranking produced it ("ranking": "bm25") and where it came from. Without
a storage service (`[memory] storage = false`) memory is RAM-only: the budget is
a hard limit and search ranks the entries in RAM.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from aios.managers.base import Manager, OpError, RequestContext, op
from aios.managers.memory.store import MemoryStore, Record
from aios.protocol import ErrorCode

MiB = 1024 * 1024


class StorageBacking:
    """The `Backing` of the store: the storage service's records, reached with `ctx.call`
    (`via` is the request context, so every call acts for the request's agent)."""

    @staticmethod
    def _meta(record: Record) -> dict[str, Any]:
        return {"metadata": record.metadata, "created": record.created, "updated": record.updated}

    @staticmethod
    def _record(key: str, text: str, meta: dict[str, Any]) -> Record:
        return Record(key, text, dict(meta.get("metadata") or {}), float(meta.get("created", 0.0)),
                      float(meta.get("updated", 0.0)))

    def put(self, agent: str, record: Record, via: Any) -> None:
        via.call("storage", "record_put", key=record.id, text=record.content, meta=self._meta(record),
                 idempotent=True)

    def get(self, agent: str, entry_id: str, via: Any) -> Record | None:
        try:
            r = via.call("storage", "record_get", key=entry_id, idempotent=True)
        except OpError as exc:
            if exc.code == ErrorCode.NOT_FOUND:
                return None
            raise
        return self._record(r["key"], r["text"], r["meta"])

    def delete(self, agent: str, entry_id: str, via: Any) -> bool:
        return bool(via.call("storage", "record_delete", key=entry_id, idempotent=True)["deleted"])

    def list(self, agent: str, offset: int, limit: int, via: Any) -> tuple[list[dict[str, Any]], int]:
        r = via.call("storage", "record_list", offset=offset, limit=limit, text=False, idempotent=True)
        entries = []
        for rec in r["records"]:
            meta = rec["meta"]
            entries.append({"id": rec["key"], "metadata": dict(meta.get("metadata") or {}),
                            "created": meta.get("created"), "updated": meta.get("updated"), "size": rec["size"]})
        return entries, int(r["total"])

    def search(self, agent: str, query: str, limit: int, via: Any) -> list[tuple[Record, float]] | None:
        r = via.call("storage", "record_search", query=query, limit=limit, match="any", full=True, idempotent=True)
        return [(self._record(h["key"], h["record"]["text"], h["record"]["meta"]), float(h["score"]))
                for h in r["hits"] if h.get("record")]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AddArgs(_Args):
    content: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class IdArgs(_Args):
    id: str = Field(min_length=1, max_length=64)


class UpdateArgs(IdArgs):
    content: str | None = None
    metadata: dict[str, Any] | None = None


class ListArgs(_Args):
    offset: int = Field(default=0, ge=0)
    limit: int = Field(default=100, ge=1, le=1000)


class SearchArgs(_Args):
    query: str = Field(min_length=1, max_length=1000)
    limit: int = Field(default=10, ge=1, le=100)


class NoArgs(_Args):
    pass


class MemoryManager(Manager):
    service = "memory"
    # Handler threads: adds, updates and swap-ins wait on storage calls, so more than the cores
    capacity = 8

    class Options(BaseModel):
        """`[memory]` in the configuration."""

        model_config = ConfigDict(extra="forbid")
        budget_mb: float = Field(default=64.0, gt=0, description="RAM for entries (real bytes, objects included)")
        k: int = Field(default=2, ge=1, le=8, description="LRU-K's K: evict by the K-th most recent use")
        high_water: float = Field(default=0.8, gt=0, le=1, description="evict above this share of the budget")
        low_water: float = Field(default=0.7, gt=0, le=1, description="... down to this share")
        correlated_period_s: float = Field(default=0.0, ge=0, description="LRU-K: uses closer than this count once")
        storage: bool = Field(default=True, description="write entries through to the storage service (durable, "
                                                         "evictable); false: RAM only, the budget is a hard limit")

    def setup(self) -> None:
        o = self.options
        if o.low_water >= o.high_water:
            raise ValueError(f"[memory] low_water ({o.low_water}) must be below high_water ({o.high_water})")
        self.store = MemoryStore(int(o.budget_mb * MiB), k=o.k, high_water=o.high_water, low_water=o.low_water,
                                 correlated_period=o.correlated_period_s,
                                 backing=StorageBacking() if o.storage else None)
        self.log.info("memory budget %.1f MB, %s", o.budget_mb, "write-through to storage" if o.storage else "RAM only")

    @op(AddArgs)
    def add(self, args: AddArgs, ctx: RequestContext) -> dict:
        """Keep a new entry; returns it with its id (durable before this returns)."""
        return self.store.add(ctx.agent, args.content, args.metadata, via=ctx).to_dict()

    @op(IdArgs, idempotent=True)
    def get(self, args: IdArgs, ctx: RequestContext) -> dict:
        return self.store.get(ctx.agent, args.id, via=ctx).to_dict()

    @op(UpdateArgs, idempotent=True)
    def update(self, args: UpdateArgs, ctx: RequestContext) -> dict:
        """Replace the content and/or the metadata (the whole map) of an entry."""
        return self.store.update(ctx.agent, args.id, content=args.content, metadata=args.metadata, via=ctx).to_dict()

    @op(IdArgs)
    def delete(self, args: IdArgs, ctx: RequestContext) -> dict:
        self.store.delete(ctx.agent, args.id, via=ctx)
        return {"id": args.id, "deleted": True}

    @op(ListArgs, name="list", idempotent=True)
    def list_entries(self, args: ListArgs, ctx: RequestContext) -> dict:
        """Summaries (no content), oldest first: {"entries", "total", "offset"}."""
        return self.store.list(ctx.agent, offset=args.offset, limit=args.limit, via=ctx)

    @op(SearchArgs, idempotent=True)
    def search(self, args: SearchArgs, ctx: RequestContext) -> dict:
        """Ranked search of the agent's entries; each hit says which ranking produced it."""
        return self.store.search(ctx.agent, args.query, limit=args.limit, via=ctx)

    @op(NoArgs, idempotent=True)
    def stats(self, args: NoArgs, ctx: RequestContext) -> dict:
        """This agent's entries (in RAM and in all), raw vs stored bytes, and the store's figures."""
        mine = self.store.stats(ctx.agent)
        total = None
        if self.options.storage:
            total = int(ctx.call("storage", "record_list", limit=1, text=False, idempotent=True)["total"])
        return {**mine, "entries": total if total is not None else mine["entries_in_ram"],
                "entries_evicted": (total - mine["entries_in_ram"]) if total is not None else 0,
                "store": self.store.stats()}
