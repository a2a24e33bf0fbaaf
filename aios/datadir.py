"""The data directory: where what outlives a kernel run is kept (the storage database).

Not the run directory (aios/rundir.py), which is per kernel run. The rules,
in one place because two managers need them: the storage manager opens the
database here, and the tool manager hides it from sandboxed tool workers
(agents reach their files through the storage service only, never by reading
the database).

- data directory: $AIOS_DATA_DIR, else $XDG_DATA_HOME/aios, else
  ~/.local/share/aios;
- the database: `[storage] path` when configured, else storage.sqlite3 in the
  data directory.
"""
from __future__ import annotations

import os
from pathlib import Path

DATABASE_NAME = "storage.sqlite3"
#: the files SQLite keeps beside a database while it is in use (WAL mode: -wal and -shm; -journal
#: in rollback mode), which hold its pages as well
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")


def data_dir() -> Path:
    """$AIOS_DATA_DIR, else $XDG_DATA_HOME/aios, else ~/.local/share/aios."""
    base = os.environ.get("AIOS_DATA_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_DATA_HOME")
    root = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return root / "aios"


def default_database_path() -> Path:
    """Where files live across kernel runs when `[storage] path` is not set."""
    return data_dir() / DATABASE_NAME


def database_path(configured: str | os.PathLike[str] | None) -> Path:
    """The storage database: `configured` (`[storage] path`, ~ expanded) if given, else the default."""
    return Path(configured).expanduser() if configured else default_database_path()


def database_files(database: Path) -> list[Path]:
    """The database and the companion files SQLite keeps beside it."""
    return [database, *(Path(f"{database}{suffix}") for suffix in SQLITE_COMPANIONS)]


def storage_private_paths(configured: str | os.PathLike[str] | None) -> list[Path]:
    """What no process but the storage service may read (the tool manager hides these from its
    sandboxed workers): the data directory, as always; and for the database in use
    (`configured`, else the default) its folder and, by name, the database and its companions.

    The folder, because SQLite creates and removes the companions as it runs while a worker's
    view is fixed when it starts: a hidden folder also covers files that appear later. So the
    database's folder is taken to be storage's own, as the data directory is (the engine
    creates it with mode 0700). The files by name as well, for the one folder that cannot be
    hidden (the filesystem root), and in case the folder holds a tree the worker must see (the
    jail puts such trees back, then covers the named files inside them again).
    """
    paths: list[Path] = []
    try:
        paths.append(data_dir())
    except RuntimeError:  # no home directory to place it in: nothing there to hide
        pass
    try:
        database = database_path(configured)
    except RuntimeError:  # "~" with no home directory: storage cannot open it either
        return paths
    folder = Path(os.path.abspath(database.parent))
    if folder != Path(folder.anchor):
        paths.append(folder)
    paths += [Path(os.path.abspath(p)) for p in database_files(database)]
    return paths
