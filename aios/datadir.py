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

