"""What the storage engine returns: plain-field pydantic models (sent as msgpack maps).

Times are Unix seconds (float). Sizes are bytes.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileInfo(_Out):
    """A file (or, in a non-recursive listing, a directory) in an agent's namespace.

    For a file, `version` is the newest version (or the version that was read),
    `versions` how many versions are kept, `oldest_version` the oldest one that
    can still be read or rolled back to. `deleted` is true for a file whose
    newest version is a deletion (listed only with include_deleted). For a
    directory, `kind` is "dir" and the numbers are 0.
    """

    path: str
    kind: Literal["file", "dir"] = "file"
    size: int = 0
    version: int = 0
    versions: int = 0
    oldest_version: int = 0
    created: float = 0.0
    modified: float = 0.0
    deleted: bool = False


class VersionInfo(_Out):
    """One kept version of a file. `op` says how it was made; `source` is the version a rollback restored."""

    version: int
    op: Literal["write", "append", "rollback", "delete"]
    size: int
    created: float
    source: int | None = None
    current: bool = False


class Deleted(_Out):
    """Result of a delete: the deletion's version (None when purged) and the stored bytes freed."""

    path: str
    version: int | None
    purged: bool
    freed_bytes: int


class SearchHit(_Out):
    """A file matching a search: `score` is -bm25 (higher is better), `snippet` marks hits with [ ].
    Scores rank the hits of one search; their size means little: in a small index they are tiny
    (SQLite's bm25 floors the weight of a word most rows hold at 1e-6)."""

    path: str
    version: int
    score: float
    snippet: str


class Record(_Out):
    key: str
    text: str
    meta: dict[str, Any]
    size: int
    updated: float


class RecordHit(_Out):
    key: str
    score: float
    snippet: str
    record: Record | None = None  # with full=True
