"""The kernel's structural rules, checked on the source (issue 16's "must hold"):
- `aios/messages.py` is the only module that reads a wire header map;
- the `aios` package has no import cycles (lazy imports inside functions count);
- no manager package imports from another manager's package."""
from __future__ import annotations

import re
import sys

import pytest

from tests.support.imports import PACKAGE, cycles, graph, modules

#: reading a header map: `header.get(`, `header[`, `msg.header.get(`, or aliasing one (`h = msg.header`)
HEADER_READ = re.compile(r"\b(\w*_)?header\s*(\.get\(|\[)|\.header\s*(\.get\(|\[)|=\s*[\w.]+\.header\s*$")
MESSAGES = PACKAGE / "messages.py"


def header_reads(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if HEADER_READ.search(line.split("#")[0])]


@pytest.mark.parametrize("line", ['rid = msg.header.get("id")', 'h = msg.header', 'kind = header["kind"]',
                                  'if exc.header.get("id"):', 'raw_header[b"x"]'])
def test_the_header_rule_catches_reads(line: str) -> None:
    assert header_reads(line) == [line]


@pytest.mark.parametrize("line", ["typed = messages.parse(msg.header, messages.FROM_AGENT)",
                                  'hits = [h["score"] for h in r["hits"]]', "header = messages.Call(id='')"])
def test_the_header_rule_passes_other_code(line: str) -> None:
    assert header_reads(line) == []


def test_only_messages_py_reads_a_wire_header() -> None:
    offenders = {str(p.relative_to(PACKAGE.parent)): found for p in PACKAGE.rglob("*.py")
                 if p != MESSAGES and (found := header_reads(p.read_text()))}
    assert offenders == {}, "read headers through aios.messages (typed messages) instead"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_has_no_import_cycles() -> None:
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 5000))
    assert cycles(graph()) == []


def test_no_manager_package_imports_another() -> None:
    g = graph()
    managers = {m.split(".")[2] for m in modules() if m.startswith("aios.managers.") and m.count(".") >= 3}
    crossings = sorted(f"{mod} -> {dep}" for mod, deps in g.items() for dep in deps
                       if mod.startswith("aios.managers.") and mod.count(".") >= 3
                       and dep.startswith("aios.managers.") and dep.count(".") >= 3
                       and mod.split(".")[2] != dep.split(".")[2] and {mod.split(".")[2], dep.split(".")[2]} <= managers)
    assert crossings == []
