"""SIMULATED backend: no model, fixed seconds per token. Labelled as such everywhere.

It exists to exercise scheduling at scales the real model cannot reach on two
cores (hundreds of agents): `aios bench llm --backend sim`. Its "text" is a
deterministic sequence of words, so exact-resume logic still has something to
check, but nothing here says anything about a real model's output.
"""
from __future__ import annotations

import time
from typing import Callable

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

    def __init__(self, seconds_per_token: float = 0.01, name: str = "sim", n_ctx: int = 1 << 20) -> None:
        self.seconds_per_token = seconds_per_token
        self.models = [name]
        self.name = name
        self.n_ctx = n_ctx

    def start(self, args: ChatArgs) -> SimGeneration:
        prompt = sum(len(m.content.split()) + 4 for m in args.messages)
        if prompt + args.max_tokens > self.n_ctx:
            raise BackendError("INVALID_ARGUMENT", f"prompt ({prompt}) + max_tokens ({args.max_tokens}) exceeds "
                                                   f"the context ({self.n_ctx})")
        return SimGeneration(args, prompt)

    def advance(self, gen: Generation, max_tokens: int | None, on_text: Callable[[str], None]) -> None:
        assert isinstance(gen, SimGeneration)
        n = 0
        end = time.perf_counter()
        while not gen.done and (max_tokens is None or n < max_tokens):
            i = gen.usage.completion_tokens
            end += self.seconds_per_token
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

    def finish(self, gen: Generation) -> ChatResult:
        return ChatResult(message=ChatMessage(role="assistant", content=gen.text.strip()),
                          finish_reason=gen.finish_reason or "stop", usage=gen.usage, model=self.name)
