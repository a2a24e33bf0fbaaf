"""Unit tests of the storage engine's pure parts: path rules, chunking, manifests, text blocks,
query parsing and the schema migrations (no engine; real SQLite for the migrations)."""
from __future__ import annotations

import random
import sqlite3
import unicodedata

import pytest

from aios.managers.storage import StorageError
from aios.managers.storage import chunks as ch
from aios.managers.storage import paths as P
from aios.managers.storage import query as Q
from aios.managers.storage import textindex as TI
from aios.managers.storage.schema import APPLICATION_ID, MIGRATIONS, Migration, SchemaError, migrate
from aios.protocol import ErrorCode


def invalid(fn, *args, match: str | None = None) -> StorageError:
    with pytest.raises(StorageError) as info:
        fn(*args)
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    if match:
        assert match in info.value.message, info.value.message
    return info.value


# ------------------------------------------------------------------ paths
@pytest.mark.parametrize("path", ["a", "notes/today.md", "a b/c d.txt", "ünïcødé/文件.md", "x" * 255,
                                  "/".join(["d"] * 300)[:1023].rstrip("/"), "a.b.c", "...x", "x..", ".hidden"])
def test_valid_paths_are_kept(path: str) -> None:
    assert P.file_path(path) == unicodedata.normalize("NFC", path)


@pytest.mark.parametrize("path, rule", [
    ("", "empty"),
    ("/etc/passwd", "absolute"),
    ("/", "absolute"),
    ("..", "'..'"),
    ("../b", "'..'"),
    ("a/../b", "'..'"),
    ("a/..", "'..'"),
    (".", "'.'"),
    ("./a", "'.'"),
    ("a/./b", "'.'"),
    ("a//b", "empty component"),
    ("a/", "directory"),
    ("a\\b", "backslash"),
    ("..\\a", "backslash"),
    ("a\x00b", "U+0000"),
    ("a\nb", "U+000A"),
    ("a\x7fb", "U+007F"),
    ("a\u0085b", "U+0085"),
    ("a\u202eb", "U+202E"),           # right-to-left override
    ("a\u200bb", "U+200B"),           # zero-width space
    ("a\u2028b", "U+2028"),           # line separator
    ("a\ud800b", "surrogate"),
    ("x" * 256, "component"),
    ("é" * 128, "component"),         # 256 bytes in UTF-8, 128 characters
    ("/".join(["abcd"] * 206), "1024"),
    (" a", "white space"),
    ("a /b", "white space"),
])
def test_bad_paths_are_refused_naming_the_rule(path: str, rule: str) -> None:
    invalid(P.file_path, path, match=rule)


@pytest.mark.parametrize("value", [None, 3, b"a", ["a"], 1.5])
def test_paths_must_be_strings(value: object) -> None:
    invalid(P.file_path, value, match="must be a string")


def test_nfc_makes_one_spelling() -> None:
    composed, decomposed = "caf\u00e9/n\u00f6te", "cafe\u0301/no\u0308te"
    assert composed != decomposed
    assert P.file_path(composed) == P.file_path(decomposed) == composed


def test_dir_prefix_rules() -> None:
    assert P.dir_prefix("") == ""
    assert P.dir_prefix("notes") == "notes"
    assert P.dir_prefix("notes/") == "notes"
    invalid(P.dir_prefix, "/", match="absolute")
    invalid(P.dir_prefix, "notes//")
    invalid(P.dir_prefix, "../x")


def test_subtree_bounds_hold_exactly_the_subtree() -> None:
    low, high = P.subtree_bounds("a/b")
    inside = ["a/b/c", "a/b/c/d", "a/b/\u4e2d", "a/b/ "]
    outside = ["a/b", "a/bc", "a/b.txt", "a/b-", "a/c", "a/b0", "b", "a/a/z"]
    for p in inside:
        assert low <= p < high, p
    for p in outside:
        assert not (low <= p < high), p


def test_names_for_agents_owners_keys() -> None:
    assert P.agent_name("agent-1") == "agent-1"
    invalid(P.agent_name, "", match="empty")
    invalid(P.agent_name, "a\x00", match="NUL")
    invalid(P.agent_name, 5, match="string")
    # the kernel's one agent-name rule (aios.agent_names), the same the scheduler applies to requests
    for name, why in (("*", "wildcard"), ("../alice", "path separator"), ("kernel", "reserved")):
        invalid(P.agent_name, name, match=why)
    invalid(P.name, "k" * 1025, "key", P.MAX_KEY_BYTES, match="limit is 1024")


