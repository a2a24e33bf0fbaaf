"""The llama.cpp decode loop: one thread owns the model context and advances every running generation.

Why one loop thread: llama.cpp on a CPU gets more tokens per second when
several sequences advance in the same `llama_decode` call (measured here with
Gemma 3 270M: 8 sequences together about 2x the aggregate tokens/s of one),
and a llama context must not be used from two threads at once.  So the core's
handler threads never touch the context: `advance()` hands the engine a
*ticket* (this generation wants N more tokens) and waits; the engine's thread
runs one decode step for every generation holding a ticket, samples each one's
next token, and passes the text back to the waiting caller, which streams it
from its own thread (so a request's partial replies and its final reply keep
their order).  Suspend and release are commands the loop runs between steps.

The context holds up to `max_batch` generations, each in its own sequence
(with max_batch > 1, its own KV stream: cells start at 0 whoever else runs,
and attention reads only its own cells).  A generation that is not resident lives in its
`LlamaCppGeneration` object (KV snapshot, tokens, RNG, text state), exactly as
in the one-at-a-time design this replaces, so preemption and resumption work
per request.  Resident generations without a ticket keep their sequence until
a newcomer needs it (resuming the same generation next then skips the
restore).

Determinism.  With `max_batch = 1` ("exact mode") every generation's
computation is the same llama.cpp calls on the same KV cells whatever else
ran before, so greedy outputs do not depend on the policy or on how often a
generation was preempted.  Three measured facts make that hold:
* the KV of a prompt prefix depends on how the prompt was split into decode
  calls, so prompts are always prefilled in fixed-boundary chunks
  ([0, C), [C, 2C), ...), which also makes cached prefixes reusable at chunk
  boundaries (see prefix_cache.py);
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
With `max_batch > 1` the floating-point results depend on how many sequences
share a decode call (measured: 2 rows give the same bits as 1; with 4 or 8,
10 and 9 of 32 greedy 64-token outputs differed from one-at-a-time ones).
Prompts are still prefilled alone, in the same chunks, so cached prefixes
stay the KV a fresh prefill computes.
"""
from __future__ import annotations

import ctypes
import hashlib
import itertools
import logging
import os
import queue
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Literal

import numpy as np

from aios.managers.llm.backends import prompting, sampling
from aios.managers.llm.prefix_cache import PrefixCache
from aios.managers.llm.types import BackendError, ChatArgs, Generation, Usage

log = logging.getLogger("aios.llm.llamacpp")

# llama.cpp is built with OpenMP here, and its threads meet at a barrier after
# every graph node (~800 per token).  GNU OpenMP's default is to busy-wait there
# for a long time; when other processes hold the cores (the normal case in AIOS:
# scheduler, managers and agents share a 2-core machine) the spinning thread
# burns the slice its partner needs.  Measured tokens/s, idle machine / two
# busy-loop processes alongside / the shared machine under heavy load:
#   default (active spin)          44 / 7-13 / 1-2
#   OMP_WAIT_POLICY=PASSIVE        25 / 19-27 / 12-21
#   PASSIVE + GOMP_SPINCOUNT=3000  44 / 18-21
# A short spin keeps the idle speed and avoids the collapse.  libgomp reads
# these once, when llama_cpp is first imported, so they are set at import of
# this module; an operator's own settings win.
if "llama_cpp" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")

Mode = Literal["text", "json", "tools"]
_TOPK = 64  # candidates tried against the grammar before scanning the whole vocabulary
#: filler alignment for exact restores: the widest SIMD accumulation over KV cells
#: (measured: 32 suffices with AVX2, 8 does not; 64 also covers AVX-512)
SWA_ALIGN = 64
#: how long the loop waits for callers whose tickets it just completed to come back
#: with their next `advance` before running the next step without them
#: (the core asks for 16 tokens at a time; missing a step costs a whole decode)
GRACE_S = 0.003
_DONE = object()


# --------------------------------------------------------------------------- grammar


class Grammar:
    """Owns one llama.cpp grammar sampler (C object); freed with the Python object."""

    def __init__(self, vocab: Any, gbnf: str) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.ptr = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
        if not self.ptr:
            raise BackendError("INVALID_ARGUMENT", "could not compile the output grammar for this schema")
        self.n_accepted = 0

    def accept(self, token: int) -> None:
        self._lib.llama_sampler_accept(self.ptr, token)
        self.n_accepted += 1

    def free(self) -> None:
        if self.ptr:
            self._lib.llama_sampler_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:
            pass


