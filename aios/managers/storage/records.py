"""The engine's records: a keyed store that other managers keep per agent (the memory manager's
entries), with full-text search over their text.

A record is a row of `records` (key, text, JSON meta) owned by a service
(`owner`) and kept for an agent; the row's text is in `records_fts` under a
scope token for owner + agent (query.py), so a search sees only that owner's
records for that agent. Its size (key + text + meta) counts against the
agent's quota like its files. See engine.py for how the engine is composed.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from typing import Any, Callable

from aios.protocol import ErrorCode

from . import paths as P
from . import query as Q
from .checks import MAX_LIST_LIMIT, MAX_SEARCH_LIMIT, SNIPPET_TOKENS, int_arg, mb, seconds
from .errors import StorageError, invalid
from .models import Record, RecordHit
from .writer import Tx, WriteFn


class RecordsMixin:
    """The record operations of `StorageEngine` (engine.py)."""

    # provided by the engine proper (engine.py)
    max_file_bytes: int
    _snapshot: Callable[[], contextlib.AbstractContextManager[sqlite3.Connection]]
    _write: Callable[[WriteFn[Any]], Any]
    _agent_id: Callable[[sqlite3.Connection, str], "tuple[int, str] | None"]
    _agent_for_write: Callable[[Tx, str], tuple[int, str]]
    _charge: Callable[..., None]

    def _record_scope(self, owner: str, agent: str) -> str:
        return Q.scope_token("records", owner, agent)

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
            raise invalid(f"text must be a string, not {type(text).__name__}")
        meta = {} if meta is None else meta
        if not isinstance(meta, dict):
            raise invalid(f"meta must be a map, not {type(meta).__name__}")
        try:
            meta_json = json.dumps(meta, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            size = len(key.encode("utf-8")) + len(text.encode("utf-8")) + len(meta_json.encode("utf-8"))
        except (TypeError, ValueError) as exc:
            raise invalid(f"record {key!r}: meta must hold only JSON values (maps with string keys, lists, "
                          f"strings, numbers, booleans, null): {exc}") from None
        if size > self.max_file_bytes:
            raise StorageError(ErrorCode.TOO_LARGE,
                               f"record {key!r} is {size} bytes (key + text + meta), over the per-record limit of "
                               f"{self.max_file_bytes} bytes ([storage] max_file_mb = {mb(self.max_file_bytes)})")
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
        return Record(key=key, text=text, meta=json.loads(meta), size=size, updated=seconds(updated_ns))

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
            raise invalid(f"after must be a string, not {type(after).__name__}")
        int_arg(limit, "limit", 1, MAX_LIST_LIMIT)
        int_arg(offset, "offset", 0, 1 << 40)
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
        """Records whose text matches `query` (see query.py), best first (score = -bm25; equal
        scores in key order, so the same data gives the same list every time); with
        `full`, each hit carries the record itself (so the caller needs no second round trip)."""
        owner = P.name(owner, "owner", P.MAX_OWNER_BYTES)
        agent = P.agent_name(agent)
        int_arg(limit, "limit", 1, MAX_SEARCH_LIMIT)
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
                    "AND r.owner = ? AND r.agent_id = ? ORDER BY records_fts.rank, r.key LIMIT ?",
                    (expr, owner, found[0], limit)).fetchall()
            except sqlite3.OperationalError as exc:
                raise invalid(f"query {query!r} cannot be searched: {exc}") from None
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
