"""The agent-name rule: which strings may name an agent, in one place.

An agent's name is the key of everything the kernel keeps for it (its storage
namespace, its memory, its queue quota), so every part must agree on which
names exist. The scheduler's frontend applies this rule to each request
(`aios.messages.Request`: a request naming any other agent is refused with
BAD_FRAME), the SDK applies it when a client is created, and the storage
service, which keys an agent's data by its name, applies it too. Standard
library only, like `aios.messages`, which uses it.
"""
from __future__ import annotations

import unicodedata

__all__ = ["MAX_AGENT_BYTES", "RESERVED_AGENT_NAMES", "agent_name_problem", "good_agent_name"]

#: the longest agent name, in UTF-8 bytes (the storage service keys every agent's data by its name)
MAX_AGENT_BYTES = 255
#: names no agent may take: "kernel" is the kernel's own service, and the name it acts under
RESERVED_AGENT_NAMES = frozenset({"kernel"})
#: Unicode categories of control and invisible characters: C0/C1 controls and DEL (Cc), bidi
#: overrides and zero-width characters (Cf), lone surrogates (Cs), line and paragraph separators
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def agent_name_problem(name: object) -> str | None:
    """Why `name` cannot name an agent, or None if it can. The one agent-name rule of the kernel:
    the scheduler refuses a request naming another agent (BAD_FRAME), the SDK refuses to create
    such a client, and the storage service, which keys an agent's data by this name, checks the same.

    An agent name is
    - a string of 1 to MAX_AGENT_BYTES bytes in UTF-8 (so no lone surrogate);
    - without control or invisible characters (NUL, other controls, bidi overrides, zero-width
      characters, line separators), and without white space at either end: one name, one spelling;
    - without '*' (a wildcard wherever rules name agents), '/' or '\\' (path separators: agent names
      name files and directories), and not '.' or '..';
    - not reserved (RESERVED_AGENT_NAMES).
    """
    if type(name) is not str:
        return f"an agent name must be a string, not {type(name).__name__}"
    if not name:
        return "an agent name must not be empty"
    shown = repr(name if len(name) <= 80 else name[:80] + "...")
    if name.isascii():
        size = len(name)
        bad = None if name.isprintable() else next(ch for ch in name if not ch.isprintable())
    else:
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError:
            return f"agent name {shown} is not valid Unicode text (it holds a lone surrogate)"
        bad = next((ch for ch in name if unicodedata.category(ch) in _INVISIBLE), None)
    if size > MAX_AGENT_BYTES:
        return f"an agent name is at most {MAX_AGENT_BYTES} bytes in UTF-8; this one is {size}"
    if bad is not None:
        return (f"agent name {shown} holds the control or invisible character U+{ord(bad):04X}; agent names "
                "may not hold NUL, control or invisible characters")
    if name != name.strip():
        return f"agent name {shown} starts or ends with white space"
    for ch, why in (("*", "a wildcard"), ("/", "a path separator"), ("\\", "a path separator")):
        if ch in name:
            return f"agent name {shown} holds {ch!r}, {why}; agent names may not"
    if name in (".", ".."):
        return f"{shown} is not an agent name ('.' and '..' name directories)"
    if name in RESERVED_AGENT_NAMES:
        return f"agent name {shown} is reserved for the kernel itself"
    return None


#: names already found good: the scheduler checks each request's agent, and a set lookup costs
#: a fraction of the check (cleared when full, so a flood of names cannot grow it)
_GOOD: set[str] = set()
_GOOD_MAX = 4096


def good_agent_name(name: str) -> bool:
    """`agent_name_problem(name) is None`, remembered for names seen before (the scheduler's hot path)."""
    if name in _GOOD:
        return True
    if agent_name_problem(name) is not None:
        return False
    if len(_GOOD) >= _GOOD_MAX:
        _GOOD.clear()
    _GOOD.add(name)
    return True
