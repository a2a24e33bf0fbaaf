"""What the full-text index holds for a file: its text, in blocks that appends leave alone.

A file's current content is indexed if it is text: UTF-8 without NUL bytes,
where an incomplete character at the very end is allowed (left out of the
index until an append completes it: a writer may split a character across two
appends). Only the first `max_index_bytes` are indexed. Binary files get one
empty block, so that their path can still be found.

The text is cut into blocks of BLOCK_MIN..BLOCK_MAX bytes, at the last newline
(else space, else character boundary) before BLOCK_MAX, each one row of
files_fts with rowid `file_id << 16 | block number`. Where a block ends
depends only on the bytes from its start (like content-defined chunks), so an
append re-indexes just the last block and what follows: measured here, an
append to a 450 KB text file took about 12 ms with the whole document
re-tokenized (FTS5 also re-tokenizes a row to delete it) and well under 1 ms
with blocks. The price: in `match="all"` mode the words must occur in one
block (within ~8-16 KiB of each other) for a file larger than a block; files
up to BLOCK_MIN bytes are always a single block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

BLOCK_MAX = 16 * 1024
BLOCK_MIN = BLOCK_MAX // 2
BLOCK_SHIFT = 16  # rowid = file_id << 16 | block
MAX_BLOCKS = 1 << BLOCK_SHIFT

# files.indexed
BINARY, TEXT, TEXT_PREFIX = 0, 1, 2


@dataclass
class IndexPlan:
    """Index rows to (re)write: blocks `first_block`.. get `blocks`; every later old block goes.

    `tail` is the content offset where the last block starts; `index_bytes` is the indexed
    text's length in bytes (what is charged to the agent)."""

    indexed: int
    first_block: int
    blocks: list[str] = field(default_factory=list)
    tail: int = 0
    index_bytes: int = 0

    @property
    def block_count(self) -> int:
        return self.first_block + len(self.blocks)


def valid_text(region: bytes) -> bytes | None:
    """`region` without an incomplete last character, if it is UTF-8 text without NUL; else None."""
    try:
        region.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason != "unexpected end of data" or exc.start < len(region) - 3:
            return None
        region = region[:exc.start]
        try:
            region.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if b"\x00" in region:
        return None
    return region


def split_blocks(text: bytes) -> list[tuple[int, bytes]]:
    """(offset, bytes) of each block of valid UTF-8 `text`; always at least one (maybe empty)."""
    out: list[tuple[int, bytes]] = []
    start, n = 0, len(text)
    while n - start > BLOCK_MAX:
        window = text[start + BLOCK_MIN:start + BLOCK_MAX]
        i = window.rfind(b"\n")
        if i < 0:
            i = window.rfind(b" ")
        if i >= 0:
            cut = start + BLOCK_MIN + i + 1
        else:
            cut = start + BLOCK_MAX
            while text[cut] & 0xC0 == 0x80:  # never inside a character
                cut -= 1
        out.append((start, text[start:cut]))
        start = cut
    out.append((start, text[start:]))
    return out


def _blocks(region: bytes, base: int, first_block: int, indexed: int) -> IndexPlan:
    blocks = split_blocks(region)
    if first_block + len(blocks) > MAX_BLOCKS:
        raise ValueError("too many index blocks: lower max_index_bytes")
    return IndexPlan(indexed=indexed, first_block=first_block, blocks=[b.decode("utf-8") for _, b in blocks],
                     tail=base + blocks[-1][0], index_bytes=base + len(region))


def _binary() -> IndexPlan:
    return IndexPlan(indexed=BINARY, first_block=0, blocks=[""], tail=0, index_bytes=0)


def plan_full(prefix: bytes, size: int, cap: int) -> IndexPlan:
    """The index of a file of `size` bytes whose content starts with `prefix` (at least `cap` bytes of it)."""
    region = valid_text(prefix[:cap])
    if region is None:
        return _binary()
    return _blocks(region, 0, 0, TEXT_PREFIX if size > cap else TEXT)


def plan_append(region: bytes, tail: int, tail_block: int, new_size: int, cap: int) -> IndexPlan:
    """The index after an append to a TEXT file: `region` is content[tail:min(new_size, cap)],
    from the start of the old last block (number `tail_block`) on."""
    text = valid_text(region)
    if text is None:
        return _binary()
    return _blocks(text, tail, tail_block, TEXT_PREFIX if new_size > cap else TEXT)
