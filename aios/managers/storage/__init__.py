"""The storage manager's engine: per-agent versioned files with full-text search, and keyed
records for other managers, in one SQLite database (see engine.py)."""
from __future__ import annotations

from aios.datadir import default_database_path

from .engine import MiB, StorageEngine
from .errors import StorageError, StorageOpenError
from .models import Deleted, FileInfo, Record, RecordHit, SearchHit, VersionInfo

__all__ = ["MiB", "StorageEngine", "StorageError", "StorageOpenError", "default_database_path", "Deleted",
           "FileInfo", "Record", "RecordHit", "SearchHit", "VersionInfo"]
