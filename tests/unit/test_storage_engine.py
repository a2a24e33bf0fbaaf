"""The storage engine against real SQLite files: files, versions, search, limits, isolation,
records, migrations on open, group commit and thread safety. (Crash safety with a killed
child process is in test_storage_crash.py.)"""
from __future__ import annotations

import random
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from aios.bench.storage_direct import make_text
from aios.managers.storage import MiB, StorageEngine, StorageError, StorageOpenError
from aios.managers.storage import chunks as ch
from aios.managers.storage.schema import MIGRATIONS
from aios.protocol import ErrorCode
from tests.support.waiting import wait_until


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "storage.sqlite3"


@pytest.fixture
def engine(db: Path):
    e = StorageEngine(db, versions_kept=5, max_file_bytes=1 * MiB, max_agent_bytes=4 * MiB)
    yield e
    e.close()


def fails(code: ErrorCode, fn: Callable[..., Any], *args: Any, match: str | None = None, **kwargs: Any) -> StorageError:
    with pytest.raises(StorageError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value.message
    if match is not None:
        assert match in info.value.message, info.value.message
    return info.value


def snapshot(engine: StorageEngine, agents: tuple[str, ...] = ("a", "b")) -> dict[str, Any]:
    """Everything an agent can observe, to check that a failed call changed nothing."""
    out: dict[str, Any] = {"stats": engine.stats()}
    for volatile in ("commits", "write_operations", "database_bytes", "checkpoints"):
        out["stats"].pop(volatile)
    for agent in agents:
        files = engine.list(agent, include_deleted=True)
        out[agent] = {
            "files": files,
            "history": {f.path: engine.history(agent, f.path) for f in files},
            "content": {f.path: engine.read(agent, f.path)[0] for f in files if not f.deleted},
            "stats": engine.stats(agent),
            "records": engine.record_list("memory", agent),
        }
    return out


# ------------------------------------------------------------------ basics
def test_write_read_stat_and_versions(engine: StorageEngine) -> None:
    info = engine.write("a", "notes/today.md", b"first")
    assert (info.path, info.size, info.version, info.versions, info.kind) == ("notes/today.md", 5, 1, 1, "file")
    info2 = engine.write("a", "notes/today.md", b"second!")
    assert (info2.version, info2.versions, info2.size) == (2, 2, 7)
    data, rinfo = engine.read("a", "notes/today.md")
    assert data == b"second!" and rinfo.version == 2
    assert engine.read("a", "notes/today.md", version=1)[0] == b"first"
    st = engine.stat("a", "notes/today.md")
    assert (st.version, st.size, st.oldest_version, st.deleted) == (2, 7, 1, False)
    assert st.created <= st.modified
    assert engine.stat("a", "notes").kind == "dir"
    assert [(v.version, v.op, v.size, v.current) for v in engine.history("a", "notes/today.md")] == [
        (2, "write", 7, True), (1, "write", 5, False)]


def test_files_survive_closing_and_reopening(db: Path) -> None:
    big = make_text(random.Random(1), 50_000)
    with StorageEngine(db) as e:
        e.write("a", "small", b"kept")
        e.write("a", "big.txt", big)
        e.write("a", "big.txt", b" and more", append=True)
        e.record_put("memory", "a", "k", "remembered", {"n": 1})
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0
    with StorageEngine(db) as e:
        assert e.read("a", "small")[0] == b"kept"
        assert e.read("a", "big.txt")[0] == big + b" and more"
        assert e.read("a", "big.txt", version=1)[0] == big
        assert e.record_get("memory", "a", "k").text == "remembered"
        assert e.integrity_check() == "ok"


def test_database_files_are_private(db: Path) -> None:
    with StorageEngine(db) as e:
        e.write("a", "x", b"1")
        assert db.stat().st_mode & 0o777 == 0o600
        assert db.parent.stat().st_mode & 0o777 == 0o700
        assert Path(f"{db}-wal").stat().st_mode & 0o777 == 0o600


def test_empty_and_binary_files(engine: StorageEngine) -> None:
    engine.write("a", "empty", b"")
    assert engine.read("a", "empty")[0] == b""
    engine.write("a", "empty", b"now text", append=True)
    assert engine.read("a", "empty")[0] == b"now text"
    blob = bytes(range(256)) * 40
    engine.write("a", "blob.bin", blob)
    assert engine.read("a", "blob.bin")[0] == blob
    engine.write("a", "blob.bin", b"\x00\xff", append=True)
    assert engine.read("a", "blob.bin")[0] == blob + b"\x00\xff"
    assert [h.path for h in engine.search("a", "blob")] == ["blob.bin"]  # found by its path only


def test_appends_of_every_size_read_back_exactly(engine: StorageEngine) -> None:
    rng = random.Random(2)
    content = b""
    for i in range(40):
        piece = rng.randbytes(rng.choice([1, 3, 100, 900, 1500, 5000, 20000])) if i % 3 else make_text(rng, 700)
        info = engine.write("a", "grow", piece, append=True)
        content += piece
        assert info.size == len(content)
        assert engine.read("a", "grow")[0] == content
    assert engine.integrity_check() == "ok"


# ----------------------------------------------------------- versions
def test_versions_kept_is_enforced_and_old_versions_go(engine: StorageEngine) -> None:
    for i in range(1, 9):
        engine.write("a", "f", f"v{i}".encode())
    st = engine.stat("a", "f")
    assert (st.version, st.versions, st.oldest_version) == (8, 5, 4)
    assert [v.version for v in engine.history("a", "f")] == [8, 7, 6, 5, 4]
    assert engine.read("a", "f", version=4)[0] == b"v4"
    fails(ErrorCode.NOT_FOUND, engine.read, "a", "f", version=3, match="4..8")
    fails(ErrorCode.NOT_FOUND, engine.read, "a", "f", version=9)
    fails(ErrorCode.NOT_FOUND, engine.rollback, "a", "f", 2)


def test_rollback_makes_a_new_version_with_the_exact_old_content(engine: StorageEngine) -> None:
    old = make_text(random.Random(3), 30_000)
    engine.write("a", "doc", old)
    engine.write("a", "doc", b"replaced")
    engine.write("a", "doc", b" more", append=True)
    chunks_before = engine.stats("a")["chunk_bytes"]
    info = engine.rollback("a", "doc", 1)
    assert engine.stats("a")["chunk_bytes"] == chunks_before  # the old chunks are shared, not copied
    assert (info.version, info.size) == (4, len(old))
    assert engine.read("a", "doc")[0] == old
    top = engine.history("a", "doc")[0]
    assert (top.op, top.source, top.current) == ("rollback", 1, True)
    assert engine.rollback("a", "doc", 3).version == 5
    assert engine.read("a", "doc")[0] == b"replaced more"
    assert engine.integrity_check() == "ok"


def test_delete_keeps_history_until_purged(engine: StorageEngine) -> None:
    engine.write("a", "notes/x.md", b"precious words")
    engine.write("a", "notes/x.md", b"more precious words")
    d = engine.delete("a", "notes/x.md")
    assert (d.version, d.purged) == (3, False)
    fails(ErrorCode.NOT_FOUND, engine.read, "a", "notes/x.md", match="deleted")
    fails(ErrorCode.NOT_FOUND, engine.stat, "a", "notes/x.md", match="deleted")
    fails(ErrorCode.NOT_FOUND, engine.delete, "a", "notes/x.md", match="already deleted")
    assert engine.list("a") == []
    assert engine.search("a", "precious") == []
    listed = engine.list("a", include_deleted=True)
    assert [(f.path, f.deleted) for f in listed] == [("notes/x.md", True)]
    assert engine.read("a", "notes/x.md", version=1)[0] == b"precious words"
    assert [v.op for v in engine.history("a", "notes/x.md")] == ["delete", "write", "write"]
    fails(ErrorCode.INVALID_ARGUMENT, engine.rollback, "a", "notes/x.md", 3, match="deletion")
    restored = engine.rollback("a", "notes/x.md", 2)
    assert (restored.version, restored.deleted) == (4, False)
    assert engine.read("a", "notes/x.md")[0] == b"more precious words"
    assert [h.path for h in engine.search("a", "precious")] == ["notes/x.md"]
    used = engine.stats("a")["used_bytes"]
    purged = engine.delete("a", "notes/x.md", purge=True)
    assert purged.purged and purged.version is None and purged.freed_bytes == used
    assert engine.stats("a")["used_bytes"] == 0
    fails(ErrorCode.NOT_FOUND, engine.history, "a", "notes/x.md")
    assert engine.list("a", include_deleted=True) == []
    engine.write("a", "notes/x.md", b"new life")
    assert engine.stat("a", "notes/x.md").version == 1
    assert engine.integrity_check() == "ok"


def test_with_one_version_kept_a_delete_purges(db: Path) -> None:
    with StorageEngine(db, versions_kept=1) as e:
        e.write("a", "f", b"one")
        e.write("a", "f", b"two")
        assert [v.version for v in e.history("a", "f")] == [2]
        d = e.delete("a", "f")
        assert d.purged
        assert e.list("a", include_deleted=True) == []
        assert e.stats("a")["used_bytes"] == 0
        assert e.integrity_check() == "ok"


# ----------------------------------------------------------- compression
def test_hundred_appends_cost_a_small_multiple_of_the_final_file(db: Path) -> None:
    rng = random.Random(7)
    with StorageEngine(db, versions_kept=100, max_file_bytes=16 * MiB, max_agent_bytes=64 * MiB) as e:
        for _ in range(100):
            e.write("a", "log.txt", make_text(rng, 1000), append=True)
        s = e.stats("a")
        final = s["current_bytes"]
        assert s["versions"] == 100
        assert s["raw_bytes"] == sum(1000 * i for i in range(1, 101))  # 100 whole copies would be 5 MB
        assert s["stored_bytes"] < 1.5 * final, s
        assert s["compression_ratio"] > 30, s
        # every version reads back
        content = e.read("a", "log.txt")[0]
        for v in (1, 50, 99):
            assert e.read("a", "log.txt", version=v)[0] == content[:1000 * v]


def test_an_append_shares_every_chunk_but_the_last(engine: StorageEngine) -> None:
    rng = random.Random(8)
    engine.write("a", "log", make_text(rng, 100_000))
    engine.write("a", "log", make_text(rng, 3_000), append=True)
    conn = engine._writer.conn
    m1, m2 = (ch.read_manifest(m) for (m,) in conn.execute("SELECT manifest FROM versions ORDER BY version"))
    assert isinstance(m1, list) and isinstance(m2, list)
    assert m2[:len(m1) - 1] == m1[:-1]
    # and appending in pieces stores exactly what writing the whole would
    whole = engine.read("a", "log")[0]
    engine.write("a", "copy", whole)
    m3 = ch.read_manifest(conn.execute("SELECT manifest FROM versions WHERE version = 1 AND file_id = "
                                       "(SELECT id FROM files WHERE path = 'copy')").fetchone()[0])
    assert m3 == m2  # same chunks, deduplicated


def test_identical_content_is_stored_once_per_agent(engine: StorageEngine) -> None:
    data = make_text(random.Random(9), 200_000)
    engine.write("a", "one", data)
    stored = engine.stats("a")["stored_bytes"]
    engine.write("a", "two", data)
    assert engine.stats("a")["stored_bytes"] - stored < 200  # only a manifest
    engine.write("b", "one", data)
    assert engine.stats("b")["chunk_bytes"] == engine.stats("a")["chunk_bytes"]  # not shared across agents


# ----------------------------------------------------------- listing
def test_listing(engine: StorageEngine) -> None:
    for p in ("a.md", "notes/x.md", "notes/y.md", "notes/deep/z.md", "notesX", "notes0", "z/last"):
        engine.write("a", p, p.encode())
    assert [f.path for f in engine.list("a")] == ["a.md", "notes/deep/z.md", "notes/x.md", "notes/y.md",
                                                  "notes0", "notesX", "z/last"]
    assert [f.path for f in engine.list("a", "notes")] == ["notes/deep/z.md", "notes/x.md", "notes/y.md"]
    assert [f.path for f in engine.list("a", "notes/")] == ["notes/deep/z.md", "notes/x.md", "notes/y.md"]
    top = engine.list("a", recursive=False)
    assert [(f.path, f.kind) for f in top] == [("a.md", "file"), ("notes", "dir"), ("notes0", "file"),
                                               ("notesX", "file"), ("z", "dir")]
    assert [(f.path, f.kind) for f in engine.list("a", "notes", recursive=False)] == [
        ("notes/deep", "dir"), ("notes/x.md", "file"), ("notes/y.md", "file")]
    assert [f.path for f in engine.list("a", "notes/x.md")] == ["notes/x.md"]
    assert engine.list("a", "nothing") == []
    page1 = engine.list("a", limit=3)
    page2 = engine.list("a", after=page1[-1].path, limit=3)
    page3 = engine.list("a", after=page2[-1].path, limit=3)
    assert [f.path for f in page1 + page2 + page3] == [f.path for f in engine.list("a")]
    assert [f.path for f in engine.list("a", recursive=False, after="notes")] == ["notes0", "notesX", "z"]
    assert engine.list("nobody") == []


def test_a_file_and_a_directory_cannot_share_a_name(engine: StorageEngine) -> None:
    engine.write("a", "notes/x.md", b"1")
    fails(ErrorCode.INVALID_ARGUMENT, engine.write, "a", "notes", b"2", match="is a directory")
    fails(ErrorCode.INVALID_ARGUMENT, engine.write, "a", "notes/x.md/y", b"3", match="is a file")
    fails(ErrorCode.INVALID_ARGUMENT, engine.write, "a", "notes/x.md/y", b"3", append=True, match="is a file")
    fails(ErrorCode.NOT_FOUND, engine.read, "a", "notes", match="is a directory")
    engine.delete("a", "notes/x.md")
    engine.write("a", "notes", b"now a file")  # the directory is gone (its file deleted)
    fails(ErrorCode.INVALID_ARGUMENT, engine.rollback, "a", "notes/x.md", 1, match="is a file")


# ----------------------------------------------------------- search
def test_search_ranks_and_marks_hits(engine: StorageEngine) -> None:
    engine.write("a", "sched.md", b"The scheduler orders the queue. The scheduler is fair. Scheduling policies.")
    engine.write("a", "mem.md", b"Memory manager notes; the scheduler is mentioned once.")
    engine.write("a", "other.md", b"Nothing relevant here at all.")
    hits = engine.search("a", "scheduler")
    assert [h.path for h in hits] == ["sched.md", "mem.md"]
    assert hits[0].score > hits[1].score > 0
    assert "[scheduler]" in hits[0].snippet.lower() or "[Scheduler]" in hits[0].snippet
    assert all(h.version == 1 for h in hits)
    assert [h.path for h in engine.search("a", "sched*")] == ["sched.md", "mem.md"]
    assert [h.path for h in engine.search("a", "memory scheduler")] == ["mem.md"]
    assert {h.path for h in engine.search("a", "memory relevant", match="any")} == {"mem.md", "other.md"}
    assert [h.path for h in engine.search("a", '"scheduler is fair"')] == ["sched.md"]
    assert [h.path for h in engine.search("a", "policy")] == ["sched.md"]  # stemmed: policies
    assert [h.path for h in engine.search("a", "other")] == ["other.md"]  # by path
    assert len(engine.search("a", "scheduler", limit=1)) == 1


def test_search_follows_writes_appends_rollbacks_and_deletes(engine: StorageEngine) -> None:
    engine.write("a", "f", b"alpha")
    engine.write("a", "f", b"beta")
    assert engine.search("a", "alpha") == [] and len(engine.search("a", "beta")) == 1
    engine.write("a", "f", b" gamma", append=True)
    assert engine.search("a", "beta gamma")[0].version == 3
    engine.rollback("a", "f", 1)
    assert len(engine.search("a", "alpha")) == 1 and engine.search("a", "gamma") == []
    engine.delete("a", "f")
    assert engine.search("a", "alpha") == []


def test_search_in_a_large_appended_file(engine: StorageEngine) -> None:
    rng = random.Random(10)
    engine.write("a", "log", make_text(rng, 60_000))
    for i in range(30):
        engine.write("a", "log", make_text(rng, 2_000) + f" marker{i} ".encode(), append=True)
    for i in (0, 17, 29):
        hits = engine.search("a", f"marker{i}")
        assert [h.path for h in hits] == ["log"] and f"[marker{i}]" in hits[0].snippet
    assert len(engine.search("a", "agent", limit=10)) == 1  # many blocks match, one hit per file
    assert engine.integrity_check() == "ok"


def test_a_character_split_across_appends_is_indexed_once_complete(engine: StorageEngine) -> None:
    word = "caf\u00e9t\u00e9ria".encode()
    engine.write("a", "f", b"start " + word[:4], append=True)  # ends inside the two bytes of e-acute
    engine.write("a", "f", word[4:] + b" end", append=True)
    assert engine.read("a", "f")[0].decode() == "start caf\u00e9t\u00e9ria end"
    assert [h.path for h in engine.search("a", "cafeteria")] == ["f"]  # accents folded


def test_text_beyond_the_index_cap_is_not_indexed(db: Path) -> None:
    with StorageEngine(db, max_index_bytes=1000) as e:
        e.write("a", "f", b"early " * 200 + b"late words here")  # 1215 bytes
        assert len(e.search("a", "early")) == 1 and e.search("a", "late") == []
        e.write("a", "f", b" appended", append=True)
        assert e.search("a", "appended") == []
        assert e.stats("a")["index_bytes"] == 1000


@pytest.mark.parametrize("query", ['"unbalanced', "", "   ", "*", "!!!", "x" * 2000])
def test_bad_search_queries_are_invalid_arguments(engine: StorageEngine, query: str) -> None:
    engine.write("a", "f", b"text")
    fails(ErrorCode.INVALID_ARGUMENT, engine.search, "a", query)


def test_fts_syntax_in_queries_is_only_text(engine: StorageEngine) -> None:
    engine.write("a", "mine", b"alpha beta")
    engine.write("b", "theirs", b"secret gamma OR NEAR AND")
    for q in ('alpha") OR ("gamma', "gamma OR alpha", 'scope:* OR secret', "NEAR(secret gamma)", "{path body}:secret",
              "secret*", '"secret" OR "alpha"'):
        assert all(h.path == "mine" for h in engine.search("a", q)), q
        assert all(h.path == "mine" for h in engine.search("a", q, match="any")), q


# ----------------------------------------------------------- limits
def test_file_size_limit(db: Path) -> None:
    with StorageEngine(db, max_file_bytes=10_000, max_agent_bytes=1 * MiB) as e:
        e.write("a", "f", b"x" * 10_000)
        err = fails(ErrorCode.TOO_LARGE, e.write, "a", "g", b"x" * 10_001)
        assert "10000" in err.message and "[storage] max_file_mb" in err.message
        before = snapshot(e)
        err = fails(ErrorCode.TOO_LARGE, e.write, "a", "f", b"y", append=True)
        assert "10001" in err.message and "[storage] max_file_mb" in err.message
        err = fails(ErrorCode.TOO_LARGE, e.record_put, "memory", "a", "k", "x" * 10_000)
        assert "[storage] max_file_mb" in err.message
        assert snapshot(e) == before


def test_agent_quota(db: Path) -> None:
    quota = 200_000
    with StorageEngine(db, max_file_bytes=1 * MiB, max_agent_bytes=quota, versions_kept=3) as e:
        rng = random.Random(11)
        e.write("a", "f1", rng.randbytes(120_000))  # random bytes: incompressible
        before = snapshot(e)
        err = fails(ErrorCode.QUOTA_EXCEEDED, e.write, "a", "f2", rng.randbytes(100_000))
        assert f"quota of {quota} bytes" in err.message and "[storage] quota_mb" in err.message
        fails(ErrorCode.QUOTA_EXCEEDED, e.write, "a", "f1", rng.randbytes(100_000), append=True)
        fails(ErrorCode.QUOTA_EXCEEDED, e.record_put, "memory", "a", "k", "x" * 90_000)
        assert snapshot(e) == before
        e.write("b", "f2", rng.randbytes(100_000))  # another agent has its own quota
        e.delete("a", "f1")                         # history kept: still counted
        fails(ErrorCode.QUOTA_EXCEEDED, e.write, "a", "f2", rng.randbytes(100_000))
        e.delete("a", "f1", purge=True)
        e.write("a", "f2", rng.randbytes(100_000))
        assert e.stats("a")["used_bytes"] <= quota
        assert e.integrity_check() == "ok"


def test_quota_counts_indexed_text_so_compressible_files_cannot_bypass_it(db: Path) -> None:
    with StorageEngine(db, max_file_bytes=1 * MiB, max_agent_bytes=300_000) as e:
        e.write("a", "f0", b"a " * 100_000)  # compresses to almost nothing, but 200 KB of indexed text
        s = e.stats("a")
        assert s["stored_bytes"] < 5_000 and s["index_bytes"] == 200_000
        fails(ErrorCode.QUOTA_EXCEEDED, e.write, "a", "f1", b"b " * 100_000)


# ----------------------------------------------------------- isolation
SPELLINGS = [
    "secret.txt", "./secret.txt", "../a/secret.txt", "/secret.txt", "a/secret.txt", "../secret.txt",
    "x/../secret.txt", "x/../../a/secret.txt", "secret.txt/", "secret.txt/.", "//secret.txt", "..\\a\\secret.txt",
    "\\secret.txt", "secret.txt\x00", "secret.txt\x00.md", "%2e%2e/a/secret.txt", "..%2fa%2fsecret.txt",
    "\u2025/a/secret.txt", "\uff0e\uff0e/a/secret.txt", "SECRET.TXT", "secret.txt ", "sec\u200bret.txt",
    "a\\..\\secret.txt", "~a/secret.txt", "../../../../../../a/secret.txt",
]


def test_agent_b_cannot_reach_agent_a_by_any_spelling(engine: StorageEngine) -> None:
    engine.write("a", "secret.txt", b"the launch code is zebra")
    engine.write("a", "dir/inner.txt", b"zebra inner")
    engine.record_put("memory", "a", "secret.txt", "zebra record", {})
    before = engine.read("a", "secret.txt")
    for path in SPELLINGS:
        for call in (lambda: engine.read("b", path), lambda: engine.stat("b", path),
                     lambda: engine.history("b", path), lambda: engine.delete("b", path),
                     lambda: engine.delete("b", path, purge=True), lambda: engine.rollback("b", path, 1)):
            with pytest.raises(StorageError) as info:
                call()
            assert info.value.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.NOT_FOUND), (path, info.value)
            assert "zebra" not in info.value.message
        try:
            listed = engine.list("b", path)
        except StorageError as exc:
            assert exc.code == ErrorCode.INVALID_ARGUMENT
        else:
            assert listed == []
    assert engine.list("b") == [] and engine.list("b", recursive=False) == []
    assert engine.search("b", "zebra") == [] and engine.search("b", "zebra", match="any") == []
    assert engine.search("b", "secret") == []
    assert engine.record_get("memory", "b", "secret.txt") is None
    assert engine.record_search("memory", "b", "zebra", 5) == []
    assert engine.record_delete("memory", "b", "secret.txt") is False
    # b writing the same names makes b's own files; a's stay as they were
    engine.write("b", "secret.txt", b"b's own")
    engine.write("b", "secret.txt", b" appended", append=True)
    engine.delete("b", "secret.txt", purge=True)
    assert engine.read("a", "secret.txt") == before
    assert {h.path for h in engine.search("a", "zebra")} == {"dir/inner.txt", "secret.txt"}
    assert engine.stats("b")["files"] == 0


