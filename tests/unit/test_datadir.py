"""The data-directory rules (aios/datadir.py) and what the tool manager hides because of them."""
from __future__ import annotations

from pathlib import Path

import pytest

from aios import datadir


def test_the_data_directory_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AIOS_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert datadir.data_dir() == tmp_path / "home" / ".local" / "share" / "aios"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert datadir.data_dir() == tmp_path / "xdg" / "aios"
    monkeypatch.setenv("AIOS_DATA_DIR", str(tmp_path / "aios-data"))
    assert datadir.data_dir() == tmp_path / "aios-data"
    assert datadir.default_database_path() == tmp_path / "aios-data" / "storage.sqlite3"


def test_a_configured_database_path_wins_and_expands_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AIOS_DATA_DIR", str(tmp_path / "data"))
    assert datadir.database_path(None) == tmp_path / "data" / "storage.sqlite3"
    assert datadir.database_path("") == tmp_path / "data" / "storage.sqlite3"
    assert datadir.database_path("/srv/aios/db.sqlite3") == Path("/srv/aios/db.sqlite3")
    assert datadir.database_path("~/db.sqlite3") == tmp_path / "db.sqlite3"


def test_private_paths_cover_the_configured_database_its_companions_and_folder(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AIOS_DATA_DIR", str(tmp_path / "data"))
    hidden = datadir.storage_private_paths("/srv/aios/db.sqlite3")
    assert set(hidden) == {tmp_path / "data", Path("/srv/aios"), Path("/srv/aios/db.sqlite3"),
                           Path("/srv/aios/db.sqlite3-wal"), Path("/srv/aios/db.sqlite3-shm"),
                           Path("/srv/aios/db.sqlite3-journal")}
    # the default database: its folder is the data directory
    assert set(datadir.storage_private_paths(None)) >= {tmp_path / "data", tmp_path / "data" / "storage.sqlite3",
                                                         tmp_path / "data" / "storage.sqlite3-wal"}
    # a relative path is made absolute here, as the storage manager (same working directory) opens it
    monkeypatch.chdir(tmp_path)
    assert tmp_path / "rel" / "db.sqlite3-shm" in datadir.storage_private_paths("rel/db.sqlite3")


def test_the_filesystem_root_is_never_hidden_only_the_files_in_it(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("AIOS_DATA_DIR", str(tmp_path / "data"))
    hidden = datadir.storage_private_paths("/db.sqlite3")
    assert Path("/") not in hidden
    assert {Path("/db.sqlite3"), Path("/db.sqlite3-wal"), Path("/db.sqlite3-shm")} <= set(hidden)
