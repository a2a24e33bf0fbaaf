"""The llama context of the embedded backend: its KV cell pool, the one reusable batch, and saved sequence states.

Only the engine's decode thread calls into it (a llama context must not be
used from two threads at once).  It knows sequences and cells, not
generations: which generation holds which sequence is llamacpp_residency.py's
business, and which tokens run next is the engine's.

Exact restores.  With `max_batch = 1` ("exact mode") every generation's
computation must be the same llama.cpp calls on the same KV cells whatever ran
before.  Two of the facts that make that hold concern restores:
* the non-flash attention kernels sum over KV cells in SIMD lanes, so the
  cell index where each visible key sits matters modulo 32;
* a saved state keeps only the last `n_swa` positions of Gemma's
  sliding-window layers, so a restored long sequence sits at different cell
  indices than the uninterrupted one.  Restores in exact mode therefore put a
  small filler (under 64 cells, SWA layers only) in front of the restored
  block so every visible key lands at the same index modulo 64, and a guard
  sequence keeps llama.cpp from recycling the restored block's out-of-window
  cells for the next token.  Measured: without this, the logits of
  sequences longer than 512 tokens changed after a suspend/resume (the
  one-at-a-time backend had the same flaw); with it, they are bit-identical.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Any

import numpy as np

from aios.managers.llm.types import BackendError

log = logging.getLogger("aios.llm.llamacpp")

#: filler alignment for exact restores: the widest SIMD accumulation over KV cells
#: (measured: 32 suffices with AVX2, 8 does not; 64 also covers AVX-512)
SWA_ALIGN = 64


class LlamaContext:
    """One llama context sized for `max_batch` sequences of `n_ctx` tokens each, with its batch."""

    def __init__(self, lib: Any, model: Any, vocab: Any, n_vocab: int, *, n_ctx: int, max_batch: int,
                 n_batch: int, n_threads: int) -> None:
        self._lib = lib
        self.vocab = vocab
        self.n_vocab = n_vocab
        self.exact = max_batch == 1
        self.n_swa = max(0, int(lib.llama_model_n_swa(model)))
        self.seq_guard = 1  # exact mode: shares a restored block's cells until the next token is placed
        self.seq_fill = 2   # exact mode: filler cells in front of a restored block

        params = lib.llama_context_default_params()
        per_seq = -(-n_ctx // 256) * 256  # llama.cpp pads KV sizes to 256 cells
        if self.exact:
            # One generation plus two helper sequences sharing its cells (guard) or sitting
            # in front of them (filler), in one cell pool.
            params.n_ctx = per_seq + 256
            params.n_seq_max = 3
            params.kv_unified = True
        else:
            # One KV stream per sequence: each generation's cells start at 0 and stay
            # contiguous whoever else runs, attention reads only its own cells (a unified
            # pool makes every query scan every resident sequence's cells), and a restore
            # always finds room.
            params.n_ctx = per_seq * max_batch
            params.n_seq_max = max_batch
            params.kv_unified = False
        params.n_batch = params.n_ubatch = n_batch
        params.swa_full = True     # keep every position of the sliding-window layers until removed
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # the exactness above is measured without it
        params.n_threads = params.n_threads_batch = n_threads
        params.embeddings = False
        ctx = lib.llama_init_from_model(model, params)
        if not ctx:
            raise BackendError("INTERNAL", f"llama.cpp could not create a context of {params.n_ctx} cells "
                                           f"for {max_batch} sequences (n_ctx={n_ctx}, max_batch={max_batch})")
        self.ctx = ctx
        self.mem = lib.llama_get_memory(ctx)
        self.n_cells = int(lib.llama_n_ctx(ctx))

        # One batch, reused: filled through numpy views; seq ids are written only when they change.
        self._batch = lib.llama_batch_init(n_batch, 0, 1)
        self._b_token = np.ctypeslib.as_array(self._batch.token, shape=(n_batch,))
        self._b_pos = np.ctypeslib.as_array(self._batch.pos, shape=(n_batch,))
        self._b_logits = np.ctypeslib.as_array(self._batch.logits, shape=(n_batch,))
        self._b_nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(n_batch,))
        self._b_nseq[:] = 1
        self._b_seq = [-1] * n_batch
        self._guarded = False
        self._filler: bytearray | None = None

    def close(self) -> None:
        try:
            self._lib.llama_batch_free(self._batch)
        finally:
            self._lib.llama_free(self.ctx)

    # ---------------------------------------------------------------- compute
    def fill(self, tokens: list[int], pos0: int, seq: int, last_logits: bool) -> None:
        """Put consecutive tokens of one sequence in the batch (a prefill chunk)."""
        n = len(tokens)
        self._b_token[:n] = tokens
        self._b_pos[:n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        self._b_logits[:n] = 0
        if last_logits:
            self._b_logits[n - 1] = 1
        for i in range(n):
            self._set_seq(i, seq)

    def put_row(self, i: int, token: int, pos: int, seq: int) -> None:
        """Batch row i: one sequence's next token, whose logits are wanted (a decode step)."""
        self._b_token[i] = token
        self._b_pos[i] = pos
        self._b_logits[i] = 1
        self._set_seq(i, seq)

    def _set_seq(self, i: int, seq: int) -> None:
        if self._b_seq[i] != seq:
            self._batch.seq_id[i][0] = seq
            self._b_seq[i] = seq

    def decode(self, n: int) -> None:
        """Run the batch's first n rows."""
        self._batch.n_tokens = n
        rc = self._lib.llama_decode(self.ctx, self._batch)
        if self._guarded:
            self._lib.llama_memory_seq_rm(self.mem, self.seq_guard, -1, -1)
            self._guarded = False
        if rc != 0:
            raise BackendError("BACKEND_ERROR", f"llama_decode failed with code {rc}"
                               + (" (no free KV cells)" if rc == 1 else ""))

    def logits(self, i: int) -> np.ndarray:
        """A zero-copy view of batch row i's logits (valid until the next decode)."""
        ptr = self._lib.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    # -------------------------------------------------------------- sequences
    def forget(self, s: int, start: int = -1) -> None:
        """Free sequence `s`'s cells from position `start` on (all of them by default)."""
        self._lib.llama_memory_seq_rm(self.mem, s, start, -1)

    def vacate(self, s: int) -> None:
        """Empty sequence `s` before a generation moves in (exact mode: the whole pool, metadata only;
        the data gets overwritten)."""
        if self.exact:
            self._lib.llama_memory_clear(self.mem, False)
        else:
            self._lib.llama_memory_seq_rm(self.mem, s, -1, -1)

    def guard(self, s: int) -> None:
        """Exact mode: until the next token is placed, sequence `s`'s restored cells must not look reusable."""
        self._lib.llama_memory_seq_cp(self.mem, s, self.seq_guard, -1, -1)
        self._guarded = True

    # ----------------------------------------------------------- saved states
    def save(self, s: int) -> bytearray:
        """Sequence `s`'s state (its KV cells)."""
        lib = self._lib
        size = lib.llama_state_seq_get_size(self.ctx, s)
        buf = bytearray(size)
        got = lib.llama_state_seq_get_data(self.ctx, (ctypes.c_uint8 * size).from_buffer(buf), size, s)
        if got != size:
            raise BackendError("INTERNAL", f"llama_state_seq_get_data wrote {got} of {size} bytes")
        return buf  # a bytearray: converting to bytes would double the cost (8 ms vs 1.4 ms at 10 MB)

    def restore(self, data: bytes | bytearray, s: int, n_tokens: int) -> bool:
        """Load a saved sequence state into sequence `s`; False if it does not fit."""
        lib = self._lib
        # Exact mode (the filler exists only there): a state of a sequence longer than the
        # sliding window holds only its last n_swa positions for the SWA layers; place them
        # at the cell indices (mod 64) they had when the sequence ran uninterrupted.
        aligned = self._filler is not None and 0 < self.n_swa < n_tokens
        if aligned:
            self._place_filler(n_tokens - self.n_swa)
        ok = self._set_state(data, s)
        if ok and aligned:
            first = int(lib.llama_memory_seq_pos_min(self.mem, s))
            if first != n_tokens - self.n_swa:  # another kind of window: align on what the state holds
                lib.llama_memory_clear(self.mem, False)
                self._place_filler(first)
                ok = self._set_state(data, s)
        if ok and lib.llama_memory_seq_pos_max(self.mem, s) != n_tokens - 1:
            log.error("restored state holds positions up to %d, expected %d",
                      lib.llama_memory_seq_pos_max(self.mem, s), n_tokens - 1)
            ok = False
        if not ok:
            lib.llama_memory_seq_rm(self.mem, s, -1, -1)
        return ok

    def _set_state(self, data: bytes | bytearray, s: int) -> bool:
        if isinstance(data, bytearray):
            src: Any = (ctypes.c_uint8 * len(data)).from_buffer(data)
        else:  # immutable bytes (e.g. read back from a spill file): borrow, do not copy
            src = ctypes.cast(ctypes.c_char_p(bytes(data)), ctypes.POINTER(ctypes.c_uint8))
        return self._lib.llama_state_seq_set_data(self.ctx, src, len(data), s) != 0

    def _place_filler(self, first_kept: int) -> None:
        """Occupy (first_kept mod 64) sliding-window cells, so the block restored next starts there."""
        n = first_kept % SWA_ALIGN
        if n == 0 or self._filler is None:
            return
        buf = self._filler
        src = (ctypes.c_uint8 * len(buf)).from_buffer(buf)
        if self._lib.llama_state_seq_set_data_ext(self.ctx, src, len(buf), self.seq_fill,
                                                  self._lib.LLAMA_STATE_SEQ_FLAGS_SWA_ONLY) == 0:
            log.warning("could not place the SWA filler; this restore may not be bit-exact")
            return
        self._lib.llama_memory_seq_rm(self.mem, self.seq_fill, n, -1)

    def make_filler(self) -> None:
        """A sliding-window-only state of SWA_ALIGN - 1 cells (any finite KV will do: it is never visible).
        Exact mode with a sliding-window model only; run once, on the decode thread, before any generation."""
        lib = self._lib
        n = SWA_ALIGN - 1
        lib.llama_memory_clear(self.mem, True)
        bos = int(lib.llama_vocab_bos(self.vocab))
        self.fill([bos if bos >= 0 else 0] * n, 0, self.seq_fill, False)
        self.decode(n)
        size = lib.llama_state_seq_get_size_ext(self.ctx, self.seq_fill, lib.LLAMA_STATE_SEQ_FLAGS_SWA_ONLY)
        buf = bytearray(size)
        got = lib.llama_state_seq_get_data_ext(self.ctx, (ctypes.c_uint8 * size).from_buffer(buf), size,
                                               self.seq_fill, lib.LLAMA_STATE_SEQ_FLAGS_SWA_ONLY)
        lib.llama_memory_clear(self.mem, True)
        if got != size:
            log.warning("could not build the SWA filler; restores of long sequences may not be bit-exact")
            return
        self._filler = buf
