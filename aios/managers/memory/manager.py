"""The memory manager: the `memory` service, one process wrapping one `MemoryStore`.

Each agent's entries (text, a small metadata map, timestamps) live in RAM in a
radix tree per agent, so entries that share prefixes (conversation logs,
repeated prompts) share their bytes, counted against `[memory] budget_mb`.

No acknowledged write is lost: memory is write-through. Every add, update and
delete is first made durable in the storage service's records (a call through
the scheduler, on behalf of the agent, like the agent's own calls) and only
then applied in RAM and acknowledged. So a kill -9 of the memory manager loses
nothing: the restarted manager reads entries back from storage on access.
Nor is an add stored twice: the SDK names each new entry (`memory.add` sends
an id it made), so an add run again after its manager died finds the entry
the first run stored instead of adding a copy.
Above 80% of the budget, the least valuable entries by LRU-K (K = 2) leave RAM
until it is below 70%; since storage already holds them, eviction copies
nothing, and a read or search that needs an evicted entry brings it back.

Search: ranked keyword search (BM25) over all of an agent's entries, done by
storage's full-text index (it holds every entry, hot or cold). When an LLM
core offers embeddings (`llm.embed`), search also ranks by meaning: the query
and the agent's most recent entries (`[memory] semantic_candidates`) are
embedded (entries' vectors are cached in RAM by version and model, at most
`semantic_batch` new ones per search, so a search never waits on embedding a
whole history) and compared after calibration against generic text, which
also sets the floor a hit by meaning must clear (meaning.py). The two rankings
are merged by letting the more confident one lead (fusion.py). Every hit says
which rankings produced it, at what rank and score ("rankings": {"bm25": ...,
"embedding": ...}), and the reply says how many entries were compared by
meaning and which ranking led. `rankings` in the request asks for one ranking
alone. Without a storage service (`[memory] storage = false`) memory is
RAM-only: the budget is a hard limit and search ranks the entries in RAM.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from aios.config import Config, ManagerSpec
from aios.managers.base import Manager, OpError, RequestContext, op
from aios.managers.memory.fusion import fuse
from aios.managers.memory.meaning import BACKGROUND, Calibration, VectorCache
from aios.managers.memory.store import MemoryStore, MemoryRecord
from aios.protocol import ErrorCode
from aios.status_view import mb

#: how long the answer to "does an LLM core offer embeddings?" is trusted
EMBEDDINGS_CHECK_S = 30.0

MiB = 1024 * 1024


class StorageBacking:
    """The `Backing` of the store: the storage service's records, reached with `ctx.call`
    (`via` is the request context, so every call acts for the request's agent)."""

    @staticmethod
    def _meta(record: MemoryRecord) -> dict[str, Any]:
        return {"metadata": record.metadata, "created": record.created, "updated": record.updated}

    @staticmethod
    def _record(key: str, text: str, meta: dict[str, Any]) -> MemoryRecord:
        return MemoryRecord(key, text, dict(meta.get("metadata") or {}), float(meta.get("created", 0.0)),
                      float(meta.get("updated", 0.0)))

    def put(self, agent: str, record: MemoryRecord, via: Any) -> None:
        via.call("storage", "record_put", key=record.id, text=record.content, meta=self._meta(record),
                 idempotent=True)

    def get(self, agent: str, entry_id: str, via: Any) -> MemoryRecord | None:
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

    def search(self, agent: str, query: str, limit: int, via: Any) -> list[tuple[MemoryRecord, float]] | None:
        r = via.call("storage", "record_search", query=query, limit=limit, match="any", full=True, idempotent=True)
        return [(self._record(h["key"], h["record"]["text"], h["record"]["meta"]), float(h["score"]))
                for h in r["hits"] if h.get("record")]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AddArgs(_Args):
    content: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    #: the new entry's id, made by the caller (the SDK makes one per add) so that running the add
    #: again finds the entry instead of adding a copy
    id: str | None = Field(default=None, min_length=1, max_length=64)


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
    rankings: list[Literal["bm25", "embedding"]] | None = Field(default=None, min_length=1, max_length=2)


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
        semantic: Literal["auto", "off"] = Field(default="auto", description="also search by meaning when an "
                                                 "LLM core offers embeddings")
        semantic_candidates: int = Field(default=500, ge=1, le=10_000,
                                         description="the most recent entries compared by meaning")
        semantic_batch: int = Field(default=32, ge=1, le=64, description="new entries embedded per search")
        semantic_cache_mb: float = Field(default=8.0, ge=0, description="RAM for cached entry vectors")

    @classmethod
    def check_kernel(cls, spec: ManagerSpec, options: Any, config: Config) -> list[str]:
        if options.storage and not config.builtin_enabled("storage"):
            return [f"{spec.where} keeps its entries in the storage service, which [storage] turns off: enable "
                    f"[storage], or set {spec.where} storage = false (RAM only, nothing survives a restart)"]
        return []

    def setup(self) -> None:
        o = self.options
        if o.low_water >= o.high_water:
            raise ValueError(f"[memory] low_water ({o.low_water}) must be below high_water ({o.high_water})")
        self.store = MemoryStore(int(o.budget_mb * MiB), k=o.k, high_water=o.high_water, low_water=o.low_water,
                                 correlated_period=o.correlated_period_s,
                                 backing=StorageBacking() if o.storage else None)
        self.vectors = VectorCache(int(o.semantic_cache_mb * MiB))
        self._calibrations: dict[str, Calibration] = {}  # by embedding model
        self._calibration_lock = threading.Lock()
        self._model: str | None = None  # the embedding model the last search used
        self._embeddings_seen: tuple[float, bool] = (-1e9, False)
        self.log.info("memory budget %.1f MB, %s", o.budget_mb, "write-through to storage" if o.storage else "RAM only")

    @op(AddArgs, idempotent=True)
    def add(self, args: AddArgs, ctx: RequestContext) -> dict:
        """Keep a new entry; returns it with its id (durable before this returns).

        Safe to repeat when the caller names the entry (`id`, as the SDK does): a second run finds
        the entry the first one stored, so the scheduler re-runs an add whose manager died. An add
        without an id cannot be recognised: if its first run was lost with its manager, it may have
        stored the entry, so it is answered MANAGER_DIED, not retryable, instead of run again."""
        if args.id is None and ctx.attempt > 1:
            raise OpError(ErrorCode.MANAGER_DIED,
                          "the memory manager died while running this add, which names no entry id, so it was not "
                          "run again: it may or may not have stored the entry (give adds an id, as the SDK does, "
                          "to make them safe to repeat)", retryable=False)
        return self.store.add(ctx.agent, args.content, args.metadata, entry_id=args.id, via=ctx).to_dict()

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
        """Ranked search of the agent's entries, by keywords and by meaning (when an LLM core offers
        embeddings) merged, or by the one ranking asked for (`rankings`); each hit says which
        rankings produced it. A hit always clears its ranking's floor: a keyword hit contains a
        query word, a hit by meaning is more similar to the query than generic text is (meaning.py)."""
        wanted = [name for name in ("bm25", "embedding") if name in (args.rankings or ("bm25", "embedding"))]
        self.store.check_query(args.query)
        offered = self._embeddings_offered(ctx)
        if wanted == ["embedding"] and not offered:
            raise OpError(ErrorCode.UNAVAILABLE, "no LLM core offers embeddings (llm.embed) now, so memory cannot "
                                                 "search by meaning: configure one, or search with rankings "
                                                 "[\"bm25\"]")
        keyword = self.store.search(ctx.agent, args.query, limit=args.limit, via=ctx) if "bm25" in wanted else None
        if keyword is not None and (not offered or "embedding" not in wanted):
            return {**keyword, "rankings": ["bm25"]}
        try:
            semantic, compared, candidates = self._semantic(args.query, args.limit, ctx)
        except OpError as exc:  # the LLM core could not embed now: say so, keep the keyword ranking
            if keyword is None:
                raise
            return {**keyword, "rankings": ["bm25"], "note": f"search by meaning failed: {exc.message}"}
        out: dict[str, Any] = {"complete": True, "rankings": wanted, "compared_by_meaning": compared,
                               "candidates_by_meaning": candidates}
        if keyword is None:
            out["hits"] = [{**{k: v for k, v in h.items() if k != "z"},
                            "rankings": {"embedding": {"rank": i, "score": h["score"], "z": h["z"]}}}
                           for i, h in enumerate(semantic, start=1)]
        else:
            out["hits"], how = fuse(keyword["hits"], semantic, args.limit)
            out.update(how, complete=keyword.get("complete", True))
        for h in out["hits"]:
            h["ranking"] = "+".join(name for name in ("bm25", "embedding") if name in h["rankings"])
        if compared < candidates:
            out["note"] = (f"{candidates - compared} recent entries were not yet embedded and were "
                           f"{'ranked by keywords only' if keyword is not None else 'left out'}; later searches "
                           f"embed them")
        return out

    def _embeddings_offered(self, ctx: RequestContext) -> bool:
        if self.options.semantic == "off":
            return False
        checked, offered = self._embeddings_seen
        if time.monotonic() - checked < EMBEDDINGS_CHECK_S:
            return offered
        try:
            offered = bool(ctx.call("llm", "info", idempotent=True).get("embeddings"))
        except OpError:
            offered = False  # no LLM service, or it cannot answer now
        self._embeddings_seen = (time.monotonic(), offered)
        return offered

    def _calibration(self, model: str, ctx: RequestContext) -> Calibration:
        """The model's calibration (meaning.py), made on first use from the background sentences."""
        with self._calibration_lock:
            found = self._calibrations.get(model)
        if found is not None:
            return found
        reply = ctx.call("llm", "embed", texts=list(BACKGROUND), idempotent=True)
        if reply.get("model") != model:
            raise OpError(ErrorCode.UNAVAILABLE, f"LLM cores with different embedding models answered "
                                                 f"({model!r}, then {reply.get('model')!r}); search by meaning "
                                                 f"needs one model for a query and its entries")
        calibration = Calibration(model, reply["vectors"])
        with self._calibration_lock:
            return self._calibrations.setdefault(model, calibration)

    def _semantic(self, query: str, limit: int, ctx: RequestContext) -> tuple[list[dict[str, Any]], int, int]:
        """The agent's most recent entries that clear the floor by meaning, most similar first."""
        o = self.options
        listing = self.store.list(ctx.agent, offset=0, limit=min(o.semantic_candidates, 1000), via=ctx)
        entries = listing["entries"]
        if listing["total"] > len(entries):  # the most recent ones: the listing is oldest first
            entries = self.store.list(ctx.agent, offset=listing["total"] - len(entries), limit=len(entries),
                                      via=ctx)["entries"]
        model = self._model
        missing = [e for e in reversed(entries)
                   if model is None or self.vectors.get(ctx.agent, e["id"], e["updated"], model) is None]
        to_embed = missing[:o.semantic_batch]
        texts = [self.store.get(ctx.agent, e["id"], via=ctx).content for e in to_embed]
        reply = ctx.call("llm", "embed", texts=[query, *texts], idempotent=True)
        model = str(reply.get("model") or "?")
        calibration = self._calibration(model, ctx)
        q_vec, *vecs = reply["vectors"]
        try:
            for e, vec in zip(to_embed, vecs):
                self.vectors.put(ctx.agent, e["id"], e["updated"], model, calibration.project(vec))
            self._model = model
            candidates = [(e["id"], vec) for e in entries
                          if (vec := self.vectors.get(ctx.agent, e["id"], e["updated"], model)) is not None]
            ranked = calibration.rank(q_vec, candidates, limit)
        except ValueError as exc:  # the core's vectors changed dimensions under the same model name
            raise OpError(ErrorCode.UNAVAILABLE, f"the embeddings of {model!r} do not match: {exc}") from None
        hits = []
        for hit in ranked:
            try:
                record = self.store.get(ctx.agent, str(hit.key), via=ctx)
            except OpError:
                continue  # deleted meanwhile
            hits.append({**record.to_dict(), "score": hit.similarity, "z": hit.z, "ranking": "embedding",
                         "source": "memory"})
        return hits, len(candidates), len(entries)

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

    def status_figures(self) -> dict[str, Any]:
        """The store's figures: raw vs stored bytes, budget, evictions, swap-ins (what `stats` has as "store")."""
        return self.store.stats()

    def status_line(self, figures: dict[str, Any]) -> str:
        d, ratio = figures, figures.get("compression_ratio")
        return (f"{d.get('mode')}, {d.get('entries_in_ram')} entries in RAM for {d.get('agents_in_ram')} agents, "
                f"{d.get('raw_bytes')} B raw stored in {d.get('stored_bytes')} B "
                f"({f'{ratio}x' if ratio else 'no entries'}), {mb(d.get('accounted_bytes'))} of "
                f"{mb(d.get('budget_bytes'))} budget, {d.get('evictions', 0)} evictions, "
                f"{d.get('swap_ins', 0)} swap-ins")
