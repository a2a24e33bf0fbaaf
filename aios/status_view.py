"""`aios status`: its header line, and with `-v` one line per manager, from what `kernel.status` gathered.

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


def header_line(st: dict[str, Any]) -> str:
    """The first line of `aios status`, from `aios.kernel.status(...)`: where the kernel runs and,
    from the scheduler's own answer, its policy and uptime. When the scheduler did not answer, no
    call can be served, and the line says so with what the supervisor knows (its state and why),
    rather than a policy and an uptime it does not have."""
    head = f"kernel in {st['run_dir']} (supervisor pid {st['supervisor_pid']})"
    scheduler = (st.get("kernel") or {}).get("scheduler")
    if scheduler:
        return f"{head}, policy {scheduler.get('policy', '?')}, up {scheduler.get('uptime_s', 0):.0f}s"
    row = next((p for p in st.get("processes", []) if p.get("name") == "scheduler"), {})
    state, message = row.get("state") or "unknown", row.get("message") or ""
    if state == "RUNNING":
        return f"{head}; the scheduler (pid {row.get('pid')}) is not answering: no call can be served"
    if state == "STARTING":
        return f"{head}; the scheduler is starting"
    return f"{head}; the scheduler is down ({state}{': ' + message if message else ''}): no call can be served"
