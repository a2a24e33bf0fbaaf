"""Which generation holds which sequence of the llama context, and moving their KV in and out.

The context holds up to `max_batch` generations, each in its own sequence.  A
generation that is not resident lives in its `LlamaCppGeneration` object (KV
snapshot, tokens, RNG, text state), so preemption and resumption work per
request.  Resident generations without work keep their sequence until a
newcomer needs it (resuming the same generation next then skips the restore);
the newcomer takes the sequence used least recently.

A fresh prompt starts from the longest prefix the prefix cache holds
(prefix_cache.py), restored into its sequence the same way a snapshot is.

Runs on the engine's decode thread only, like everything that touches the context.
"""
from __future__ import annotations

import logging
import time
import weakref

from aios.managers.llm.backends.llamacpp_context import LlamaContext
from aios.managers.llm.backends.llamacpp_generation import LlamaCppGeneration
from aios.managers.llm.prefix_cache import PrefixCache

log = logging.getLogger("aios.llm.llamacpp")


class Residency:
    """The context's sequence slots and the KV moves between them and the generations."""

    def __init__(self, kv: LlamaContext, max_batch: int, cache: PrefixCache | None,
                 counters: dict[str, float]) -> None:
        self.kv = kv
        self.max_batch = max_batch
        self.cache = cache
        self.counters = counters  # the engine's counters; this adds "restores" and "restore_fallbacks"
        # Sequence slots: weak references, so a generation the core spilled to disk and
        # forgot is not kept alive (with its snapshot) by the engine.
        self._slots: list[weakref.ref[LlamaCppGeneration] | None] = [None] * max_batch
        self._last_active: dict[int, int] = {}  # seq -> step number of its last use
        #: last measured costs, for benchmarks and the context manager's accounting
        self.timings: dict[str, float] = {"save_ms": 0.0, "restore_ms": 0.0, "snapshot_bytes": 0.0}
        self.switch_seconds = 0.0

    # ------------------------------------------------------------- queries
    def holder(self, seq: int) -> LlamaCppGeneration | None:
        ref = self._slots[seq]
        return ref() if ref is not None else None

    def holds(self, g: LlamaCppGeneration) -> bool:
        """`g` is in its sequence, with the KV it left there."""
        return g.seq is not None and self.holder(g.seq) is g

    def count(self) -> int:
        return sum(1 for ref in self._slots if ref is not None and ref() is not None)

    def touch(self, seq: int, step_no: int) -> None:
        self._last_active[seq] = step_no

    def clear(self) -> None:
        self._slots = [None] * self.max_batch

    # ------------------------------------------------------------- moves
    def admit(self, g: LlamaCppGeneration, busy: set[int]) -> bool:
        """Give `g` a sequence (evicting an idle resident if needed) and load its KV; False when every
        sequence belongs to a generation in `busy` (uids)."""
        free = None
        for s, ref in enumerate(self._slots):
            if ref is None or ref() is None:
                if ref is not None:  # its generation died without being released: free its cells
                    self.kv.forget(s)
                    self._slots[s] = None
                free = s
                break
        if free is None:
            idle = [(self._last_active.get(s, 0), s) for s, ref in enumerate(self._slots)
                    if ref is not None and (r := ref()) is not None and r.uid not in busy]
            if not idle:
                return False  # every sequence is generating: wait for one to finish or yield
            _, free = min(idle)
            victim = self.holder(free)
            assert victim is not None
            if not victim.done and victim.kv_state is None and victim.n_evaluated > 0:
                log.debug("auto-suspending gen %d to run gen %d", victim.uid, g.uid)
                self.suspend(victim)
            self.unbind(victim)
        self._load(g, free)
        return True

    def unbind(self, g: LlamaCppGeneration) -> None:
        """Take `g` out of its sequence, freeing the cells (its snapshot, if any, stays with it)."""
        s = g.seq
        if s is not None and self.holder(s) is g:
            self.kv.forget(s)
            self._slots[s] = None
        g.seq = None

    def suspend(self, g: LlamaCppGeneration) -> None:
        """Copy a resident generation's KV into it (idempotent; a no-op for non-resident ones).

        The sequence keeps the same KV afterwards, so resuming the same
        generation before anyone needs its sequence skips the restore.
        """
        if g.seq is None or self.holder(g.seq) is not g or g.done or g.kv_state is not None \
                or g.n_evaluated == 0:
            return
        t0 = time.perf_counter()
        g.kv_state = self.kv.save(g.seq)
        self.timings["save_ms"] = (time.perf_counter() - t0) * 1e3
        self.switch_seconds += self.timings["save_ms"] / 1e3
        self.timings["snapshot_bytes"] = float(len(g.kv_state))
        log.debug("suspended gen %d: %d bytes in %.3f ms", g.uid, len(g.kv_state), self.timings["save_ms"])

    def _load(self, g: LlamaCppGeneration, s: int) -> None:
        kv = self.kv
        kv.vacate(s)
        g.seq = s
        self._slots[s] = weakref.ref(g)
        if g.kv_state is not None:
            t0 = time.perf_counter()
            ok = kv.restore(g.kv_state, s, g.n_evaluated)
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
        g.ensure_grammar(kv.vocab)
        if kv.exact and g.n_evaluated > 0:
            kv.guard(s)

    def reuse_prefix(self, g: LlamaCppGeneration) -> None:
        """Start a fresh prompt from the longest cached prefix, if any.

        Called when the prompt's prefill starts, not when the generation gets its
        sequence: prompts are prefilled one at a time, so agents that arrive together
        with the same system prompt find it cached by the first one.
        """
        g.prefix_checked = True
        s = g.seq
        if self.cache is None or s is None:
            return
        hit = self.cache.lookup(g.prompt_tokens)
        if hit is None:
            return
        entry, usable = hit
        t0 = time.perf_counter()
        if not self.kv.restore(entry.payload, s, entry.length):
            log.warning("gen %d: cached prefix did not fit in the KV cache; prefilling it", g.uid)
            return
        if usable < entry.length:
            self.kv.forget(s, usable)
        g.n_evaluated = usable
        g.usage.cached_prompt_tokens = usable
        self.timings["prefix_restore_ms"] = (time.perf_counter() - t0) * 1e3
        if self.kv.exact:
            self.kv.guard(s)