def test_unicode_spellings_of_one_name_are_one_file(engine: StorageEngine) -> None:
    composed, decomposed = "caf\u00e9/r\u00e9sum\u00e9.md", "cafe\u0301/re\u0301sume\u0301.md"
    engine.write("a", decomposed, b"one")
    engine.write("a", composed, b"two")
    assert [f.path for f in engine.list("a")] == [composed]
    assert engine.read("a", decomposed)[0] == b"two"
    assert engine.stat("a", decomposed).version == 2


def test_agent_names_are_namespaces_not_paths(engine: StorageEngine) -> None:
    engine.write("a", "f", b"a's")
    for other in ("a/", "a/..", "A", "a\u0000", "", "../a", "a "):
        try:
            assert engine.list(other) == []
            fails(ErrorCode.NOT_FOUND, engine.read, other, "f")
        except StorageError as exc:
            assert exc.code == ErrorCode.INVALID_ARGUMENT


# ----------------------------------------------------------- bad input
def test_bad_input_is_refused_and_changes_nothing(engine: StorageEngine) -> None:
    engine.write("a", "f", b"content")
    engine.write("a", "f", b"content 2")
    engine.record_put("memory", "a", "k", "text", {"x": 1})
    before = snapshot(engine)
    bad: list[tuple[ErrorCode, Callable[[], Any]]] = [
        (ErrorCode.NOT_FOUND, lambda: engine.read("a", "missing")),
        (ErrorCode.NOT_FOUND, lambda: engine.read("a", "f", version=99)),
        (ErrorCode.NOT_FOUND, lambda: engine.rollback("a", "f", 99)),
        (ErrorCode.NOT_FOUND, lambda: engine.rollback("a", "missing", 1)),
        (ErrorCode.NOT_FOUND, lambda: engine.delete("a", "missing")),
        (ErrorCode.NOT_FOUND, lambda: engine.history("a", "missing")),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.write("a", "f", "a str")),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.write("a", "f", None)),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.write("a", "f", [1, 2])),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.write("a", 5, b"x")),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.write(None, "f", b"x")),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.write("a", "f", b"x", append="yes")),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.read("a", "f", version="1")),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.read("a", "f", version=0)),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.read("a", "f", version=True)),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.rollback("a", "f", 1.0)),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.list("a", limit=0)),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.list("a", limit=10**9)),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.list("a", after=3)),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.search("a", "x", limit=-1)),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.search("a", 42)),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.delete("a", "f", purge="yes")),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.write("a", "../f", b"x")),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.write("a", "/f", b"x")),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.write("a", "f\x00", b"x")),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.write("a", "d/" + "x" * 300, b"x")),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.record_put("memory", "a", "k", b"bytes", {})),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.record_put("memory", "a", "k", "t", {"b": b"bytes"})),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.record_put("memory", "a", "k", "t", {"n": float("nan")})),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.record_put("memory", "a", "k", "t", ["not", "a", "map"])),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.record_put("", "a", "k", "t", {})),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.record_put("memory", "a", "", "t", {})),
        (ErrorCode.INVALID_ARGUMENT, lambda: engine.record_search("memory", "a", '"x', 5)),
    ]
    for code, call in bad:
        with pytest.raises(StorageError) as info:
            call()
        assert info.value.code == code, (info.value.code, info.value.message)
        assert info.value.message
    assert snapshot(engine) == before
    assert engine.integrity_check() == "ok"


