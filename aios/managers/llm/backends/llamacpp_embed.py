"""Embeddings from the embedded model: a second, small llama.cpp context on the same weights.

The generation context cannot produce embeddings (it keeps per-token logits
and a KV pool sized for chat), so `llm.embed` uses its own context created on
first use: `embeddings = True`, mean pooling, `WINDOW` tokens. It shares the
loaded model (no second copy of the weights; the context adds ~10 MB) and runs
on the engine's decode thread between two decode steps, so embedding never
races a generation for the CPU or the model.

Mean pooling of Gemma 3 270M's last hidden states is a small model's notion of
meaning, but a real one: on six short notes and six paraphrased queries
("space travel" for "The rocket launched into orbit"), it ranked the right
note first for five or six of them, depending on llama.cpp's context settings
("feline pet" is a near tie between the cat note and the dog note); the vectors
agree with llama-cpp-python's own `Llama.embed` to a cosine of 0.998. About
40 ms per short text on two cores; prefill speed (~600 tokens/s) beyond that.

A text longer than the window is embedded window by window and the windows'
vectors averaged, weighted by their token counts: nothing is silently cut.
"""

from __future__ import annotations

import ctypes
import logging
import math
from typing import Any, Callable

log = logging.getLogger("aios.llm.llamacpp")

#: tokens per embedding pass (a note or a memory entry fits; longer texts are split)
WINDOW = 512


class Embedder:
    """Mean-pooled embeddings from a model already loaded for chat. Not thread-safe: the engine's
    decode thread is its only caller."""

    def __init__(self, lib: Any, model: Any, n_threads: int, tokenize: Callable[[str], list[int]]) -> None:
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = WINDOW
        params.n_seq_max = 1
        params.embeddings = True
        params.pooling_type = lib.LLAMA_POOLING_TYPE_MEAN
        params.n_threads = params.n_threads_batch = n_threads
        ctx = lib.llama_init_from_model(model, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create the embeddings context")
        self._lib = lib
        self._ctx = ctx
        self._mem = lib.llama_get_memory(ctx)
        self._tokenize = tokenize
        self.dimensions = int(lib.llama_model_n_embd(model))
        self._batch = lib.llama_batch_init(WINDOW, 0, 1)

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [self._embed_one(t) for t in texts]

    def _embed_one(self, text: str) -> list[float]:
        tokens = self._tokenize(text) or self._tokenize(" ")
        total = [0.0] * self.dimensions
        for start in range(0, len(tokens), WINDOW):
            window = tokens[start:start + WINDOW]
            vec = self._pass(window)
            for i, v in enumerate(vec):
                total[i] += v * len(window)
        norm = math.sqrt(sum(v * v for v in total)) or 1.0
        return [v / norm for v in total]  # unit length: cosine similarity is a dot product

    def _pass(self, tokens: list[int]) -> list[float]:
        lib, b = self._lib, self._batch
        lib.llama_memory_clear(self._mem, True)
        b.n_tokens = len(tokens)
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = True  # every token contributes to the pooled output
        rc = lib.llama_decode(self._ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} while embedding")
        ptr = lib.llama_get_embeddings_seq(self._ctx, 0)
        if not ptr:
            raise RuntimeError("llama.cpp returned no pooled embedding")
        return list(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float * self.dimensions)).contents)

    def close(self) -> None:
        self._lib.llama_batch_free(self._batch)
        self._lib.llama_free(self._ctx)
