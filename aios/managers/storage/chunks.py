"""Content-defined chunking (FastCDC-style), chunk compression, version manifests.

Why chunks: every write keeps a version, so 100 versions of a file that grows
by appends would cost 100 copies if each version were stored whole. Instead a
version is a manifest (a list of chunk ids) and each distinct chunk is stored
once per agent (by hash, with a reference count). Boundaries are chosen by the
content, not by offsets, so an edit or an append changes only the chunks it
touches.

The boundary rule (a gear rolling hash with FastCDC's normalized chunking):

- `h[i] = sum(GEAR[data[i-k]] << k for k in 0..31) mod 2**32`, the gear hash
  of the 32-byte window ending at byte i (the same value as the classic
  `h = (h << 1) + GEAR[byte]` recurrence, because bits shifted past bit 31
  fall off). numpy computes it for a whole buffer in five shift-and-add
  passes (window doubling): measured here about 3 ms per MiB, where a Python
  loop takes about half a second.
- A chunk that starts at `s` ends after the first byte `i` with
  `i + 1 - s >= min_size` where the top bits of `h[i]` are zero: `bits + 2`
  bits while the chunk is shorter than `avg_size`, `bits - 2` bits after
  (which pulls sizes towards the average), and at `max_size` bytes at the
  latest.
- Because `min_size >= 32`, the hash window of every candidate lies inside
  its own chunk: where a chunk ends depends only on the bytes from its start.
  So chunking `prefix + more` from the start of the prefix's *last* chunk
  gives exactly the chunks that chunking the whole of `prefix + more` would.
  That is what lets an append cost O(last chunk + appended bytes) and share
  every earlier chunk with the previous version.

The default sizes (min 256 / avg 1 KiB / max 4 KiB) were chosen on 100 appends
to a growing text file, every version kept (`python -m aios.bench.storage_direct
--compression`). An append rewrites the file's last chunk, so small chunks
waste less per version, and large ones compress better. Stored bytes (chunks
+ manifests) over the final file's size, measured here:

    append size     128/512/2K   256/1K/4K   512/2K/8K   1K/4K/16K
    200 B (20 KB)      1.64         1.97        3.00        4.23
    1 KB (100 KB)      0.74         0.77        0.91        1.28
    5 KB (500 KB)      0.56         0.49        0.47        0.52

(storing each version whole would be 50x the final file). 128/512/2K is a
little smaller for tiny appends but doubles the chunk rows, and each version
bumps every chunk's reference count.
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import numpy as np

WINDOW = 32
HASH_BYTES = 16

CODEC_RAW = 0
CODEC_ZLIB = 1
#: chunks shorter than this are stored raw: zlib's header and checksum eat any gain
COMPRESS_MIN = 64
ZLIB_LEVEL = 6

# A fixed table: boundaries (and so deduplication against chunks already
# stored) depend on it. Changing it would not corrupt anything (a manifest
# names chunks by id), it would only stop new versions sharing old chunks.
_GEAR = np.random.default_rng(0x41494F53).integers(0, 2**32, size=256, dtype=np.uint32)


def gear_hashes(data: bytes | memoryview) -> np.ndarray:
    """h[i] = gear hash of the 32-byte window ending at data[i] (shorter at the start)."""
    h = _GEAR[np.frombuffer(data, dtype=np.uint8)]
    span = 1
    while span < WINDOW:
        h[span:] += h[:-span] << np.uint32(span)
        span *= 2
    return h


def _top_bits_mask(bits: int) -> np.uint32:
    return np.uint32(((1 << bits) - 1) << (32 - bits))


class Chunker:
    """Splits bytes into content-defined chunks of min_size..max_size bytes, about avg_size on average."""

    def __init__(self, min_size: int = 256, avg_size: int = 1024, max_size: int = 4096) -> None:
        bits = avg_size.bit_length() - 1
        if avg_size != 1 << bits:
            raise ValueError(f"avg_size must be a power of two, not {avg_size}")
        if not (WINDOW <= min_size < avg_size < max_size):
            raise ValueError(f"need {WINDOW} <= min_size < avg_size < max_size, got {min_size}, {avg_size}, {max_size}")
        if bits < 4:
            raise ValueError("avg_size is too small")
        self.min_size, self.avg_size, self.max_size = min_size, avg_size, max_size
        self._strict = _top_bits_mask(bits + 2)
        self._loose = _top_bits_mask(bits - 2)

    def __repr__(self) -> str:
        return f"Chunker({self.min_size}, {self.avg_size}, {self.max_size})"

    def cut_points(self, data: bytes | memoryview) -> list[int]:
        """End offsets (exclusive) of the chunks of `data`; the last is len(data). No chunks for b""."""
        n = len(data)
        lo_size = self.min_size
        if n <= lo_size:
            return [n] if n else []
        h = gear_hashes(data)
        strict = np.flatnonzero((h & self._strict) == 0)
        loose = np.flatnonzero((h & self._loose) == 0)
        n_strict, n_loose = len(strict), len(loose)
        cuts: list[int] = []
        start = 0
        while n - start > lo_size:
            lo = start + lo_size - 1             # earliest last byte of this chunk
            mid = start + self.avg_size - 1      # from here on the loose mask applies
            hi = min(start + self.max_size - 1, n - 1)
            j = int(np.searchsorted(strict, lo))
            if j < n_strict and strict[j] < mid and strict[j] <= hi:
                last = int(strict[j])
            else:
                k = int(np.searchsorted(loose, max(lo, mid)))
                last = int(loose[k]) if k < n_loose and loose[k] <= hi else hi
            cuts.append(last + 1)
            start = last + 1
        if start < n:
            cuts.append(n)
        return cuts

    def split(self, data: bytes) -> list[bytes]:
        out, start = [], 0
        for end in self.cut_points(data):
            out.append(data[start:end])
            start = end
        return out


def chunk_hash(raw: bytes) -> bytes:
    """Identity of a chunk's content: BLAKE2b-128. Chunks are deduplicated per agent only, so
    only an agent's own data could ever meet a collision, and 128 bits put that out of reach."""
    return hashlib.blake2b(raw, digest_size=HASH_BYTES).digest()


