"""What a memory entry is to callers and to the storage behind the store: `MemoryRecord`, `Backing`, ids."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from aios.managers.memory.sizing import utf8_len
from aios.memory_ids import new_entry_id


@dataclass(frozen=True)
class MemoryRecord:
    """One memory entry as callers and the backing see it."""

    id: str
    content: str
    metadata: dict[str, Any]
    created: float  # wall-clock seconds (time.time())
    updated: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "content": self.content, "metadata": dict(self.metadata),
                "created": self.created, "updated": self.updated}

    def summary(self) -> dict[str, Any]:
        """What `list` returns: everything but the content."""
        return {"id": self.id, "metadata": dict(self.metadata), "created": self.created,
                "updated": self.updated, "size": utf8_len(self.content)}


class Backing(Protocol):
    """Where entries persist (the storage service, reached through the manager's ctx).

    `via` is whatever the caller of the store's op passed (the manager passes its
    RequestContext, so the backing can `ctx.call("storage", ...)` on the agent's behalf).
    Errors are raised as OpError and reach the caller unchanged.
    """

    def put(self, agent: str, record: MemoryRecord, via: Any) -> None:
        """Create or replace the agent's entry `record.id`, durably."""

    def get(self, agent: str, entry_id: str, via: Any) -> MemoryRecord | None:
        """The agent's entry, or None if it has none with that id."""

    def delete(self, agent: str, entry_id: str, via: Any) -> bool:
        """Remove the agent's entry; False if there was none."""

    def list(self, agent: str, offset: int, limit: int, via: Any) -> tuple[list[dict[str, Any]], int]:
        """Summaries (MemoryRecord.summary()) ordered by (created, id), and the agent's total count."""

    def search(self, agent: str, query: str, limit: int, via: Any) -> list[tuple[MemoryRecord, float]] | None:
        """Keyword (bm25) search over all the agent's entries, best first with scores
        (higher is better), or None if the backing cannot search."""


def new_id() -> str:
    """A new entry id (`aios.memory_ids.new_entry_id`: unguessable, sorting by creation time)."""
    return new_entry_id()
