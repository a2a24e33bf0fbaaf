"""A version's content in the database: chunks stored once per agent, manifests, pruning.

chunks.py defines the formats (content-defined chunks, their encoding, the
manifest that lists a version's chunks, content up to 1 KiB kept inline);
these functions keep them in the tables `chunks` and `chunk_data`, with a
reference count per chunk, inside the caller's transaction or snapshot.
Corrupt or missing chunks raise StorageError(INTERNAL): that is damage, never
the caller's fault.
"""
from __future__ import annotations

import sqlite3
from collections import Counter

from aios.protocol import ErrorCode

from . import chunks as ch
from .errors import StorageError

_IN_BATCH = 500  # ids per "IN (...)" query


def load(conn: sqlite3.Connection, ids: list[int], limit: int | None = None) -> bytes:
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
                raise StorageError(ErrorCode.INTERNAL, f"storage: chunk {cid} is corrupt ({exc})") from None
            if ch.chunk_hash(raw) != digest:
                raise StorageError(ErrorCode.INTERNAL, f"storage: chunk {cid} is corrupt (hash mismatch)")
            found[cid] = raw
        for cid in group:
            raw = found.get(cid)
            if raw is None:
                raise StorageError(ErrorCode.INTERNAL, f"storage: chunk {cid} is missing")
            parts.append(raw)
            got += len(raw)
            if limit is not None and got >= limit:
                return b"".join(parts)
    return b"".join(parts)


def load_suffix(conn: sqlite3.Connection, ids: list[int], nbytes: int) -> bytes:
    """At least the last `nbytes` of the content made of chunks `ids` (whole chunks, from the end)."""
    parts: list[bytes] = []
    got, end = 0, len(ids)
    while got < nbytes and end > 0:
        start = max(0, end - 16)
        piece = load(conn, ids[start:end])
        parts.append(piece)
        got += len(piece)
        end = start
    return b"".join(reversed(parts))


def put_chunks(conn: sqlite3.Connection, agent_id: int, pieces: list[ch.Chunk]) -> tuple[list[int], int]:
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


def add_refs(conn: sqlite3.Connection, ids: list[int]) -> None:
    if ids:
        conn.executemany("UPDATE chunks SET refs = refs + ? WHERE id = ?",
                         [(n, cid) for cid, n in Counter(ids).items()])


def drop_refs(conn: sqlite3.Connection, ids: list[int]) -> int:
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


def version_manifest(conn: sqlite3.Connection, file_id: int, version: int) -> list[int] | bytes:
    """A version's chunk ids, or its content if kept inline."""
    row = conn.execute("SELECT manifest FROM versions WHERE file_id = ? AND version = ?",
                       (file_id, version)).fetchone()
    if row is None:
        raise StorageError(ErrorCode.INTERNAL, f"storage: version {version} of file {file_id} is missing")
    return ch.read_manifest(row[0])


def content(conn: sqlite3.Connection, manifest: bytes, limit: int | None = None) -> bytes:
    """The content a manifest stands for (at least its first `limit` bytes)."""
    found = ch.read_manifest(manifest)
    return found if isinstance(found, bytes) else load(conn, found, limit)


def prepare(chunker: ch.Chunker, data: bytes) -> bytes | list[ch.Chunk]:
    """What to store for `data`: an inline manifest for small content, else encoded chunks."""
    if len(data) <= ch.INLINE_MAX:
        return ch.pack_inline(data)
    return [ch.encode(piece) for piece in chunker.split(data)]


def store(conn: sqlite3.Connection, agent_id: int, prepared: bytes | list[ch.Chunk]) -> tuple[list[int], int, bytes]:
    """Store prepared content: (chunk ids, chunk bytes added, manifest)."""
    if isinstance(prepared, bytes):
        return [], 0, prepared
    ids, added = put_chunks(conn, agent_id, prepared)
    return ids, added, ch.pack_manifest(ids)


def prune(conn: sqlite3.Connection, file_id: int, newest: int, oldest: int, keep: int) -> tuple[int, int]:
    """Drop the file's versions beyond the newest `keep`; return (bytes freed, new oldest version)."""
    cutoff = newest - keep
    if cutoff < oldest:
        return 0, oldest
    manifests = [m for (m,) in conn.execute(
        "DELETE FROM versions WHERE file_id = ? AND version <= ? RETURNING manifest", (file_id, cutoff))]
    ids = [cid for m in manifests for cid in ch.manifest_ids(m)]
    freed = sum(len(m) for m in manifests) + drop_refs(conn, ids)
    return freed, cutoff + 1
