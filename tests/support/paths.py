"""Where things are: the repository, its two commands, and this support folder.

Tests run the commands through `sys.executable` with the repository as the working
directory, so they exercise the checkout under test, not an installed copy.
"""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AIOS_START = REPO / "bin" / "aios-start"
AIOS = REPO / "bin" / "aios"
SUPPORT = REPO / "tests" / "support"
