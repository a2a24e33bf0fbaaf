"""`aios status -v`: one line per manager, from what `kernel.status(details=True)` gathered.

Every manager answers the standard `status` op with its figures and a
"summary" line it writes itself (`Manager.status_figures`/`status_line`, next
to the manager's code), so nothing here knows one service from another: what
an operator needs at a glance (is the prefix cache hitting, how full is
memory, are tools isolated) is each manager's to say; `--json -v` has every
counter. `mb` is the one number format those lines share.
"""
from __future__ import annotations

from typing import Any

MB = 1024 * 1024


def mb(n: float | None) -> str:
    """Bytes as megabytes with one decimal: `mb(3 * MB) == "3.0 MB"`."""
    return f"{(n or 0) / MB:.1f} MB"


def detail_lines(details: dict[str, dict[str, Any]]) -> list[str]:
    """`name: summary` for each manager that answered (or its error)."""
    out = []
    for name, d in details.items():
        if "error" in d:
            out.append(f"{name}: (no answer: {d['error']})")
        elif isinstance(d.get("summary"), str):
            out.append(f"{name}: {d['summary']}")
        else:  # a manager without the standard op's summary: show its figures rather than fail the command
            out.append(f"{name}: {d}")
    return out
