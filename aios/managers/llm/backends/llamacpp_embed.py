"""Embeddings from the embedded model: a second, small llama.cpp context on the same weights.

The generation context cannot produce embeddings (it keeps per-token logits
and a KV pool sized for chat), so `llm.embed` uses its own context created on
first use, with `embeddings = True`. It shares the loaded model (no second
copy of the weights) and runs on the engine's decode thread between two
decode steps, so embedding never races a generation for the CPU or the model.

The vector is the mean of the last hidden states of a text's tokens (mean
pooling), computed here rather than by llama.cpp's pooling: an embeddings
context keeps the logits of *every* token of a batch, 262k floats each for
Gemma, so handing llama.cpp a 300-token text in one batch grew the process by
622 MB (measured). Fed `CHUNK` tokens per decode call instead, with the KV
cache carrying the context across calls (so attention is the same as in one
call), the same text grows it by 89 MB (logits buffer, compute buffers and
KV cache together) and the result is the same mean.

Mean pooling of Gemma 3 270M's hidden states is a small model's notion of
meaning, but a real one: on six short notes and six paraphrased queries
("space travel" for "The rocket launched into orbit"), it ranked the right
note first for five or six of them, depending on llama.cpp's context settings
("feline pet" is a near tie between the cat note and the dog note); the vectors
agree with llama-cpp-python's own `Llama.embed` (mean pooling) to a cosine of
0.9997. About 40 ms per short text on two cores, about 320 tokens/s beyond.

A text longer than `WINDOW` tokens is embedded window by window and the
windows' vectors averaged, weighted by their token counts: nothing is cut.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

log = logging.getLogger("aios.llm.llamacpp")

#: tokens that attend to each other in one embedding (a note or a memory entry fits easily)
WINDOW = 1024
#: tokens per decode call: bounds the per-token logits buffer (32 x 262k floats = 33 MB)
CHUNK = 32


class Embedder:
    """Mean-pooled embeddings from a model already loaded for chat. Not thread-safe: the engine's
    decode thread is its only caller."""

    def __init__(self, lib: Any, model: Any, n_threads: int, tokenize: Callable[[str], list[int]]) -> None:
        params = lib.llama_context_default_params()
        params.n_ctx = WINDOW
        params.n_batch = params.n_ubatch = CHUNK
        params.n_seq_max = 1
        params.embeddings = True
        params.pooling_type = lib.LLAMA_POOLING_TYPE_NONE  # per-token states: we pool across chunks
        params.n_threads = params.n_threads_batch = n_threads
        ctx = lib.llama_init_from_model(model, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create the embeddings context")
        self._lib = lib
        self._ctx = ctx
        self._mem = lib.llama_get_memory(ctx)
        self._tokenize = tokenize
        self.dimensions = int(lib.llama_model_n_embd(model))
        self._batch = lib.llama_batch_init(CHUNK, 0, 1)

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [self._embed_one(t) for t in texts]

    def _embed_one(self, text: str) -> list[float]:
        tokens = self._tokenize(text) or self._tokenize(" ")
        total = np.zeros(self.dimensions, dtype=np.float64)
        for start in range(0, len(tokens), WINDOW):
            window = tokens[start:start + WINDOW]
            total += self._pass(window) * len(window)
        norm = float(np.linalg.norm(total)) or 1.0
        return (total / norm).tolist()  # unit length: cosine similarity is a dot product

    def _pass(self, tokens: list[int]) -> np.ndarray:
        """The mean hidden state of `tokens` (at most WINDOW), attending to each other causally."""
        lib, b = self._lib, self._batch
        lib.llama_memory_clear(self._mem, True)
        total = np.zeros(self.dimensions, dtype=np.float64)
        for start in range(0, len(tokens), CHUNK):
            chunk = tokens[start:start + CHUNK]
            b.n_tokens = len(chunk)
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = True  # every token's state is part of the mean
            rc = lib.llama_decode(self._ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} while embedding")
            ptr = lib.llama_get_embeddings(self._ctx)
            if not ptr:
                raise RuntimeError("llama.cpp returned no embeddings")
            total += np.ctypeslib.as_array(ptr, shape=(len(chunk), self.dimensions)).sum(axis=0)
        return total / len(tokens)

    def close(self) -> None:
        self._lib.llama_batch_free(self._batch)
        self._lib.llama_free(self._ctx)
