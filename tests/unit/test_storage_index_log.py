"""The storage engine's index log (index_log.py), on a real SQLite file: writes log
their full-text index changes in their own transaction, and the log is applied in batches, by
searches first (read your writes), by `flush_index`, at close, and when it grows past its bound."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from aios.bench.storage_direct import make_text
from aios.managers.storage import StorageEngine
from aios.managers.storage import index_log
from aios.managers.storage import textindex as TI


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "storage.sqlite3"


def logged(e: StorageEngine) -> int:
    return e._writer.conn.execute("SELECT count(*) FROM index_log").fetchone()[0]


def indexed_text(e: StorageEngine, agent: str, path: str) -> str:
    """The text files_fts holds for a file, its blocks joined in order."""
    conn = e._writer.conn
    file_id = conn.execute("SELECT f.id FROM files AS f JOIN agents AS a ON a.id = f.agent_id "
                           "WHERE a.name = ? AND f.path = ?", (agent, path)).fetchone()[0]
    base = file_id << TI.BLOCK_SHIFT
    rows = conn.execute("SELECT body FROM files_fts WHERE rowid >= ? AND rowid < ? ORDER BY rowid",
                        (base, base + TI.MAX_BLOCKS)).fetchall()
    return "".join(body for (body,) in rows)


def test_writes_log_their_index_changes_and_a_search_applies_them_first(db: Path) -> None:
    with StorageEngine(db) as e:
        e.write("a", "notes.md", b"the quarterly plan")
        e.write("a", "notes.md", b"the revised plan")
        e.write("a", "other.md", b"nothing to see")
        assert logged(e) == 4 and e.index_pending == 4  # an insert; a remove and an insert; an insert
        hits = e.search("a", "plan")
        assert [(h.path, h.version) for h in hits] == [("notes.md", 2)]
        assert e.search("a", "quarterly") == []
        assert logged(e) == 0 and e.index_pending == 0
        assert e.activity()["index_flushes"] == 1
        assert e.integrity_check() == "ok"


def test_a_file_changed_many_times_before_a_flush_is_indexed_once_as_it_is_now(db: Path) -> None:
    rng = random.Random(4)
    big = make_text(rng, 40_000)  # several blocks
    with StorageEngine(db) as e:
        e.write("a", "f", b"first words")
        e.write("a", "f", big)
        e.write("a", "f", b" appended words", append=True)
        e.delete("a", "f")
        e.rollback("a", "f", 3)  # back to the big text + the append
        e.write("a", "gone", b"short lived")
        e.delete("a", "gone", purge=True)
        e.write("a", "f", b" and more", append=True)
        assert e.flush_index() > 0 and logged(e) == 0
        assert indexed_text(e, "a", "f") == (big + b" appended words and more").decode()
        assert e.search("a", "short lived") == []
        assert e.integrity_check() == "ok"


def test_an_append_after_a_write_in_the_same_batch_indexes_both(db: Path) -> None:
    """The append reads the file's last indexed block: the write before it in the same batch has
    only queued its index change, so the append brings that row up to date first (the old text
    has the new one's length, so a stale row would pass the append's own consistency check)."""
    with StorageEngine(db) as e:
        e.write("a", "log.txt", b"olden line\n")
        e.flush_index()
        batch = [e.submit(e.write_fn("a", "log.txt", b"alpha line\n")),
                 e.submit(e.write_fn("a", "log.txt", b"beta entry\n", append=True)),
                 e.submit(e.write_fn("a", "other.txt", b"gamma"))]
        e.wait(batch)
        assert [p.outcome().version for p in batch] == [2, 3, 1]
        e.flush_index()
        assert indexed_text(e, "a", "log.txt") == "alpha line\nbeta entry\n"
        assert [h.path for h in e.search("a", "alpha beta")] == ["log.txt"]
        assert e.search("a", "olden") == []
        assert e.integrity_check() == "ok"


def test_a_failed_operation_logs_nothing_and_the_others_are_indexed(db: Path) -> None:
    with StorageEngine(db) as e:
        e.write("a", "dir/inside.md", b"under dir")
        batch = [e.submit(e.write_fn("a", "first.md", b"first kept")),
                 e.submit(e.write_fn("a", "dir", b"a file where a directory is")),
                 e.submit(e.write_fn("a", "last.md", b"last kept"))]
        e.wait(batch)
        assert batch[1].error is not None
        rows = e._writer.conn.execute("SELECT body FROM index_log ORDER BY seq").fetchall()
        assert [b for (b,) in rows] == ["under dir", "first kept", "last kept"]
        assert {h.path for h in e.search("a", "kept")} == {"first.md", "last.md"}
        assert e.search("a", "directory") == []


def test_the_log_is_bounded_when_nobody_flushes(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_log, "INDEX_LOG_MAX", 10)
    with StorageEngine(db) as e:
        for i in range(40):
            e.write("a", f"n{i % 3}", f"note {i}".encode())
            assert logged(e) < 10 + 2
        assert e.integrity_check() == "ok"
        assert indexed_text(e, "a", "n0") == "note 39"


def test_changes_logged_after_a_flush_in_the_same_batch_still_count(db: Path) -> None:
    """A flush and writes after it commit together: the writes' changes are still waiting after it."""
    with StorageEngine(db) as e:
        e.write("a", "before.md", b"logged before")
        batch = [e.submit(e._tx_flush_index), e.submit(e.write_fn("a", "after.md", b"logged after"))]
        e.wait(batch)
        assert batch[0].outcome() == 1
        assert logged(e) == 1 and e.index_pending == 1
        assert e.flush_index() == 1 and logged(e) == 0 and e.index_pending == 0
