"""Memory entry ids, made by whoever creates the entry.

The SDK makes one for each `memory.add` and sends it, so the add names its
entry before it runs: if the memory manager dies under it, the kernel may run
it again, and the second run finds the entry the first one stored instead of
adding a copy. The memory manager makes one for an add that brings none.
A leaf module (standard library only): the SDK and the memory manager share
it without depending on each other.
"""
from __future__ import annotations

import re
import secrets
import time

__all__ = ["ENTRY_ID", "new_entry_id"]

#: what an entry id may be: 1 to 64 letters, digits, '-' and '_' (ids made here have 25)
ENTRY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def new_entry_id() -> str:
    """An entry id that is unguessable (84 random bits) and sorts by creation time (its first 11
    characters are the milliseconds since 1970 in hex), so storage, which pages records by key,
    lists an agent's entries oldest first. 25 characters."""
    return f"{int(time.time() * 1000):011x}" + secrets.token_urlsafe(12)[:14]
