"""The storage benchmark helpers run the workload they describe (figures are not asserted)."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from aios.bench import storage_direct as S


def _check_summary(summary: dict, count: int) -> None:
    assert summary["count"] == count
    assert summary["ops_per_s"] > 0
    assert 0 < summary["p50_us"] <= summary["p99_us"] <= summary["max_us"]


def test_run_direct_does_versioned_indexed_writes_reads_and_searches(tmp_path: Path) -> None:
    db = tmp_path / "direct.sqlite3"
    out = S.run_direct(120, n_reads=50, n_searches=7, agents=2, files=10, versions_kept=4, path=db)
    _check_summary(out["write"], 120)
    _check_summary(out["read"], 50)
    _check_summary(out["search"], 7)
    assert out["settings"]["journal_mode"] == "WAL" and out["settings"]["synchronous"] == "NORMAL"
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT count(*) FROM files").fetchone()[0] == 20        # 2 agents x 10 files
    assert conn.execute("SELECT max(version) FROM files").fetchone()[0] == 6     # 120 writes / 20 files
    assert conn.execute("SELECT count(*) FROM versions").fetchone()[0] == 20 * 4  # versions_kept
    assert conn.execute("SELECT count(*) FROM files_fts").fetchone()[0] == 20
    word = S.SEARCH_WORDS[0]
    assert conn.execute("SELECT count(*) FROM files_fts WHERE files_fts MATCH ?", (word,)).fetchone()[0] > 0
    conn.close()


def test_run_engine_with_threads(tmp_path: Path) -> None:
    out = S.run_engine(96, threads=4, n_reads=40, n_searches=5, agents=2, files=6)
    _check_summary(out["write"], 96)
    _check_summary(out["read"], 40)
    _check_summary(out["search"], 5)
    assert out["integrity"] == "ok"
    assert out["write"]["writes_per_commit"] >= 1.0
    single = S.run_engine(20, threads=2, group_commit=False, n_reads=5, n_searches=1)
    assert single["write"]["writes_per_commit"] == 1.0


def test_measure_compression_reports_raw_and_stored() -> None:
    out = S.measure_compression(appends=20, append_bytes=500)
    assert out["final_bytes"] == 20 * 500
    assert out["raw_bytes"] == sum(500 * i for i in range(1, 21))
    assert 0 < out["stored_bytes"] < out["raw_bytes"]
    assert out["raw_over_stored"] == round(out["raw_bytes"] / out["stored_bytes"], 1)


@pytest.mark.bench
@pytest.mark.timeout(120)
def test_compare_command_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert S.main(["--ops", "40", "--threads", "3", "--rounds", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"settings", "direct", "engine_1_thread", "engine_3_threads_group_commit",
                        "engine_3_threads_commit_per_write"}
    assert out["engine_1_thread"]["write"]["vs_direct"] > 0
