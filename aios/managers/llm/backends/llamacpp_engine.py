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

The jobs around the loop live beside it:
* llamacpp_generation.py: one generation's state, and its token -> text bookkeeping;
* llamacpp_context.py: the llama context, its batch, saving and restoring sequence states;
* llamacpp_residency.py: which generation holds which sequence (with max_batch > 1,
  its own KV stream: cells start at 0 whoever else runs, and attention reads
  only its own cells), suspending and resuming them, prefix reuse;
* sampling.py and grammar.py: choosing each token from the logits.

Determinism.  With `max_batch = 1` ("exact mode") every generation's
computation is the same llama.cpp calls on the same KV cells whatever else
ran before, so greedy outputs do not depend on the policy or on how often a
generation was preempted.  Three measured facts make that hold:
* the KV of a prompt prefix depends on how the prompt was split into decode
  calls, so prompts are always prefilled in fixed-boundary chunks
  ([0, C), [C, 2C), ...), which also makes cached prefixes reusable at chunk
  boundaries (see prefix_cache.py);
* attention sums over KV cells in SIMD lanes, and a saved state keeps only
  the last positions of the sliding-window layers: restores place the state
  at the cell indices it had (see llamacpp_context.py).
With `max_batch > 1` the floating-point results depend on how many sequences
share a decode call (measured: 2 rows give the same bits as 1; with 4 or 8,
10 and 9 of 32 greedy 64-token outputs differed from one-at-a-time ones).
Prompts are still prefilled alone, in the same chunks, so cached prefixes
stay the KV a fresh prefill computes.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np

from aios.managers.llm.backends import sampling
from aios.managers.llm.backends.grammar import GrammarFilter
from aios.managers.llm.backends.llamacpp_context import LlamaContext
from aios.managers.llm.backends.llamacpp_generation import LlamaCppGeneration
from aios.managers.llm.backends.llamacpp_residency import Residency
from aios.managers.llm.prefix_cache import PrefixCache
from aios.managers.llm.types import BackendError

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