# --------------------------------------------------------------------------- generation


_ids = itertools.count(1)


class LlamaCppGeneration(Generation):
    """All state of one completion; after `suspend` it is plain data and picklable.

    The KV of sequence `seq` holds the first `n_evaluated` tokens of
    prompt + completion.  The last sampled token is *pending*: decoded at the
    start of the next step, not right after sampling, so a suspended
    generation never needs its logits saved: resuming re-runs exactly the
    decode call the uninterrupted run would have made.
    """

    def __init__(self, args: ChatArgs, prompt_tokens: list[int], mode: Mode, gbnf: str | None,
                 stops: tuple[str, ...], snapshot_points: tuple[int, ...] = ()) -> None:
        self.uid = next(_ids)
        self.args = args
        self.text = ""
        self.usage = Usage(prompt_tokens=len(prompt_tokens), completion_tokens=0)
        self.finish_reason = None
        self.mode: Mode = mode
        self.gbnf = gbnf
        self.prompt_tokens = prompt_tokens
        self.tokens: list[int] = []  # sampled completion tokens (EOS not included)
        self.raw = ""  # decoded completion before stop/whitespace handling (for JSON parsing)
        self.n_evaluated = 0  # tokens whose K/V are in the cache
        self.pending: int | None = None  # sampled, not yet decoded
        self.kv_state: bytes | bytearray | None = None  # sequence state while suspended
        self.rng = np.random.default_rng(args.seed) if args.temperature > 0 else None
        self.utf8 = prompting.Utf8Stream()
        self.stream = prompting.StopStream(stops=stops)
        #: prompt lengths (chunk multiples) whose KV is saved into the prefix cache during prefill
        self.snapshot_points = snapshot_points
        self.prefix_checked = False  # the prefix cache was consulted (once, when its prefill starts)
        self.seq: int | None = None  # transient: the sequence it occupies while resident
        self.logit_digests: list[str] = []  # filled only when the engine records logits (tests)
        self._grammar: Grammar | None = None  # transient; rebuilt from tokens when missing

    def snapshot_bytes(self) -> int:
        return (len(self.kv_state) if self.kv_state else 0) + 4 * (len(self.prompt_tokens) + len(self.tokens)) \
            + 2 * len(self.raw) + 512

    def context_len(self) -> int:
        """Tokens the KV must hold before the next step: prompt + completion, pending excluded."""
        return len(self.prompt_tokens) + len(self.tokens) - (1 if self.pending is not None else 0)

    def context_slice(self, start: int, stop: int) -> list[int]:
        n = len(self.prompt_tokens)
        if stop <= n:
            return self.prompt_tokens[start:stop]
        return (self.prompt_tokens + self.tokens)[start:stop]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_grammar"] = None
        state["seq"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class _Ticket:
    """A caller waiting in `advance` for `quota` more tokens (None: until done)."""

    __slots__ = ("gen", "quota", "produced", "out", "cancelled")

    def __init__(self, gen: LlamaCppGeneration, quota: int | None) -> None:
        self.gen = gen
        self.quota = quota
        self.produced = 0
        self.out: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.cancelled = False


# --------------------------------------------------------------------------- engine


class Engine:
    """Owns the llama context and its decode thread; every method may be called from any thread."""

    def __init__(self, model: Any, *, n_ctx: int, max_batch: int, prefill_chunk: int, n_batch: int,
                 n_threads: int, prefix_cache: PrefixCache | None, prefill_budget: int = 256) -> None:
        import llama_cpp

        lib = self._lib = llama_cpp
        self.model = model
        self.vocab = lib.llama_model_get_vocab(model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.n_ctx = n_ctx  # per generation
        self.max_batch = max_batch
        self.exact = max_batch == 1
        self.chunk = prefill_chunk
        self.prefill_budget = max(prefill_budget, 1)
        self.n_batch = n_batch
        self.n_swa = max(0, int(lib.llama_model_n_swa(model)))
        self.cache = prefix_cache
        #: keep a digest of every sampled step's logits in the generation (tests of bit-exactness)
        self.record_logits = False
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

        # Candidate array for the grammar sampler, sized for the whole vocabulary
        # but usually filled with just one or a few tokens.
        dt = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
        self._cand = np.zeros(self.n_vocab, dtype=dt)
        self._cand_ids = np.arange(self.n_vocab, dtype=np.int32)
        self._cand_arr = lib.llama_token_data_array(
            data=self._cand.ctypes.data_as(lib.llama_token_data_p), size=self.n_vocab, selected=-1, sorted=False)
        self._piece_buf = ctypes.create_string_buffer(256)

        # Sequence slots: weak references, so a generation the core spilled to disk and
        # forgot is not kept alive (with its snapshot) by the engine.
        self._slots: list[weakref.ref[LlamaCppGeneration] | None] = [None] * max_batch
        self._last_active: dict[int, int] = {}  # seq -> step number of its last use
        self._guarded = False
        self._filler: bytearray | None = None
        self._call_ms: dict[int, float] = {}  # rows per decode call -> fastest call seen (ms), for stats

        self._cv = threading.Condition()
        self._tickets: dict[int, _Ticket] = {}  # gen uid -> ticket, in arrival order
        self._commands: list[tuple[Callable[..., Any], tuple[Any, ...], Future[Any] | None]] = []
        self._awaiting: set[int] = set()
        self._closing = False

        #: last measured costs, for benchmarks and the context manager's accounting
        self.timings: dict[str, float] = {"save_ms": 0.0, "restore_ms": 0.0, "snapshot_bytes": 0.0}
        self.switch_seconds = 0.0
        self.counters: dict[str, float] = {
            "steps": 0, "decode_calls": 0, "decoded_tokens": 0, "prefill_calls": 0, "prefill_tokens": 0,
            "restores": 0, "restore_fallbacks": 0, "decode_s": 0.0, "prefill_s": 0.0, "grace_wait_s": 0.0,
        }
        self._thread = threading.Thread(target=self._run, name="llamacpp-decode", daemon=True)
        self._thread.start()
        if self.exact and self.n_swa > 0:
            self.call(self._make_filler)

    # ------------------------------------------------------------ public API
    def advance(self, gen: LlamaCppGeneration, max_tokens: int | None, on_text: Callable[[str], None]) -> None:
        """Block until `gen` has `max_tokens` more tokens (None: until done), streaming text through
        `on_text` on the calling thread."""
        if gen.done or (max_tokens is not None and max_tokens <= 0):
            return
        ticket = _Ticket(gen, max_tokens)
        with self._cv:
            if self._closing:
                raise BackendError("UNAVAILABLE", "the llama.cpp backend is closed")
            if gen.uid in self._tickets:
                raise BackendError("INTERNAL", f"generation {gen.uid} is already being advanced")
            self._tickets[gen.uid] = ticket
            self._awaiting.discard(gen.uid)
            self._cv.notify_all()
        try:
            while True:
                item = ticket.out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                on_text(item)
        except BaseException:
            with self._cv:
                ticket.cancelled = True
                if self._tickets.get(gen.uid) is ticket:
                    del self._tickets[gen.uid]
            raise

    def call(self, fn: Callable[..., Any], *args: Any, wait: bool = True) -> Any:
        """Run `fn(*args)` on the decode thread between two steps (it owns the context)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        fut: Future[Any] | None = Future() if wait else None
        with self._cv:
            if self._closing:
                if wait:
                    raise BackendError("UNAVAILABLE", "the llama.cpp backend is closed")
                return None
            self._commands.append((fn, args, fut))
            for a in args:
                if isinstance(a, LlamaCppGeneration):
                    self._awaiting.discard(a.uid)
            self._cv.notify_all()
        return fut.result() if fut is not None else None

    def suspend(self, gen: LlamaCppGeneration) -> None:
        self.call(self._suspend, gen)

    def release(self, gen: LlamaCppGeneration) -> None:
        """Forget `gen`'s KV (its sequence and snapshot); does not wait for the decode thread."""
        gen.kv_state = None
        self.call(self._release, gen, wait=False)

    def resident(self) -> int:
        return sum(1 for ref in self._slots if ref is not None and ref() is not None)

    def stats(self) -> dict[str, Any]:
        c = dict(self.counters)
        steps = max(c["decode_calls"], 1)
        out: dict[str, Any] = {
            "max_batch": self.max_batch, "exact": self.exact, "prefill_chunk": self.chunk, "kv_cells": self.n_cells,
            "resident": self.resident(), "running": len(self._tickets),
            "mean_batch": round(c["decoded_tokens"] / steps, 3),
            "fastest_decode_ms_by_rows": {str(k): round(v, 2) for k, v in sorted(self._call_ms.items())},
            **{k: (round(v, 6) if isinstance(v, float) else int(v)) for k, v in c.items()},
        }
        if self.cache is not None:
            out["prefix_cache"] = self.cache.stats()
        return out

    def close(self) -> None:
        with self._cv:
            if self._closing:
                return
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        err = BackendError("UNAVAILABLE", "the llama.cpp backend is closed")
        with self._cv:
            for t in self._tickets.values():
                t.out.put(err)
            self._tickets.clear()
            for _, _, fut in self._commands:
                if fut is not None:
                    fut.set_exception(err)
            self._commands.clear()
        self._slots = [None] * self.max_batch
        try:
            self._lib.llama_batch_free(self._batch)
        finally:
            self._lib.llama_free(self.ctx)

    # ---------------------------------------------------------- tokens / text
    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Tokens of `text`; special-token syntax in user text is *not* parsed (no injection)."""
        lib = self._lib
        add = add_bos and bool(lib.llama_vocab_get_add_bos(self.vocab))
        data = text.encode("utf-8")
        cap = len(data) + 8
        arr = (lib.llama_token * cap)()
        n = lib.llama_tokenize(self.vocab, data, len(data), arr, cap, add, False)
        if n < 0:
            cap = -n
            arr = (lib.llama_token * cap)()
            n = lib.llama_tokenize(self.vocab, data, len(data), arr, cap, add, False)
            if n < 0:
                raise BackendError("INTERNAL", "tokenization failed")
        return list(arr[:n])

    def _piece(self, token: int) -> bytes:
        n = self._lib.llama_token_to_piece(self.vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    # --------------------------------------------------------------- the loop
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._commands or self._tickets or self._closing):
                    self._cv.wait()
                if self._closing:
                    return
                if self._awaiting and self._tickets:
                    # Callers whose tokens just arrived usually ask for more within a fraction
                    # of a millisecond; waiting briefly keeps them in the next decode call.
                    t0 = time.monotonic()
                    deadline = t0 + GRACE_S
                    while self._awaiting and not self._closing:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cv.wait(left)
                    self.counters["grace_wait_s"] += time.monotonic() - t0
                self._awaiting.clear()
                commands, self._commands = self._commands, []
            for fn, args, fut in commands:
                try:
                    result = fn(*args)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    if fut is not None:
                        fut.set_exception(exc)
                    else:
                        log.warning("engine command %s failed: %s", getattr(fn, "__name__", fn), exc)
                else:
                    if fut is not None:
                        fut.set_result(result)
            with self._cv:  # after the commands: a released generation's ticket is gone
                tickets = [t for t in self._tickets.values() if not t.cancelled]
            if tickets:
                try:
                    self._step(tickets)
                except Exception as exc:  # a failed decode: fail the waiting callers, keep serving
                    log.exception("decode step failed")
                    err = exc if isinstance(exc, BackendError) else BackendError("BACKEND_ERROR", f"{exc}")
                    for t in tickets:
                        self._unbind(t.gen)
                        t.gen.n_evaluated = 0  # its KV is gone: a later advance replays it
                        self._complete(t, err)

    def _step(self, tickets: list[_Ticket]) -> None:
        self.counters["steps"] += 1
        step_no = int(self.counters["steps"])
        for t in tickets:
            g = t.gen
            if g.seq is not None and self._slot_gen(g.seq) is g:
                g.kv_state = None  # resumed where it was suspended: the sequence still holds exactly that state
            else:
                g.seq = None
                self._admit(g, {x.gen.uid for x in tickets})
        ready = [t for t in tickets if t.gen.seq is not None]
        for t in ready:
            self._last_active[t.gen.seq] = step_no  # type: ignore[index]
        prefilling = [t for t in ready if t.gen.n_evaluated < t.gen.context_len()]
        decoding = [t for t in ready if t.gen.n_evaluated >= t.gen.context_len() and t.gen.pending is not None]
        # Prompts are prefilled oldest first, up to `prefill_budget` tokens per step, so that
        # generations already decoding wait a bounded time (256 tokens: about 0.3 s here)
        # while new ones start together instead of one per step.  Measured with 8 agents
        # arriving at once (64-token answers): one 64-token chunk per step left 14 of 70
        # decode calls with 1-7 rows, ramping up and down, and 7 rows cost more than 8
        # (58 vs 41 ms); a 256-token budget starts them within a step or two.
        budget = self.prefill_budget
        for t in prefilling:
            while budget > 0 and t.gen.n_evaluated < t.gen.context_len() and not t.gen.done:
                budget -= self._prefill_chunk(t)
            if budget <= 0:
                break
        if decoding:
            # All in one call.  (Measured here: 2 rows take 23 ms against 2 x 10.5 ms for two
            # single rows, 4 rows 33 ms, 8 rows 41 ms: the output layer over the 262k
            # vocabulary runs a slower kernel for 2-7 rows.  A planner that split calls by
            # measured cost was tried and dropped: on this shared machine load bursts made
            # its cost estimates, and so its plans, flip.)
            self._decode_step(decoding)

    # -------------------------------------------------------------- residency
    def _slot_gen(self, seq: int) -> LlamaCppGeneration | None:
        ref = self._slots[seq]
        return ref() if ref is not None else None

    def _admit(self, g: LlamaCppGeneration, busy: set[int]) -> bool:
        """Give `g` a sequence (evicting an idle resident if needed) and load its KV."""
        free = None
        for s, ref in enumerate(self._slots):
            if ref is None or ref() is None:
                if ref is not None:  # its generation died without being released: free its cells
                    self._lib.llama_memory_seq_rm(self.mem, s, -1, -1)
                    self._slots[s] = None
                free = s
                break
        if free is None:
            idle = [(self._last_active.get(s, 0), s) for s, ref in enumerate(self._slots)
                    if ref is not None and (r := ref()) is not None and r.uid not in busy]
            if not idle:
                return False  # every sequence is generating: wait for one to finish or yield
            _, free = min(idle)
            victim = self._slot_gen(free)
            assert victim is not None
            if not victim.done and victim.kv_state is None and victim.n_evaluated > 0:
                log.debug("auto-suspending gen %d to run gen %d", victim.uid, g.uid)
                self._suspend(victim)
            self._unbind(victim)
        self._load(g, free)
        return True

    def _unbind(self, g: LlamaCppGeneration) -> None:
        s = g.seq
        if s is not None and self._slot_gen(s) is g:
            self._lib.llama_memory_seq_rm(self.mem, s, -1, -1)
            self._slots[s] = None
        g.seq = None

    def _load(self, g: LlamaCppGeneration, s: int) -> None:
        lib = self._lib
        if self.exact:
            lib.llama_memory_clear(self.mem, False)  # metadata only; data gets overwritten
        else:
            lib.llama_memory_seq_rm(self.mem, s, -1, -1)
        g.seq = s
        self._slots[s] = weakref.ref(g)
        if g.kv_state is not None:
            t0 = time.perf_counter()
            ok = self._restore(g.kv_state, s, g.n_evaluated)
            self.timings["restore_ms"] = (time.perf_counter() - t0) * 1e3
            self.switch_seconds += self.timings["restore_ms"] / 1e3
            self.counters["restores"] += 1
            g.kv_state = None
            if not ok:
                # No contiguous room for the snapshot (a fragmented cache with several
                # sequences): recompute its KV with prefill instead.
                log.warning("gen %d: snapshot did not fit in the KV cache; recomputing %d tokens",
                            g.uid, g.n_evaluated)
                self.counters["restore_fallbacks"] += 1
                g.n_evaluated = 0
        elif g.n_evaluated > 0:
            # Snapshot lost (should not happen): recomputing gives the same KV in exact mode
            # for the prompt; the completion's KV is recomputed as one prefill.
            log.warning("gen %d has no snapshot; recomputing %d tokens", g.uid, g.n_evaluated)
            g.n_evaluated = 0
        if g.mode != "text" and g._grammar is None:
            g._grammar = Grammar(self.vocab, g.gbnf or "")
            for t in g.tokens:
                g._grammar.accept(t)
        if self.exact and g.n_evaluated > 0:
            # Until the next token is placed, the restored cells must not look reusable.
            lib.llama_memory_seq_cp(self.mem, s, self.seq_guard, -1, -1)
            self._guarded = True

    def _reuse_prefix(self, g: LlamaCppGeneration, s: int) -> None:
        """Start a fresh prompt from the longest cached prefix, if any.

        Called when the prompt's prefill starts, not when the generation gets its
        sequence: prompts are prefilled one at a time, so agents that arrive together
        with the same system prompt find it cached by the first one.
        """
        g.prefix_checked = True
        if self.cache is None:
            return
        hit = self.cache.lookup(g.prompt_tokens)
        if hit is None:
            return
        entry, usable = hit
        t0 = time.perf_counter()
        if not self._restore(entry.payload, s, entry.length):
            log.warning("gen %d: cached prefix did not fit in the KV cache; prefilling it", g.uid)
            return
        if usable < entry.length:
            self._lib.llama_memory_seq_rm(self.mem, s, usable, -1)
        g.n_evaluated = usable
        g.usage.cached_prompt_tokens = usable
        self.timings["prefix_restore_ms"] = (time.perf_counter() - t0) * 1e3
        if self.exact:
            self._lib.llama_memory_seq_cp(self.mem, s, self.seq_guard, -1, -1)
            self._guarded = True

    def _restore(self, data: bytes | bytearray, s: int, n_tokens: int) -> bool:
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

    def _make_filler(self) -> None:
        """A sliding-window-only state of SWA_ALIGN - 1 cells (any finite KV will do: it is never visible)."""
        lib = self._lib
        n = SWA_ALIGN - 1
        lib.llama_memory_clear(self.mem, True)
        bos = int(lib.llama_vocab_bos(self.vocab))
        self._fill_batch([bos if bos >= 0 else 0] * n, 0, self.seq_fill, False)
        self._decode_batch(n)
        size = lib.llama_state_seq_get_size_ext(self.ctx, self.seq_fill, lib.LLAMA_STATE_SEQ_FLAGS_SWA_ONLY)
        buf = bytearray(size)
        got = lib.llama_state_seq_get_data_ext(self.ctx, (ctypes.c_uint8 * size).from_buffer(buf), size,
                                               self.seq_fill, lib.LLAMA_STATE_SEQ_FLAGS_SWA_ONLY)
        lib.llama_memory_clear(self.mem, True)
        if got != size:
            log.warning("could not build the SWA filler; restores of long sequences may not be bit-exact")
            return
        self._filler = buf

    def _save_state(self, s: int) -> bytearray:
        lib = self._lib
        size = lib.llama_state_seq_get_size(self.ctx, s)
        buf = bytearray(size)
        got = lib.llama_state_seq_get_data(self.ctx, (ctypes.c_uint8 * size).from_buffer(buf), size, s)
        if got != size:
            raise BackendError("INTERNAL", f"llama_state_seq_get_data wrote {got} of {size} bytes")
        return buf  # a bytearray: converting to bytes would double the cost (8 ms vs 1.4 ms at 10 MB)

    # ------------------------------------------------------------- commands
    def _suspend(self, g: LlamaCppGeneration) -> None:
        """Copy a resident generation's KV into it (idempotent; a no-op for non-resident ones).

        The sequence keeps the same KV afterwards, so resuming the same
        generation before anyone needs its sequence skips the restore.
        """
        if g.seq is None or self._slot_gen(g.seq) is not g or g.done or g.kv_state is not None \
                or g.n_evaluated == 0:
            return
        t0 = time.perf_counter()
        g.kv_state = self._save_state(g.seq)
        self.timings["save_ms"] = (time.perf_counter() - t0) * 1e3
        self.switch_seconds += self.timings["save_ms"] / 1e3
        self.timings["snapshot_bytes"] = float(len(g.kv_state))
        log.debug("suspended gen %d: %d bytes in %.3f ms", g.uid, len(g.kv_state), self.timings["save_ms"])

    def _release(self, g: LlamaCppGeneration) -> None:
        with self._cv:
            t = self._tickets.pop(g.uid, None)
        if t is not None:
            t.cancelled = True
            t.out.put(BackendError("CANCELLED", "generation released"))
        self._unbind(g)
        g.kv_state = None
        if g._grammar is not None:
            g._grammar.free()
            g._grammar = None

    # --------------------------------------------------------------- compute
    def _fill_batch(self, tokens: list[int], pos0: int, seq: int, last_logits: bool) -> None:
        n = len(tokens)
        self._b_token[:n] = tokens
        self._b_pos[:n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        self._b_logits[:n] = 0
        if last_logits:
            self._b_logits[n - 1] = 1
        for i in range(n):
            self._set_seq(i, seq)

    def _set_seq(self, i: int, seq: int) -> None:
        if self._b_seq[i] != seq:
            self._batch.seq_id[i][0] = seq
            self._b_seq[i] = seq

    def _decode_batch(self, n: int) -> None:
        self._batch.n_tokens = n
        rc = self._lib.llama_decode(self.ctx, self._batch)
        if self._guarded:
            self._lib.llama_memory_seq_rm(self.mem, self.seq_guard, -1, -1)
            self._guarded = False
        if rc != 0:
            raise BackendError("BACKEND_ERROR", f"llama_decode failed with code {rc}"
                               + (" (no free KV cells)" if rc == 1 else ""))

    def _logits(self, i: int) -> np.ndarray:
        """A zero-copy view of batch row i's logits (valid until the next decode)."""
        ptr = self._lib.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _prefill_chunk(self, t: _Ticket) -> int:
        """Evaluate the next fixed-boundary chunk of `t.gen`'s context (prompt, or tokens being recomputed);
        returns the number of tokens evaluated."""
        g = t.gen
        assert g.seq is not None
        if not g.prefix_checked and not g.tokens and g.n_evaluated == 0:
            self._reuse_prefix(g, g.seq)
        start, total = g.n_evaluated, g.context_len()
        stop = min(total, (start // self.chunk + 1) * self.chunk)
        sample = stop == total and g.pending is None  # the prompt's last token: its logits give the first token
        t0 = time.perf_counter()
        self._fill_batch(g.context_slice(start, stop), start, g.seq, sample)
        self._decode_batch(stop - start)
        self.counters["prefill_s"] += time.perf_counter() - t0
        self.counters["prefill_calls"] += 1
        self.counters["prefill_tokens"] += stop - start
        g.n_evaluated = stop
        if self.cache is not None and stop in g.snapshot_points and not g.tokens:
            # The KV of exactly this prefix is in the cache now (later chunks may overwrite
            # the sliding-window cells it needs), so this is the moment to save it.
            data = self._save_state(g.seq)
            self.cache.insert(g.prompt_tokens[:stop], data, len(data))
        if sample:
            self._emit(t, self._logits(stop - start - 1))
        return stop - start

    def _decode_step(self, tickets: list[_Ticket]) -> None:
        n = len(tickets)
        for i, t in enumerate(tickets):
            g = t.gen
            assert g.pending is not None and g.seq is not None
            self._b_token[i] = g.pending
            self._b_pos[i] = g.n_evaluated
            self._b_logits[i] = 1
            self._set_seq(i, g.seq)
        t0 = time.perf_counter()
        self._decode_batch(n)
        dt = time.perf_counter() - t0
        self._call_ms[n] = min(self._call_ms.get(n, float("inf")), dt * 1e3)
        self.counters["decode_s"] += dt
        self.counters["decode_calls"] += 1
        self.counters["decoded_tokens"] += n
        for i, t in enumerate(tickets):
            t.gen.n_evaluated += 1
            self._emit(t, self._logits(i))

    def _emit(self, t: _Ticket, logits: np.ndarray) -> None:
        """Sample `t.gen`'s next token from `logits`, hand its text to the caller, close the ticket when due."""
        g = t.gen
        if self.record_logits:  # for tests and diagnosis: proves bit-exactness, not just equal tokens
            g.logit_digests.append(hashlib.blake2b(logits.tobytes(), digest_size=8).hexdigest())
        pieces: list[str] = []
        self._sample_step(g, logits, pieces.append)
        t.produced += 1
        if not t.cancelled:
            for p in pieces:
                t.out.put(p)
        if g.done:
            self._unbind(g)  # its KV is no longer needed
        if g.done or (t.quota is not None and t.produced >= t.quota):
            self._complete(t, _DONE)

    def _complete(self, t: _Ticket, item: Any) -> None:
        with self._cv:
            if self._tickets.get(t.gen.uid) is t:
                del self._tickets[t.gen.uid]
            if item is _DONE and not t.gen.done and not t.cancelled:
                self._awaiting.add(t.gen.uid)
        t.out.put(item)

    # -------------------------------------------------------------- sampling
    def _sample_step(self, g: LlamaCppGeneration, logits: np.ndarray, on_text: Callable[[str], None]) -> None:
        """Sample one token, turn it into text, decide whether the generation is done."""
        lib = self._lib
        tok = self._sample(g, logits)
        while g.args.ignore_eos and tok >= 0 and lib.llama_vocab_is_eog(self.vocab, tok):
            logits[tok] = -np.inf  # fixed-length generation: the next best token instead
            tok = self._sample(g, logits)
        if tok < 0 or lib.llama_vocab_is_eog(self.vocab, tok):
            g.pending = None
            self._finish(g, "stop", on_text)
            return
        g.tokens.append(tok)
        g.pending = tok
        g.usage.completion_tokens += 1
        if g._grammar is not None:
            g._grammar.accept(tok)
        piece = g.utf8.feed(self._piece(tok))
        if piece:
            g.raw += piece
            if g.mode != "tools":  # a tool call is returned as structure, not streamed as text
                out = g.stream.feed(piece)
                if out:
                    g.text += out
                    on_text(out)
        if g.stream.stopped:
            g.finish_reason = "stop"
        elif g.mode in ("json", "tools") and prompting.json_complete(g.raw):
            self._finish(g, "stop", on_text)
        elif len(g.tokens) >= g.args.max_tokens:
            self._finish(g, "length", on_text)

    @staticmethod
    def _finish(g: LlamaCppGeneration, reason: Literal["stop", "length"], on_text: Callable[[str], None]) -> None:
        tail = g.utf8.flush()
        if tail:
            g.raw += tail
        if g.mode != "tools":
            out = g.stream.feed(tail) if tail else ""
            if not g.stream.stopped:
                out += g.stream.flush()
            if out:
                g.text += out
                on_text(out)
        g.finish_reason = reason

    def _sample(self, g: LlamaCppGeneration, logits: np.ndarray) -> int:
        """Greedy or temperature sampling from our own logits, filtered by the grammar if any.

        The grammar is consulted on the chosen token first, then (greedy) on the
        64 best, and on the whole vocabulary only when none of those is allowed:
        scanning 262k tokens through the grammar costs 30-100 ms, several decodes.
        At temperature > 0 a rejected draw is redrawn from the grammar-filtered
        distribution with the same RNG (the scheme llama.cpp's own sampler uses).
        Penalties and top-k/top-p/min-p (`sampling`) shape the logits first; they
        read only tokens the generation holds, so a resumed run samples the same.
        """
        temp = g.args.temperature
        gram = g._grammar
        if g.args.sampling_set():
            logits = sampling.shaped(logits, g.tokens[-sampling.PENALTY_LAST_N:], g.args)
        tok = int(logits.argmax()) if temp <= 0 else self._draw(g, logits, None)
        if gram is None:
            return tok
        if self._apply_grammar(gram, np.array([tok], dtype=np.int32), logits[tok:tok + 1])[0]:
            return tok
        if temp <= 0:
            # Greedy: if any of the K best tokens is allowed, the best allowed one is
            # the global answer, at a fraction of the cost of a full-vocabulary scan.
            top = np.argpartition(logits, -_TOPK)[-_TOPK:]
            top = top[np.lexsort((top, -logits[top]))]
            if self._apply_grammar(gram, top, logits[top]).any():
                return int(top[np.isfinite(self._cand["logit"][:_TOPK]).argmax()])
        allowed = self._apply_grammar(gram, self._cand_ids, logits)
        if not allowed.any():
            log.warning("gen %d: grammar allows no token; ending generation", g.uid)
            return -1
        if temp <= 0:
            return int(np.where(allowed, logits, -np.inf).argmax())
        return self._draw(g, logits, allowed)

    def _apply_grammar(self, gram: Grammar, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Run the grammar over candidate tokens `ids`; returns the mask of allowed ones."""
        n = len(ids)
        cand = self._cand
        cand["id"][:n] = ids
        cand["logit"][:n] = logits
        cand["p"][:n] = 0.0
        self._cand_arr.data = cand.ctypes.data_as(self._lib.llama_token_data_p)
        self._cand_arr.size = n
        self._cand_arr.selected = -1
        self._cand_arr.sorted = False
        self._lib.llama_sampler_apply(gram.ptr, ctypes.byref(self._cand_arr))
        return np.isfinite(cand["logit"][:n])

    @staticmethod
    def _draw(g: LlamaCppGeneration, logits: np.ndarray, allowed: np.ndarray | None) -> int:
        assert g.rng is not None
        x = logits.astype(np.float64)
        if allowed is not None:
            x[~allowed] = -np.inf
        x /= g.args.temperature
        x -= x.max()
        np.exp(x, out=x)
        cdf = np.cumsum(x)
        u = g.rng.random() * cdf[-1]
        return int(min(np.searchsorted(cdf, u, side="right"), len(cdf) - 1))
