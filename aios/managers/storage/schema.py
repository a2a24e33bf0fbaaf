"""The storage database's schema and its versioned migrations.

`PRAGMA user_version` holds the number of migration steps applied. Opening a
database runs the missing steps in order, each in its own transaction (SQLite
DDL is transactional, so a step either applies completely, version bump
included, or not at all). A database with a higher version than this code
knows was written by a newer AIOS and is refused rather than guessed at.
`PRAGMA application_id` marks the file as an AIOS storage database, so that
pointing `[storage] path` at some other SQLite file is refused too.

Never edit a released step: append a new one.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Callable, Sequence

#: 'AIOS' in ASCII
APPLICATION_ID = 0x41494F53

# Tokenizer for every full-text index: Unicode-aware, accents folded, English
# stemming (so "running" finds "run": agents write notes in natural language).
FTS_TOKENIZE = "porter unicode61 remove_diacritics 2"


class SchemaError(Exception):
    """The database cannot be used by this version of AIOS (too new, or not an AIOS database)."""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[sqlite3.Connection], None]


def _script(*statements: str) -> Callable[[sqlite3.Connection], None]:
    def run(conn: sqlite3.Connection) -> None:
        for sql in statements:
            conn.execute(sql)
    return run


_V1_FILES = _script(
    """CREATE TABLE agents (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        scope TEXT NOT NULL,                    -- token that scopes the agent's rows in files_fts
        file_bytes INTEGER NOT NULL DEFAULT 0,  -- stored bytes of its files: chunk data + manifests
        index_bytes INTEGER NOT NULL DEFAULT 0, -- text of its files held by files_fts
        record_bytes INTEGER NOT NULL DEFAULT 0 -- bytes of its records (all owners)
    )""",
    """CREATE TABLE files (
        id INTEGER PRIMARY KEY,
        agent_id INTEGER NOT NULL,
        path TEXT NOT NULL,                     -- canonical (see paths.py)
        head INTEGER NOT NULL,                  -- newest version number
        oldest INTEGER NOT NULL,                -- oldest version still kept
        deleted INTEGER NOT NULL,               -- 1: the newest version is a deletion
        size INTEGER NOT NULL,                  -- bytes of the newest version (0 when deleted)
        created_ns INTEGER NOT NULL,
        modified_ns INTEGER NOT NULL,
        indexed INTEGER NOT NULL,               -- files_fts holds: 0 no text (binary), 1 all text, 2 a prefix
        index_blocks INTEGER NOT NULL,          -- rows in files_fts (rowid = id << 16 | block), see textindex.py
        index_tail INTEGER NOT NULL,            -- content offset where the last block starts
        index_bytes INTEGER NOT NULL,           -- bytes of text indexed
        UNIQUE (agent_id, path)
    )""",
    """CREATE TABLE versions (
        file_id INTEGER NOT NULL,
        version INTEGER NOT NULL,
        op TEXT NOT NULL,                       -- write | append | rollback | delete
        source INTEGER,                         -- rollback: the version whose content was restored
        size INTEGER NOT NULL,
        created_ns INTEGER NOT NULL,
        manifest BLOB NOT NULL,                 -- chunk ids, see chunks.pack_manifest
        PRIMARY KEY (file_id, version)
    ) WITHOUT ROWID""",
    # Chunk metadata and chunk bytes live apart: a version bumps the reference count of every
    # chunk it uses, and with the bytes in the same rows that dirtied (and wrote to the WAL)
    # about one 4 KiB page per chunk. Measured here: an append to a 250 KB file went from
    # about 60 pages per commit to a handful.
    """CREATE TABLE chunks (
        id INTEGER PRIMARY KEY,
        agent_id INTEGER NOT NULL,
        hash BLOB NOT NULL,                     -- BLAKE2b-128 of the raw bytes
        size INTEGER NOT NULL,                  -- raw bytes
        codec INTEGER NOT NULL,                 -- 0 raw, 1 zlib
        stored INTEGER NOT NULL,                -- bytes in chunk_data
        refs INTEGER NOT NULL,                  -- occurrences in kept versions' manifests
        UNIQUE (agent_id, hash)
    )""",
    """CREATE TABLE chunk_data (
        id INTEGER PRIMARY KEY,                 -- = chunks.id
        data BLOB NOT NULL
    )""",
    # one row per text block of a file's current version (textindex.py)
    f"""CREATE VIRTUAL TABLE files_fts USING fts5(
        scope, path, body, tokenize = '{FTS_TOKENIZE}'
    )""",
)

_V2_RECORDS = _script(
    """CREATE TABLE records (
        id INTEGER PRIMARY KEY,
        owner TEXT NOT NULL,                    -- the service that keeps the record (e.g. memory)
        agent_id INTEGER NOT NULL,
        key TEXT NOT NULL,
        scope TEXT NOT NULL,                    -- token that scopes (owner, agent) in records_fts
        text TEXT NOT NULL,
        meta TEXT NOT NULL,                     -- JSON object
        size INTEGER NOT NULL,                  -- counted against the agent's quota
        updated_ns INTEGER NOT NULL,
        UNIQUE (owner, agent_id, key)
    )""",
    f"""CREATE VIRTUAL TABLE records_fts USING fts5(
        scope, text, content = 'records', content_rowid = 'id', tokenize = '{FTS_TOKENIZE}'
    )""",
    # external-content index kept in step by triggers, inside the writing transaction
    """CREATE TRIGGER records_ai AFTER INSERT ON records BEGIN
        INSERT INTO records_fts(rowid, scope, text) VALUES (new.id, new.scope, new.text);
    END""",
    """CREATE TRIGGER records_ad AFTER DELETE ON records BEGIN
        INSERT INTO records_fts(records_fts, rowid, scope, text) VALUES ('delete', old.id, old.scope, old.text);
    END""",
    """CREATE TRIGGER records_au AFTER UPDATE OF scope, text ON records BEGIN
        INSERT INTO records_fts(records_fts, rowid, scope, text) VALUES ('delete', old.id, old.scope, old.text);
        INSERT INTO records_fts(rowid, scope, text) VALUES (new.id, new.scope, new.text);
    END""",
)

# Changes to files_fts that writes made and the index has not taken in yet, oldest first
# (index_log.py): body NULL removes row `fts_rowid`, else the row is (scope, path, body).
_V3_INDEX_LOG = _script(
    """CREATE TABLE index_log (
        seq INTEGER PRIMARY KEY,
        fts_rowid INTEGER NOT NULL,
        scope TEXT,
        path TEXT,
        body TEXT
    )""",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "files: agents, files, versions, chunks, chunk_data, files_fts", _V1_FILES),
    Migration(2, "records: keyed text records per owner service and agent, records_fts", _V2_RECORDS),
    Migration(3, "index_log: full-text index changes logged by writes, applied in batches", _V3_INDEX_LOG),
)


def current_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Bring the database up to the last migration; return the versions applied.

    `conn` must be in autocommit mode (isolation_level=None). Raises
    SchemaError for a database newer than `migrations` or one that belongs to
    some other application.
    """
    for i, m in enumerate(migrations, start=1):
        if m.version != i:
            raise ValueError(f"migration versions must be 1, 2, 3, ...; step {i} says {m.version}")
    app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    version = current_version(conn)
    if app_id not in (0, APPLICATION_ID) or (app_id == 0 and version != 0):
        raise SchemaError(f"this SQLite file is not an AIOS storage database (application_id {app_id:#x}, "
                          f"user_version {version}); point [storage] path somewhere else")
    if app_id == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
        raise SchemaError("this SQLite file already holds tables of some other application; "
                          "point [storage] path at a new file")
    latest = len(migrations)
    if version > latest:
        raise SchemaError(f"the storage database is at schema version {version}, newer than this AIOS "
                          f"understands ({latest}); run a newer AIOS or use another [storage] path")
    applied = []
    for m in migrations[version:]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            m.apply(conn)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {m.version}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(m.version)
    return applied