@dataclass(frozen=True, slots=True)
class Chunk:
    """A chunk ready to store: hash and size of the raw bytes, codec and the stored bytes."""

    hash: bytes
    size: int
    codec: int
    data: bytes


def encode(raw: bytes) -> Chunk:
    """Hash and (when it pays) zlib-compress one chunk."""
    digest = chunk_hash(raw)
    if len(raw) >= COMPRESS_MIN:
        packed = zlib.compress(raw, ZLIB_LEVEL)
        if len(packed) < len(raw):
            return Chunk(digest, len(raw), CODEC_ZLIB, packed)
    return Chunk(digest, len(raw), CODEC_RAW, bytes(raw))


def decode(codec: int, data: bytes, size: int) -> bytes:
    """The raw bytes of a stored chunk; checks its recorded size."""
    if codec == CODEC_RAW:
        raw = bytes(data)
    elif codec == CODEC_ZLIB:
        raw = zlib.decompress(data)
    else:
        raise ValueError(f"unknown chunk codec {codec}")
    if len(raw) != size:
        raise ValueError(f"chunk decodes to {len(raw)} bytes, expected {size}")
    return raw


# ---------------------------------------------------------------- manifests
# A version's content is either a list of chunk ids (a manifest proper) or, for content of at
# most INLINE_MAX bytes, the content itself ("inline"): a small file is one chunk anyway, and
# keeping it in the version row saves the chunk lookups, inserts and reference counts (measured
# here: 4 to 7 fewer statements and 3 to 4 fewer dirty pages per small write).
#
# Chunk ids are stored as int64 deltas (ids of one file's chunks are mostly allocated in order,
# so deltas are small), zlib-compressed when that is smaller: a 1000-chunk manifest takes
# about 1.3 KB instead of 8 KB. The first byte says which form a blob has.
INLINE_MAX = 1024
_IDS_RAW, _IDS_ZLIB, _INLINE_RAW, _INLINE_ZLIB = b"\x00", b"\x01", b"\x02", b"\x03"


def pack_manifest(ids: list[int]) -> bytes:
    """The manifest of content made of chunks `ids`."""
    if not ids:
        return _IDS_RAW
    deltas = [ids[0]] + [b - a for a, b in zip(ids, ids[1:])]
    raw = struct.pack(f"<{len(deltas)}q", *deltas)
    if len(ids) > 2:
        packed = zlib.compress(raw, ZLIB_LEVEL)
        if len(packed) < len(raw):
            return _IDS_ZLIB + packed
    return _IDS_RAW + raw


def pack_inline(data: bytes) -> bytes:
    """The manifest of content kept inline (at most INLINE_MAX bytes), compressed when that pays."""
    if len(data) > INLINE_MAX:
        raise ValueError(f"inline content is limited to {INLINE_MAX} bytes")
    if len(data) >= COMPRESS_MIN:
        packed = zlib.compress(data, ZLIB_LEVEL)
        if len(packed) < len(data):
            return _INLINE_ZLIB + packed
    return _INLINE_RAW + data


def read_manifest(blob: bytes) -> list[int] | bytes:
    """Chunk ids (a list), or the content itself (bytes) for an inline manifest."""
    kind, body = blob[:1], blob[1:]
    if kind == _INLINE_RAW:
        return bytes(body)
    if kind == _INLINE_ZLIB:
        return zlib.decompress(body)
    if kind == _IDS_ZLIB:
        body = zlib.decompress(body)
    elif kind != _IDS_RAW:
        raise ValueError("unknown manifest encoding")
    if len(body) % 8:
        raise ValueError("truncated manifest")
    ids, total = [], 0
    for delta in struct.unpack(f"<{len(body) // 8}q", body):
        total += delta
        ids.append(total)
    return ids


def manifest_ids(blob: bytes) -> list[int]:
    """The chunk ids a manifest uses (none for inline content)."""
    if blob[:1] in (_INLINE_RAW, _INLINE_ZLIB):
        return []
    ids = read_manifest(blob)
    assert isinstance(ids, list)
    return ids
