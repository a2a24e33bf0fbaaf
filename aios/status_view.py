"""One line of figures per manager for `aios status -v`, from what `kernel.status(details=True)` gathered.

Kept apart from the CLI so that each manager's figures are described in one
place: what an operator needs at a glance (is the prefix cache hitting, how
full is memory, are tools isolated), not every counter (`--json -v` has those).
"""
from __future__ import annotations

from typing import Any, Callable

MB = 1024 * 1024


def _mb(n: float | None) -> str:
    return f"{(n or 0) / MB:.1f} MB"


def llm_line(d: dict[str, Any]) -> str:
    b, ctx = d.get("batching", {}), d.get("context", {})
    parts = [f"{d.get('backend')} {', '.join(d.get('models', [])[:1])}, capacity {d.get('capacity')}"]
    if "max_batch" in b:
        parts.append(f"max_batch {b['max_batch']}{' (exact)' if b.get('exact') else ''}, "
                     f"mean decode batch {b.get('mean_batch')}")
    pc = ctx.get("prefix_cache")
    if pc:
        parts.append(f"prefix cache {pc['entries']} entries, {_mb(pc['bytes'])} of {_mb(pc['budget_bytes'])}, "
                     f"{pc['hits']}/{pc['lookups']} lookups hit, {pc['tokens_reused']} tokens reused")
    parts.append(f"preempted contexts {ctx.get('in_ram', 0)} in RAM ({_mb(ctx.get('ram_bytes'))}), "
                 f"{ctx.get('on_disk', 0)} on disk")
    if d.get("embeddings"):
        parts.append("embeddings")
    return "; ".join(parts)


def memory_line(d: dict[str, Any]) -> str:
    ratio = d.get("compression_ratio")
    return (f"{d.get('mode')}, {d.get('entries_in_ram')} entries in RAM for {d.get('agents_in_ram')} agents, "
            f"{d.get('raw_bytes')} B raw stored in {d.get('stored_bytes')} B "
            f"({f'{ratio}x' if ratio else 'no entries'}), {_mb(d.get('accounted_bytes'))} of "
            f"{_mb(d.get('budget_bytes'))} budget, {d.get('evictions', 0)} evictions, {d.get('swap_ins', 0)} swap-ins")


def storage_line(d: dict[str, Any]) -> str:
    per_commit = d.get("writes_per_commit")
    return (f"{d.get('path')} ({_mb(d.get('database_bytes'))}, synchronous={d.get('synchronous')}); "
            f"{d.get('write_operations', 0)} writes in {d.get('commits', 0)} commits"
            f"{f' ({per_commit} per commit)' if per_commit else ''}, {d.get('checkpoints') or 0} checkpoints, "
            f"{d.get('index_pending') or 0} index changes pending")


def tools_line(d: dict[str, Any]) -> str:
    w = d.get("workers", {})
    isolation = "complete" if d.get("isolation_complete") else "INCOMPLETE: " + "; ".join(d.get("problems", []))
    servers = ", ".join(d.get("mcp", {})) or "none"
    active = {t: c for t, c in d.get("per_target", {}).items() if c["running"] or c["queued"]}
    in_use = ", ".join(f"{t} {c['running']}/{c['limit']} running, {c['queued']} queued" for t, c in active.items())
    return (f"isolation {isolation}; workers {w.get('warm', 0)} warm, {w.get('idle', 0)} idle, "
            f"{w.get('cold', 0)} cold starts; MCP servers: {servers}; in use: {in_use or 'none'}")


LINES: dict[str, Callable[[dict[str, Any]], str]] = {"llm": llm_line, "memory": memory_line, "storage": storage_line,
                                                    "tools": tools_line}


def detail_lines(details: dict[str, dict[str, Any]], services: dict[str, str]) -> list[str]:
    """`name: figures` for each manager that answered (or its error)."""
    out = []
    for name, d in details.items():
        if "error" in d:
            out.append(f"{name}: (no answer: {d['error']})")
            continue
        try:
            out.append(f"{name}: {LINES[services[name]](d)}")
        except (KeyError, TypeError):  # an older or unexpected shape: show it rather than fail the command
            out.append(f"{name}: {d}")
    return out
