"""Names inside an agent's namespace: the exact rules, in one place.

A file path is a string such as ``notes/today.md``. `file_path` accepts it
only if, after Unicode NFC normalization (so "café" typed with a combining
accent and with a precomposed "é" name the same file):

- it is a `str` (not bytes, not None);
- it is relative: it does not start with "/";
- it is made of components separated by single "/" characters: no empty
  component (no "//", no leading or trailing "/"), no "." or ".." component;
- no component starts or ends with white space (so "notes " cannot pose as
  "notes");
- it contains no backslash (refused, not translated: a "\\" is a separator
  on some systems and a character on others, so it has no single meaning);
- it contains no control or invisible formatting character: Unicode
  categories Cc (NUL, C0 and C1 controls, DEL), Cf (bidi overrides,
  zero-width characters), Cs (lone surrogates), Zl and Zp (line and
  paragraph separators);
- each component is at most 255 bytes and the whole path at most 1024
  bytes, counted in UTF-8.

Anything else raises StorageError(INVALID_ARGUMENT) with a message naming the
rule. Paths are case-sensitive ("A.md" and "a.md" are two files). The path
is only ever used as a key under the caller's agent, never as a filesystem
path, so these rules exist to make one file have one spelling and to keep
names readable, not to stop directory traversal on a disk: confinement is
structural (every query is keyed by the agent), and these rules make sure
no spelling can even look like an escape.

A directory prefix (for listing) follows the same rules, except that it may
be empty (the root) and may end with one "/".
"""
from __future__ import annotations

import unicodedata

from aios.agent_names import agent_name_problem

from .errors import invalid as _invalid

MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 1024
MAX_OWNER_BYTES = 64
MAX_KEY_BYTES = 1024
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _show(text: str, limit: int = 80) -> str:
    shown = text if len(text) <= limit else text[:limit] + "..."
    return repr(shown)


def _utf8_len(text: str, what: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise _invalid(f"{what} {_show(text)} is not valid Unicode (it holds a lone surrogate)") from None


def file_path(path: object, what: str = "path") -> str:
    """The canonical spelling of a file path, or StorageError(INVALID_ARGUMENT) saying which rule it breaks."""
    if not isinstance(path, str):
        raise _invalid(f"{what} must be a string, not {type(path).__name__}")
    if path == "":
        raise _invalid(f"{what} is empty")
    if path.isascii():
        # NFC leaves ASCII alone, and its only forbidden characters are the controls, which are
        # exactly its non-printable ones: the common case costs two C-level scans
        total = len(path)
        bad = None if path.isprintable() else next(ch for ch in path if not ch.isprintable())
    else:
        _utf8_len(path, what)  # before normalizing: a lone surrogate cannot be normalized
        path = unicodedata.normalize("NFC", path)
        total = _utf8_len(path, what)
        bad = next((ch for ch in path if unicodedata.category(ch) in _FORBIDDEN_CATEGORIES), None)
    if bad is not None:
        raise _invalid(f"{what} {_show(path)} contains the control or formatting character "
                       f"U+{ord(bad):04X}; names may not hold NUL, control or invisible characters")
    if total > MAX_PATH_BYTES:
        raise _invalid(f"{what} is {total} bytes in UTF-8; the limit is {MAX_PATH_BYTES}")
    if path.startswith("/"):
        raise _invalid(f"{what} {_show(path)} is absolute; paths are relative to the agent's namespace "
                       "(write 'notes/a.md', not '/notes/a.md')")
    if "\\" in path:
        raise _invalid(f"{what} {_show(path)} contains a backslash; the separator is '/'")
    if path.endswith("/"):
        raise _invalid(f"{what} {_show(path)} ends with '/': that names a directory, not a file")
    for part in path.split("/"):
        if part == "":
            raise _invalid(f"{what} {_show(path)} has an empty component ('//')")
        if part in (".", ".."):
            raise _invalid(f"{what} {_show(path)} has a {part!r} component; '.' and '..' are not allowed")
        if part != part.strip():
            raise _invalid(f"{what} {_show(path)}: component {_show(part)} starts or ends with white space")
        size = len(part.encode("utf-8"))
        if size > MAX_COMPONENT_BYTES:
            raise _invalid(f"{what} {_show(path)}: component {_show(part, 40)} is {size} bytes in UTF-8; "
                           f"the limit is {MAX_COMPONENT_BYTES}")
    return path


def dir_prefix(prefix: object, what: str = "prefix") -> str:
    """The canonical spelling of a directory ("" for the root, else without a trailing '/')."""
    if not isinstance(prefix, str):
        raise _invalid(f"{what} must be a string, not {type(prefix).__name__}")
    if prefix in ("", "/"):
        if prefix == "/":
            raise _invalid(f"{what} '/' is absolute; the root of the namespace is ''")
        return ""
    if prefix.endswith("/") and not prefix.endswith("//"):
        prefix = prefix[:-1]
    return file_path(prefix, what)


def parents(path: str) -> list[str]:
    """The directories above a canonical path: 'a/b/c' -> ['a', 'a/b']."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def subtree_bounds(directory: str) -> tuple[str, str | None]:
    """[low, high) such that low <= p < high holds exactly for paths p under `directory`
    (high is None for the root: no upper bound).

    '/' is U+002F and '0' is U+0030, its successor, and SQLite compares TEXT
    with BINARY collation in UTF-8 byte order, which is code point order.
    """
    if directory == "":
        return "", None
    return directory + "/", directory + "0"


def name(value: object, what: str, limit: int) -> str:
    """An agent, owner or record key: a non-empty string without NUL, at most `limit` UTF-8 bytes."""
    if not isinstance(value, str):
        raise _invalid(f"{what} must be a string, not {type(value).__name__}")
    if value == "":
        raise _invalid(f"{what} is empty")
    if "\x00" in value:
        raise _invalid(f"{what} {_show(value)} contains a NUL character")
    size = _utf8_len(value, what)
    if size > limit:
        raise _invalid(f"{what} is {size} bytes in UTF-8; the limit is {limit}")
    return value


def agent_name(agent: object) -> str:
    """An agent's name, by the kernel's one agent-name rule (the scheduler applies the same to every request)."""
    problem = agent_name_problem(agent)
    if problem is not None:
        raise _invalid(problem)
    return agent  # type: ignore[return-value]  # a str: agent_name_problem said so