def test_a_closed_engine_is_unavailable(db: Path) -> None:
    e = StorageEngine(db)
    e.write("a", "f", b"x")
    e.close()
    e.close()  # twice is fine
    fails(ErrorCode.UNAVAILABLE, e.write, "a", "f", b"y")
    fails(ErrorCode.UNAVAILABLE, e.read, "a", "f")


def test_engine_settings_are_validated(db: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        StorageEngine(db, synchronous="OFF")
    for bad in ({"versions_kept": 0}, {"max_file_bytes": "big"}, {"max_agent_bytes": True},
                {"max_index_bytes": 1 << 40}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            StorageEngine(db, **bad)


# ----------------------------------------------------------- opening
def test_an_older_database_is_upgraded_on_open(db: Path) -> None:
    with StorageEngine(db) as e:
        e.write("a", "kept.md", b"from before the upgrade")
    conn = sqlite3.connect(db, isolation_level=None)
    for name in ("records_ai", "records_ad", "records_au"):
        conn.execute(f"DROP TRIGGER {name}")
    conn.execute("DROP TABLE records_fts")
    conn.execute("DROP TABLE records")
    assert conn.execute("SELECT count(*) FROM index_log").fetchone()[0] == 0  # closing applied it
    conn.execute("DROP TABLE index_log")
    conn.execute("PRAGMA user_version = 1")  # as written by a version with only the first step
    conn.close()
    with StorageEngine(db) as e:
        assert e.read("a", "kept.md")[0] == b"from before the upgrade"
        assert [h.path for h in e.search("a", "upgrade")] == ["kept.md"]
        e.record_put("memory", "a", "k", "records work after the upgrade", {})
        assert [h.key for h in e.record_search("memory", "a", "upgrade", 5)] == ["k"]
        assert e.integrity_check() == "ok"
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    conn.close()


def test_newer_or_foreign_files_are_refused_on_open(tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    StorageEngine(newer).close()
    conn = sqlite3.connect(newer)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StorageOpenError, match="newer"):
        StorageEngine(newer)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StorageOpenError, match="junk.db"):
        StorageEngine(junk)
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(StorageOpenError, match="other application"):
        StorageEngine(foreign)


def test_integrity_check_finds_damage(engine: StorageEngine) -> None:
    engine.write("a", "big", make_text(random.Random(12), 20_000))
    engine.write("a", "small", b"tiny")
    assert engine.integrity_check() == "ok"
    conn = engine._writer.conn
    conn.execute("UPDATE chunks SET refs = refs + 1 WHERE id = (SELECT min(id) FROM chunks)")
    conn.execute("UPDATE agents SET file_bytes = file_bytes + 7")
    report = engine.integrity_check()
    assert "refs is" in report and "file_bytes" in report


def test_a_corrupt_chunk_is_reported_not_returned(engine: StorageEngine) -> None:
    engine.write("a", "big", make_text(random.Random(13), 20_000))
    conn = engine._writer.conn
    raw = b"not what was stored" * 10
    conn.execute("UPDATE chunks SET codec = 0, size = ?, stored = ? WHERE id = (SELECT min(id) FROM chunks)",
                 (len(raw), len(raw)))
    conn.execute("UPDATE chunk_data SET data = ? WHERE id = (SELECT min(id) FROM chunks)", (raw,))
    fails(ErrorCode.INTERNAL, engine.read, "a", "big", match="corrupt")


# ----------------------------------------------------------- records
def test_records(engine: StorageEngine) -> None:
    assert engine.record_get("memory", "a", "k1") is None
    engine.record_put("memory", "a", "k1", "the agent prefers short answers", {"tier": "cold", "n": 3})
    engine.record_put("memory", "a", "k2", "scheduler notes for later", {})
    engine.record_put("memory", "a", "k0", "unrelated", None)
    r = engine.record_get("memory", "a", "k1")
    assert (r.key, r.text, r.meta) == ("k1", "the agent prefers short answers", {"tier": "cold", "n": 3})
    assert r.size == len("k1") + len(r.text) + len('{"tier":"cold","n":3}')
    assert [x.key for x in engine.record_list("memory", "a")] == ["k0", "k1", "k2"]
    assert [x.key for x in engine.record_list("memory", "a", after="k0", limit=1)] == ["k1"]
    hits = engine.record_search("memory", "a", "answers", 5)
    assert [h.key for h in hits] == ["k1"] and "[answers]" in hits[0].snippet and hits[0].score > 0
    engine.record_put("memory", "a", "k1", "now about the scheduler", {"tier": "warm"})
    assert [h.key for h in engine.record_search("memory", "a", "scheduler", 5)] in (["k1", "k2"], ["k2", "k1"])
    assert engine.record_search("memory", "a", "answers", 5) == []
    assert engine.record_stats("memory", "a") == {"records": 3, "bytes": sum(
        x.size for x in engine.record_list("memory", "a"))}
    assert engine.stats("a")["record_bytes"] == engine.record_stats("memory", "a")["bytes"]
    assert engine.record_delete("memory", "a", "k1") is True
    assert engine.record_delete("memory", "a", "k1") is False
    assert engine.record_search("memory", "a", "now", 5) == []
    assert engine.integrity_check() == "ok"


def test_records_are_scoped_by_owner_and_agent(engine: StorageEngine) -> None:
    engine.record_put("memory", "a", "k", "alpha text", {})
    engine.record_put("tools", "a", "k", "beta text", {})
    engine.record_put("memory", "b", "k", "gamma text", {})
    assert engine.record_get("memory", "a", "k").text == "alpha text"
    assert engine.record_get("tools", "a", "k").text == "beta text"
    assert engine.record_get("memory", "b", "k").text == "gamma text"
    assert [h.key for h in engine.record_search("memory", "a", "text", 10)] == ["k"]
    assert engine.record_search("memory", "a", "beta", 10) == []
    assert engine.record_search("memory", "a", "gamma", 10) == []
    assert engine.record_search("memory", "a", 'alpha") OR ("gamma', 10, match="any") != []
    assert all(h.key == "k" for h in engine.record_search("memory", "a", "gamma OR alpha", 10, match="any"))
    assert engine.record_get("memory", "a", "k").text == "alpha text"
    engine.record_delete("tools", "a", "k")
    assert engine.record_get("memory", "a", "k").text == "alpha text"


# ----------------------------------------------------------- concurrency
def test_many_threads_write_and_read_consistently(db: Path) -> None:
    with StorageEngine(db, versions_kept=4) as e:
        errors: list[BaseException] = []

        def worker(t: int) -> None:
            try:
                agent = f"agent-{t % 4}"
                for i in range(40):
                    data = f"thread {t} write {i} scheduler".encode()
                    info = e.write(agent, f"t{t}/f{i % 5}", data)
                    got, rinfo = e.read(agent, f"t{t}/f{i % 5}")
                    assert got == data and rinfo.version == info.version
                    e.write(agent, f"t{t}/log", f"{i}\n".encode(), append=True)
                    if i % 10 == 0:
                        e.record_put("memory", agent, f"{t}-{i}", f"record {t} {i}", {"t": t})
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert errors == []
        for t in range(16):
            agent = f"agent-{t % 4}"
            assert e.read(agent, f"t{t}/log")[0] == "".join(f"{i}\n" for i in range(40)).encode()
            assert e.stat(agent, f"t{t}/f4").version == 8
        assert e.stats()["write_operations"] == 16 * (80 + 4)
        assert e.integrity_check() == "ok"


def test_group_commit_runs_queued_writes_in_one_transaction(db: Path) -> None:
    """A write blocked inside the transaction makes the next writers queue; they then commit together."""
    with StorageEngine(db) as e:
        writer = e._writer
        gate = threading.Event()
        inside = threading.Event()

        def slow(tx: Any) -> str:
            inside.set()
            gate.wait(10)
            tx.conn.execute("INSERT INTO agents(name, scope) VALUES ('slow', '0')")
            return "slow done"

        results: dict[str, Any] = {}
        lead = threading.Thread(target=lambda: results.__setitem__("slow", writer.run(slow)))
        lead.start()
        assert inside.wait(10)
        commits = writer.commits
        followers = [threading.Thread(target=lambda i=i: results.__setitem__(i, e.write("a", f"f{i}", b"x")))
                     for i in range(5)]
        followers.append(threading.Thread(target=lambda: results.__setitem__(
            "bad", _capture(lambda: e.write("a", "f0/under-a-file", b"y")))))
        for th in followers:
            th.start()
        wait_until(lambda: len(writer._queue) == 6, message="six writers queued behind the slow one")
        gate.set()
        for th in [lead, *followers]:
            th.join(10)
        assert results["slow"] == "slow done"
        assert writer.commits == commits + 2  # the slow one, then all six queued in one transaction
        assert [results[i].version for i in range(5)] == [1] * 5
        assert isinstance(results["bad"], StorageError) and results["bad"].code == ErrorCode.INVALID_ARGUMENT
        assert [f.path for f in e.list("a")] == [f"f{i}" for i in range(5)]  # the failed one left nothing
        assert e.integrity_check() == "ok"


def test_a_batch_runs_without_savepoints_until_one_operation_fails(db: Path) -> None:
    """Savepoints cost FTS5 a segment flush each: a batch runs without them, and only when an
    operation fails is it rolled back and re-run with one savepoint per operation, so the others
    commit and the failing one changes nothing; after-commit actions run once either way."""
    with StorageEngine(db) as e:
        statements: list[str] = []
        e._writer.conn.set_trace_callback(statements.append)
        good = [e.submit(e.write_fn("a", f"ok/{i}", f"text {i}".encode())) for i in range(3)]
        e.wait(good)
        assert [p.outcome().version for p in good] == [1, 1, 1]
        assert not any("SAVEPOINT" in s for s in statements) and sum(s == "COMMIT" for s in statements) == 1

        runs: dict[str, int] = {}
        after: list[str] = []

        def op(name: str, fail: bool) -> Callable[[Any], str]:
            def fn(tx: Any) -> str:
                runs[name] = runs.get(name, 0) + 1
                tx.conn.execute("INSERT INTO agents(name, scope) VALUES (?, '0')", (name,))
                tx.after_commit(lambda: after.append(name))
                if fail:
                    raise StorageError(ErrorCode.INVALID_ARGUMENT,
                                       f"{name} fails")
                return name
            return fn

        statements.clear()
        batch = [e.submit(op("first", False)), e.submit(op("bad", True)), e.submit(op("last", False))]
        e.wait(batch)
        assert batch[0].outcome() == "first" and batch[2].outcome() == "last"
        with pytest.raises(StorageError, match="bad fails"):
            batch[1].outcome()
        assert runs == {"first": 2, "bad": 2, "last": 1}  # "last" never ran before the failure
        assert after == ["first", "last"]
        assert sum("SAVEPOINT" in s for s in statements) == 3 and sum(s == "COMMIT" for s in statements) == 1
        names = {n for (n,) in e._writer.conn.execute("SELECT name FROM agents")}
        assert {"first", "last"} <= names and "bad" not in names


def _capture(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except StorageError as exc:
        return exc


def test_commit_per_write_mode_never_batches(db: Path) -> None:
    with StorageEngine(db, group_commit=False) as e:
        threads = [threading.Thread(target=lambda t=t: [e.write("a", f"{t}/{i}", b"x") for i in range(20)])
                   for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        s = e.stats()
        assert s["commits"] == s["write_operations"] == 160


# ----------------------------------------------------------- checkpoints
def test_background_checkpoints_keep_the_wal_bounded(db: Path) -> None:
    with StorageEngine(db) as e:
        assert e._writer.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0  # none inside commits
        for i in range(3000):
            e.write(f"agent-{i % 3}", f"f{i % 40}", f"write {i} ".encode() * 20)
        wait_until(lambda: e.stats()["checkpoints"] >= 20, message="background checkpoints")
        # the log restarted: without that it would hold every page of every commit (3000 x ~12 x 4 KiB)
        assert Path(f"{db}-wal").stat().st_size < 16 * MiB
        assert e.integrity_check() == "ok"


def test_an_idle_writer_is_checkpointed(db: Path) -> None:
    with StorageEngine(db) as e:
        e.write("a", "f", b"one write")
        # idle_s after the last commit, the log is copied into the database file
        wait_until(lambda: e.stats()["checkpoints"] >= 1, timeout=30, message="an idle checkpoint")
        conn = sqlite3.connect(db)
        try:
            busy, log_frames, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            assert log_frames == done  # nothing left to copy
        finally:
            conn.close()


def test_busy_writers_cannot_starve_the_checkpointer(db: Path) -> None:
    """16 threads writing back to back: the short exclusive pass still gets its turn, so the
    writer never has to fall back to checkpointing inline."""
    with StorageEngine(db) as e:
        def worker(t: int) -> None:
            for i in range(250):
                e.write(f"agent-{t % 4}", f"t{t}/f{i % 10}", f"thread {t} write {i} ".encode() * 10)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert e._checkpointer.finishing_passes >= 1
        assert e._checkpointer.inline_checkpoints == 0
        # never restarted, the log would hold every frame written (~4000 x 12 x 4 KiB, ~190 MiB)
        assert Path(f"{db}-wal").stat().st_size < 64 * MiB
        assert e.integrity_check() == "ok"


def test_an_exclusive_turn_goes_before_queued_writers(db: Path) -> None:
    """What keeps busy writers from starving the checkpointer's short pass."""
    with StorageEngine(db) as e:
        writer = e._writer
        gate, inside = threading.Event(), threading.Event()
        order: list[str] = []

        def slow(tx: Any) -> None:
            inside.set()
            gate.wait(10)
            order.append("slow")

        def queued(tx: Any) -> None:
            order.append("write")

        threads = [threading.Thread(target=writer.run, args=(slow,))]
        threads[0].start()
        assert inside.wait(10)
        threads += [threading.Thread(target=writer.run, args=(queued,)) for _ in range(4)]
        for th in threads[1:]:
            th.start()
        wait_until(lambda: len(writer._queue) == 4, message="four writers queued")
        ex = threading.Thread(target=writer.exclusive, args=(lambda: order.append("exclusive"),))
        ex.start()
        wait_until(lambda: writer._exclusive_waiting == 1, message="the exclusive caller waiting")
        gate.set()
        for th in [*threads, ex]:
            th.join(10)
        assert order == ["slow", "exclusive", "write", "write", "write", "write"]


def test_a_full_disk_fails_writes_cleanly_and_recovers(db: Path) -> None:
    with StorageEngine(db) as e:
        e.write("a", "kept", b"small")
        conn = e._writer.conn
        conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
        before = snapshot(e)
        err = fails(ErrorCode.UNAVAILABLE, e.write, "a", "big", random.Random(14).randbytes(300_000))
        assert "disk is full" in err.message and err.code.retryable
        assert snapshot(e) == before
        conn.execute("PRAGMA max_page_count = 1073741823")
        assert e.write("a", "big", b"fits now").version == 1
        assert e.integrity_check() == "ok"


def test_a_full_disk_inside_a_batch_loses_no_acknowledged_write(db: Path) -> None:
    """Writes queued together: each one that returned is stored, each one that failed is not."""
    with StorageEngine(db) as e:
        e.write("a", "seed", b"x")
        writer, conn = e._writer, e._writer.conn
        gate, inside = threading.Event(), threading.Event()

        def block(tx: Any) -> None:
            inside.set()
            gate.wait(10)
            tx.conn.execute(f"PRAGMA max_page_count = {tx.conn.execute('PRAGMA page_count').fetchone()[0]}")

        results: dict[str, Any] = {}
        payloads = {"s1": b"tiny one", "big": random.Random(15).randbytes(400_000), "s2": b"tiny two"}
        lead = threading.Thread(target=writer.run, args=(block,))
        lead.start()
        assert inside.wait(10)
        threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, _capture(
            lambda: e.write("a", k, payloads[k])))) for k in payloads]
        for th in threads:
            th.start()
        wait_until(lambda: len(writer._queue) == 3, message="three writes queued")
        gate.set()
        for th in [lead, *threads]:
            th.join(10)
        conn.execute("PRAGMA max_page_count = 1073741823")
        assert isinstance(results["big"], StorageError)
        for name, result in results.items():
            if isinstance(result, StorageError):
                fails(ErrorCode.NOT_FOUND, e.read, "a", name)
            else:
                assert e.read("a", name)[0] == payloads[name]
        assert e.integrity_check() == "ok"


def test_lowering_the_index_cap_between_runs_is_safe(db: Path) -> None:
    rng = random.Random(16)
    with StorageEngine(db) as e:
        e.write("a", "log", make_text(rng, 60_000))
    with StorageEngine(db, max_index_bytes=1000) as e:
        e.write("a", "log", b" appended words", append=True)
        assert len(e.read("a", "log")[0]) == 60_015
        e.write("a", "log", make_text(rng, 5_000))  # a full write applies the new cap
        assert e.stats("a")["index_bytes"] == 1000
        assert e.integrity_check() == "ok"
