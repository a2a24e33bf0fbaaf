"""Turning an agent's search text into a safe FTS5 MATCH expression.

User text is never passed to FTS5 as syntax. It is read with a small grammar
of its own and every word is re-emitted as a quoted FTS5 string, so no input
can inject operators, column filters or parentheses (which could otherwise
widen a search beyond the agent's scope: `scope:A AND x) OR (y` would match
other agents' rows). The grammar:

- words separated by white space; a word ending in `*` matches as a prefix
  (`sched*` finds "scheduler");
- `"several words"` in double quotes is a phrase; a phrase may also end in
  `*` after the closing quote;
- `match="all"` (the default) needs every word or phrase; `match="any"`
  needs at least one and ranks documents with more of them higher;
- words with no letter or digit (punctuation only) are ignored.

Errors (empty query, unbalanced quote, too long, too many terms, a lone `*`)
raise StorageError(INVALID_ARGUMENT).

The expression is scoped: every indexed row carries a `scope` token standing
for its agent (or owner + agent, for records), and the expression requires it
(`scope_token`).
"""
from __future__ import annotations

import hashlib

from .errors import invalid as _invalid

MAX_QUERY_CHARS = 1000
MAX_TERMS = 32
MATCH_MODES = ("all", "any")


def scope_token(*parts: str) -> str:
    """A full-text token that stands for an agent (or owner+agent): digits only, so the porter
    stemmer leaves it alone, and 64 bits of hash, so two scopes do not share one."""
    digest = hashlib.blake2b("\x00".join(parts).encode("utf-8"), digest_size=8).digest()
    return str(int.from_bytes(digest, "big")).rjust(20, "0")


def _quote(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def _searchable(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def parse_terms(query: object) -> list[tuple[str, bool]]:
    """(text, is_prefix) for each word or phrase of the query, in order."""
    if not isinstance(query, str):
        raise _invalid(f"query must be a string, not {type(query).__name__}")
    if len(query) > MAX_QUERY_CHARS:
        raise _invalid(f"query is {len(query)} characters; the limit is {MAX_QUERY_CHARS}")
    if "\x00" in query:
        raise _invalid("query contains a NUL character")
    if query.count('"') % 2:
        raise _invalid(f"query {query!r} has an unbalanced double quote; phrases look like \"two words\"")
    terms: list[tuple[str, bool]] = []
    i, n = 0, len(query)
    while i < n:
        ch = query[i]
        if ch.isspace():
            i += 1
            continue
        if ch == '"':
            end = query.index('"', i + 1)
            text, i = query[i + 1:end], end + 1
            prefix = i < n and query[i] == "*"
            if prefix:
                i += 1
        else:
            end = i
            while end < n and not query[end].isspace() and query[end] != '"':
                end += 1
            text, i = query[i:end], end
            prefix = text.endswith("*")
            if prefix:
                text = text.rstrip("*")
                if not text:
                    raise _invalid(f"query {query!r}: '*' must follow a word (as in 'sched*')")
        if _searchable(text):
            terms.append((text, prefix))
    if not terms:
        raise _invalid(f"query {query!r} has no word to search for")
    if len(terms) > MAX_TERMS:
        raise _invalid(f"query has {len(terms)} words or phrases; the limit is {MAX_TERMS}")
    return terms


def match_expression(query: object, scope: str, columns: str, match: object = "all") -> str:
    """An FTS5 MATCH expression: rows of `scope` whose `columns` hold the query's terms."""
    if match not in MATCH_MODES:
        raise _invalid(f"match must be one of {', '.join(MATCH_MODES)}, not {match!r}")
    joiner = " AND " if match == "all" else " OR "
    body = joiner.join(_quote(text) + (" *" if prefix else "") for text, prefix in parse_terms(query))
    return f"scope : {_quote(scope)} AND {columns} : ({body})"