#: how long the loop waits for callers whose tickets it just completed to come back
#: with their next `advance` before running the next step without them
#: (the core asks for 16 tokens at a time; missing a step costs a whole decode)
GRACE_S = 0.003
_DONE = object()


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
        self.cache = prefix_cache
        #: keep a digest of every sampled step's logits in the generation (tests of bit-exactness)
        self.record_logits = False

        self.kv = LlamaContext(lib, model, self.vocab, self.n_vocab, n_ctx=n_ctx, max_batch=max_batch,
                               n_batch=n_batch, n_threads=n_threads)
        self.n_swa = self.kv.n_swa
        self.n_cells = self.kv.n_cells
        self.counters: dict[str, float] = {
            "steps": 0, "decode_calls": 0, "decoded_tokens": 0, "prefill_calls": 0, "prefill_tokens": 0,
            "restores": 0, "restore_fallbacks": 0, "decode_s": 0.0, "prefill_s": 0.0, "grace_wait_s": 0.0,
        }
        self.residency = Residency(self.kv, max_batch, prefix_cache, self.counters)
        self._grammar_filter = GrammarFilter(lib, self.n_vocab)
        self._piece_buf = ctypes.create_string_buffer(256)
        self._call_ms: dict[int, float] = {}  # rows per decode call -> fastest call seen (ms), for stats

        self._cv = threading.Condition()
        self._tickets: dict[int, _Ticket] = {}  # gen uid -> ticket, in arrival order
        self._commands: list[tuple[Callable[..., Any], tuple[Any, ...], Future[Any] | None]] = []
        self._awaiting: set[int] = set()
        self._closing = False

        self._thread = threading.Thread(target=self._run, name="llamacpp-decode", daemon=True)
        self._thread.start()
        if self.exact and self.n_swa > 0:
            self.call(self.kv.make_filler)

    @property
    def timings(self) -> dict[str, float]:
        """Last measured costs (save, restore, snapshot size), for benchmarks and the context manager."""
        return self.residency.timings

    @property
    def switch_seconds(self) -> float:
        """Time spent saving and restoring generations' KV so far."""
        return self.residency.switch_seconds

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
        self.call(self.residency.suspend, gen)

    def release(self, gen: LlamaCppGeneration) -> None:
        """Forget `gen`'s KV (its sequence and snapshot); does not wait for the decode thread."""
        gen.kv_state = None
        self.call(self._release, gen, wait=False)

    def resident(self) -> int:
        return self.residency.count()

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
        self.residency.clear()
        self.kv.close()

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
                        self.residency.unbind(t.gen)
                        t.gen.n_evaluated = 0  # its KV is gone: a later advance replays it
                        self._complete(t, err)

    def _step(self, tickets: list[_Ticket]) -> None:
        self.counters["steps"] += 1
        step_no = int(self.counters["steps"])
        for t in tickets:
            g = t.gen
            if self.residency.holds(g):
                g.kv_state = None  # resumed where it was suspended: the sequence still holds exactly that state
            else:
                g.seq = None
                self.residency.admit(g, {x.gen.uid for x in tickets})
        ready = [t for t in tickets if t.gen.seq is not None]
        for t in ready:
            self.residency.touch(t.gen.seq, step_no)  # type: ignore[arg-type]
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

    # ------------------------------------------------------------- commands
    def _release(self, g: LlamaCppGeneration) -> None:
        with self._cv:
            t = self._tickets.pop(g.uid, None)
        if t is not None:
            t.cancelled = True
            t.out.put(BackendError("CANCELLED", "generation released"))
        self.residency.unbind(g)
        g.kv_state = None
        g.drop_grammar()

    # --------------------------------------------------------------- compute
    def _prefill_chunk(self, t: _Ticket) -> int:
        """Evaluate the next fixed-boundary chunk of `t.gen`'s context (prompt, or tokens being recomputed);
        returns the number of tokens evaluated."""
        g = t.gen
        assert g.seq is not None
        if not g.prefix_checked and not g.tokens and g.n_evaluated == 0:
            self.residency.reuse_prefix(g)
        start, total = g.n_evaluated, g.context_len()
        stop = min(total, (start // self.chunk + 1) * self.chunk)
        sample = stop == total and g.pending is None  # the prompt's last token: its logits give the first token
        t0 = time.perf_counter()
        self.kv.fill(g.context_slice(start, stop), start, g.seq, sample)
        self.kv.decode(stop - start)
        self.counters["prefill_s"] += time.perf_counter() - t0
        self.counters["prefill_calls"] += 1
        self.counters["prefill_tokens"] += stop - start
        g.n_evaluated = stop
        if self.cache is not None and stop in g.snapshot_points and not g.tokens:
            # The KV of exactly this prefix is in the cache now (later chunks may overwrite
            # the sliding-window cells it needs), so this is the moment to save it.
            data = self.kv.save(g.seq)
            self.cache.insert(g.prompt_tokens[:stop], data, len(data))
        if sample:
            self._emit(t, self.kv.logits(stop - start - 1))
        return stop - start

    def _decode_step(self, tickets: list[_Ticket]) -> None:
        n = len(tickets)
        for i, t in enumerate(tickets):
            g = t.gen
            assert g.pending is not None and g.seq is not None
            self.kv.put_row(i, g.pending, g.n_evaluated, g.seq)
        t0 = time.perf_counter()
        self.kv.decode(n)
        dt = time.perf_counter() - t0
        self._call_ms[n] = min(self._call_ms.get(n, float("inf")), dt * 1e3)
        self.counters["decode_s"] += dt
        self.counters["decode_calls"] += 1
        self.counters["decoded_tokens"] += n
        for i, t in enumerate(tickets):
            t.gen.n_evaluated += 1
            self._emit(t, self.kv.logits(i))

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
            self.residency.unbind(g)  # its KV is no longer needed
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
            g.end("stop", on_text)
            return
        g.take(tok, self._piece(tok), on_text)

    def _sample(self, g: LlamaCppGeneration, logits: np.ndarray) -> int:
        """The next token of `g` from its logits (sampling.choose_token), within its grammar if it has one.

        Penalties and top-k/top-p/min-p shape the logits first; they read only
        tokens the generation holds, so a resumed run samples the same.
        """
        gram = g.grammar
        allowed = None if gram is None else (lambda ids, lg: self._grammar_filter.allowed(gram, ids, lg))
        tok = sampling.choose_token(logits, g.args, g.tokens, g.rng, allowed)
        if tok < 0:
            log.warning("gen %d: grammar allows no token; ending generation", g.uid)
        return tok