# ----------------------------------------------------------------- chunks
def test_gear_hash_equals_the_rolling_recurrence() -> None:
    data = random.Random(1).randbytes(3000)
    h = 0
    expected = []
    for byte in data:
        h = ((h << 1) + int(ch._GEAR[byte])) & 0xFFFFFFFF
        expected.append(h)
    assert [int(x) for x in ch.gear_hashes(data)] == expected


@pytest.mark.parametrize("sizes", [(256, 1024, 4096), (512, 2048, 8192)])
def test_chunks_cover_the_data_within_bounds(sizes: tuple[int, int, int]) -> None:
    chunker = ch.Chunker(*sizes)
    data = random.Random(2).randbytes(300_000)
    pieces = chunker.split(data)
    assert b"".join(pieces) == data
    assert all(len(p) <= chunker.max_size for p in pieces)
    assert all(len(p) >= chunker.min_size for p in pieces[:-1])
    mean = len(data) / len(pieces)
    assert chunker.min_size < mean < chunker.max_size
    assert chunker.split(b"") == []
    assert chunker.split(b"x") == [b"x"]


def test_chunking_a_prefix_then_the_rest_from_its_last_chunk_gives_the_same_chunks() -> None:
    """What makes appends share every earlier chunk (chunks.py)."""
    chunker = ch.Chunker()
    rng = random.Random(3)
    data = rng.randbytes(100_000)
    text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(20_000)).encode()
    for whole in (data, text, b"\x00" * 50_000):
        full = chunker.split(whole)
        for cut in (1, 300, 5_000, 33_333, len(whole) - 1):
            prefix = chunker.split(whole[:cut])
            start = sum(len(p) for p in prefix[:-1])
            assert prefix[:-1] + chunker.split(whole[start:]) == full


def test_an_edit_in_the_middle_changes_few_chunks() -> None:
    chunker = ch.Chunker()
    data = bytearray(random.Random(4).randbytes(200_000))
    before = set(chunker.split(bytes(data)))
    data[100_000:100_010] = b"0123456789"
    after = chunker.split(bytes(data))
    changed = [p for p in after if p not in before]
    assert 1 <= len(changed) <= 3


def test_chunker_validates_sizes() -> None:
    for bad in ((16, 1024, 4096), (256, 1000, 4096), (256, 1024, 1024)):
        with pytest.raises(ValueError):
            ch.Chunker(*bad)


def test_chunk_encoding_round_trips_and_compresses_text() -> None:
    text = b"the scheduler runs the agent " * 40
    c = ch.encode(text)
    assert c.codec == ch.CODEC_ZLIB and len(c.data) < len(text) // 4
    assert ch.decode(c.codec, c.data, c.size) == text
    noise = random.Random(5).randbytes(1000)
    n = ch.encode(noise)
    assert n.codec == ch.CODEC_RAW and n.data == noise
    with pytest.raises(ValueError):
        ch.decode(c.codec, c.data, c.size + 1)
    assert ch.chunk_hash(text) == c.hash and len(c.hash) == ch.HASH_BYTES


def test_manifests_round_trip() -> None:
    for ids in ([], [7], [1, 2], list(range(100, 1100)), [5, 3, 9, 3, 10**12]):
        blob = ch.pack_manifest(ids)
        assert ch.read_manifest(blob) == ids
        assert ch.manifest_ids(blob) == ids
    assert len(ch.pack_manifest(list(range(1000)))) < 1500
    for data in (b"", b"x", b"hello " * 100):
        blob = ch.pack_inline(data)
        assert ch.read_manifest(blob) == data
        assert ch.manifest_ids(blob) == []
    with pytest.raises(ValueError):
        ch.pack_inline(b"x" * (ch.INLINE_MAX + 1))


# ------------------------------------------------------------- text index
def test_text_validity_rules() -> None:
    assert TI.valid_text(b"plain") == b"plain"
    assert TI.valid_text("h\u00e9".encode()) == "h\u00e9".encode()
    assert TI.valid_text("ab\u20ac".encode()[:-1]) == b"ab"  # cut inside the last character: left out
    assert TI.valid_text(b"\xff\xfe text") is None
    assert TI.valid_text(b"a\x00b") is None
    assert TI.valid_text(b"a\xe2\x82b") is None  # broken in the middle: not text


def test_blocks_are_stable_under_appends() -> None:
    rng = random.Random(6)
    words = ["alpha", "beta", "gamma", "\u00e9t\u00e9", "\u4e2d\u6587", "delta\n"]
    text = " ".join(rng.choice(words) for _ in range(40_000)).encode()
    blocks = TI.split_blocks(text)
    assert b"".join(b for _, b in blocks) == text
    assert all(TI.BLOCK_MIN <= len(b) <= TI.BLOCK_MAX for _, b in blocks[:-1])
    for _, b in blocks:
        b.decode("utf-8")  # never cut inside a character
    for cut in (1000, 50_000, 123_457):
        prefix = TI.split_blocks(text[:cut])
        tail = prefix[-1][0]
        again = prefix[:-1] + [(tail + off, b) for off, b in TI.split_blocks(text[tail:])]
        assert again == blocks


