"""SIMULATED backend: no model, fixed seconds per token. Labelled as such everywhere.

It exists to exercise scheduling at scales the real model cannot reach on two
cores (hundreds of agents): `aios bench llm --backend sim`. Its "text" is a
deterministic sequence of words, so exact-resume logic still has something to
check, but nothing here says anything about a real model's output.

Concurrency (also simulated): with `max_concurrency = M` the core runs up to M
generations at once, and while B of them are inside `advance` each token
takes `seconds_per_token * (1 + (B - 1) * c)`, with c chosen so that B = M
gives an aggregate speed-up of `batch_speedup` over one at a time (default M:
a remote server whose throughput grows with load, like a vLLM or llama.cpp
server with parallel slots).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from aios.managers.llm.types import (
    SAMPLING_DEFAULTS,
    Backend,
    BackendError,
    ChatArgs,
    ChatMessage,
    ChatResult,
    Generation,
    Usage,
)


class SimGeneration(Generation):
    def __init__(self, args: ChatArgs, prompt_tokens: int) -> None:
        self.args = args
        self.text = ""
        self.usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=0)
        self.finish_reason = None

    def snapshot_bytes(self) -> int:
        return 256 + 2 * len(self.text)


class SimBackend(Backend):
    """SIMULATED LLM: sleeps `seconds_per_token` per token; not a model. It accepts every sampling
    option (its words do not depend on them) and runs the same argument checks as the real backends
    (they live in ChatArgs)."""

    sampling = frozenset(SAMPLING_DEFAULTS)

    def __init__(self, seconds_per_token: float = 0.01, name: str = "sim", n_ctx: int = 1 << 20, *,
                 max_concurrency: int = 1, batch_speedup: float | None = None) -> None:
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) \
                or not 1 <= max_concurrency <= 1024:
            raise ValueError(f"llm option max_concurrency must be an integer from 1 to 1024, not {max_concurrency!r}")
        speedup = float(max_concurrency if batch_speedup is None else batch_speedup)
        if not 1.0 <= speedup <= max_concurrency:
            raise ValueError(f"llm option batch_speedup must be between 1 and max_concurrency ({max_concurrency}), "
                             f"not {batch_speedup!r}")
        self.seconds_per_token = seconds_per_token
        self.models = [name]
        self.name = name
        self.n_ctx = n_ctx
        self.max_concurrency = max_concurrency
        self.batch_speedup = speedup
        # per-token slowdown for each extra concurrent generation
        self._c = (max_concurrency / speedup - 1) / (max_concurrency - 1) if max_concurrency > 1 else 0.0
        self._active = 0
        self._lock = threading.Lock()

    def start(self, args: ChatArgs) -> SimGeneration:
        prompt = sum(len(m.content.split()) + 4 for m in args.messages)
        if prompt + args.max_tokens > self.n_ctx:
            raise BackendError("INVALID_ARGUMENT", f"prompt ({prompt}) + max_tokens ({args.max_tokens}) exceeds "
                                                   f"the context ({self.n_ctx})")
        return SimGeneration(args, prompt)

    def advance(self, gen: Generation, max_tokens: int | None, on_text: Callable[[str], None]) -> None:
        assert isinstance(gen, SimGeneration)
        with self._lock:
            self._active += 1
        try:
            self._advance(gen, max_tokens, on_text)
        finally:
            with self._lock:
                self._active -= 1

    def _advance(self, gen: SimGeneration, max_tokens: int | None, on_text: Callable[[str], None]) -> None:
        n = 0
        end = time.perf_counter()
        while not gen.done and (max_tokens is None or n < max_tokens):
            i = gen.usage.completion_tokens
            end += self.seconds_per_token * (1.0 + (self._active - 1) * self._c)
            delay = end - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            piece = f" w{i}"
            gen.text += piece
            gen.usage.completion_tokens += 1
            n += 1
            on_text(piece)
            if gen.usage.completion_tokens >= gen.args.max_tokens:
                gen.finish_reason = "length"

    embeddings = True

    def embed(self, texts: list[str]) -> list[list[float]]:
        """SIMULATED embeddings: hashed bags of words (64 dimensions), not a model's. Texts that share
        words get similar vectors, which is enough to exercise search by meaning end to end."""
        import hashlib
        import math
        out = []
        for text in texts:
            vec = [0.0] * 64
            for word in text.lower().split():
                h = hashlib.blake2b(word.strip(".,;:!?\"'()").encode(), digest_size=4).digest()
                vec[h[0] % 64] += 1.0 if h[1] & 1 else -1.0
            norm = math.sqrt(sum(v * v for v in vec)) or 1.0
            out.append([v / norm for v in vec])
        return out

    def suspend(self, gen: Generation) -> None:
        """Nothing lives outside the object."""

    def stats(self) -> dict[str, Any]:
        return {"simulated": True, "max_concurrency": self.max_concurrency, "batch_speedup": self.batch_speedup,
                "running": self._active}

    def finish(self, gen: Generation) -> ChatResult:
        return ChatResult(message=ChatMessage(role="assistant", content=gen.text.strip()),
                          finish_reason=gen.finish_reason or "stop", usage=gen.usage, model=self.name)
