"""Logging with the component name in every line, so merged logs stay readable."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def setup_logging(component: str, level: str | None = None, path: Path | None = None) -> logging.Logger:
    """Log to stderr (a supervised process's stderr is its log file), or append to `path`."""
    level = level or os.environ.get("AIOS_LOG_LEVEL", "INFO")
    handler: logging.Handler = logging.FileHandler(path) if path is not None else logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s [{component}:%(process)d] %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return logging.getLogger(f"aios.{component}")