def test_index_plans() -> None:
    binary = TI.plan_full(b"\x00\x01", 2, 1000)
    assert (binary.indexed, binary.blocks, binary.index_bytes) == (TI.BINARY, [""], 0)
    text = TI.plan_full(b"hello world", 11, 1000)
    assert (text.indexed, text.blocks, text.index_bytes) == (TI.TEXT, ["hello world"], 11)
    capped = TI.plan_full(b"hello world", 11, 5)
    assert (capped.indexed, capped.blocks, capped.index_bytes) == (TI.TEXT_PREFIX, ["hello"], 5)
    appended = TI.plan_append(b"world and more", 6, 3, 20, 1000)
    assert (appended.first_block, appended.blocks, appended.tail, appended.index_bytes) == (3, ["world and more"], 6, 20)


# ------------------------------------------------------------------ query
def test_query_terms() -> None:
    assert Q.parse_terms("sched* memory") == [("sched", True), ("memory", False)]
    assert Q.parse_terms('"two words" three') == [("two words", False), ("three", False)]
    assert Q.parse_terms('"pre fix"*') == [("pre fix", True)]
    assert Q.parse_terms("a !!! b") == [("a", False), ("b", False)]
    for bad, rule in (("", "no word"), ("   ", "no word"), ("!!!", "no word"), ('"open', "unbalanced"),
                      ("*", "'*'"), ("x" * 1001, "limit"), (" ".join(["w"] * 33), "limit"), (5, "string")):
        invalid(Q.parse_terms, bad, match=rule)


def test_query_text_cannot_escape_its_quotes() -> None:
    expr = Q.match_expression('x") OR ("y  scope:1 NEAR(a b) {path}:z', "123", "{path body}")
    assert expr.startswith('scope : "123" AND {path body} : (')
    # every user word or phrase is one quoted FTS5 string: operators in it are just words
    body = expr.split(": (", 1)[1][:-1]
    assert body == '"x" AND ") OR (" AND "y" AND "scope:1" AND "NEAR(a" AND "b)" AND "{path}:z"'
    invalid(Q.match_expression, "x", "1", "{path body}", "some", match="match must be")


# ------------------------------------------------------------- migrations
def _conn(path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def test_migrations_apply_in_order_and_only_once(tmp_path) -> None:
    conn = _conn(tmp_path / "db")
    assert migrate(conn) == [m.version for m in MIGRATIONS]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert migrate(conn) == []
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"agents", "files", "versions", "chunks", "chunk_data", "files_fts", "records", "records_fts",
            "index_log"} <= tables


def test_an_older_database_is_upgraded_with_the_missing_steps(tmp_path) -> None:
    conn = _conn(tmp_path / "db")
    assert migrate(conn, MIGRATIONS[:1]) == [1]
    conn.execute("INSERT INTO agents(name, scope) VALUES ('a', '1')")
    assert migrate(conn) == list(range(2, len(MIGRATIONS) + 1))
    assert conn.execute("SELECT name FROM agents").fetchall() == [("a",)]
    n = len(MIGRATIONS) + 1
    extra = Migration(n, "test: a new column", lambda c: c.execute("ALTER TABLE files ADD COLUMN note TEXT"))
    assert migrate(conn, (*MIGRATIONS, extra)) == [n]
    assert "note" in [r[1] for r in conn.execute("PRAGMA table_info(files)")]


def test_a_failing_step_changes_nothing(tmp_path) -> None:
    conn = _conn(tmp_path / "db")
    migrate(conn)

    def broken(c: sqlite3.Connection) -> None:
        c.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError):
        migrate(conn, (*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "broken", broken)))
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half_done'").fetchone()[0] == 0


def test_newer_or_foreign_databases_are_refused(tmp_path) -> None:
    conn = _conn(tmp_path / "new")
    migrate(conn)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(SchemaError, match="newer"):
        migrate(conn)
    other = _conn(tmp_path / "other")
    other.execute("CREATE TABLE mine (x)")
    with pytest.raises(SchemaError, match="other application"):
        migrate(other)
    app = _conn(tmp_path / "app")
    app.execute("PRAGMA application_id = 1234")
    with pytest.raises(SchemaError, match="not an AIOS storage database"):
        migrate(app)
