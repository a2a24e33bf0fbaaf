"""Constrained output for the embedded backend: JSON schemas compiled to GBNF, and llama.cpp's grammar sampler.

A request with a JSON schema (or with tools: the tool-call schema) gets a GBNF
grammar, compiled once per distinct schema (`GbnfCache`).  Each generation owns
one `Grammar`, a llama.cpp grammar sampler (a C object) that is told every
token the generation takes.  Its C state cannot be pickled, so a suspended
generation drops it and `Grammar.rebuilt` replays the generated tokens into a
fresh one, which reproduces it exactly.

The engine does not use llama.cpp's sampler chain (it samples from its own
copy of the logits, see sampling.py); it asks the grammar only which candidate
tokens are allowed, through `GrammarFilter`, whose candidate buffer is sized
for the whole vocabulary but usually holds just one or a few tokens.
"""
from __future__ import annotations

import ctypes
import json
from collections.abc import Iterable
from typing import Any

import numpy as np

from aios.managers.llm.types import BackendError

#: distinct schemas whose grammar is kept; the cache is emptied when it grows past this
GBNF_CACHE_SIZE = 64


class Grammar:
    """Owns one llama.cpp grammar sampler (C object); freed with the Python object."""

    def __init__(self, vocab: Any, gbnf: str) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.ptr = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
        if not self.ptr:
            raise BackendError("INVALID_ARGUMENT", "could not compile the output grammar for this schema")
        self.n_accepted = 0

    @classmethod
    def rebuilt(cls, vocab: Any, gbnf: str, tokens: Iterable[int]) -> Grammar:
        """A grammar in the state it reaches after `tokens` (for a generation resumed without one)."""
        gram = cls(vocab, gbnf)
        for t in tokens:
            gram.accept(t)
        return gram

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


class GrammarFilter:
    """Asks a grammar which candidate tokens it allows; one per engine, used on its decode thread only."""

    def __init__(self, lib: Any, n_vocab: int) -> None:
        self._lib = lib
        dt = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
        self._cand = np.zeros(n_vocab, dtype=dt)
        self._cand_arr = lib.llama_token_data_array(
            data=self._cand.ctypes.data_as(lib.llama_token_data_p), size=n_vocab, selected=-1, sorted=False)

    def allowed(self, gram: Grammar, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Run the grammar over candidate tokens `ids` (with their `logits`); returns the mask of allowed ones."""
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


def schema_to_grammar(schema: dict[str, Any]) -> str:
    """GBNF for a JSON schema, or BackendError INVALID_ARGUMENT if the schema is unusable.

    The converter's string rule admits raw control characters, which is not JSON;
    we tighten it so every completion is valid for `json.loads` in strict mode.
    """
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if not isinstance(schema, dict):
        raise BackendError("INVALID_ARGUMENT", "json_schema must be a JSON object")
    import jsonschema  # a declared dependency: checks the schema itself, with messages a person can act on

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except Exception as e:  # jsonschema.SchemaError
        raise BackendError("INVALID_ARGUMENT", f"malformed JSON schema: {getattr(e, 'message', e)}") from None
    try:
        gbnf = json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # the converter raises assertion/attribute errors on bad schemas
        raise BackendError("INVALID_ARGUMENT", f"unsupported or malformed JSON schema: {e}") from None
    return gbnf.replace('char ::= [^"\\\\]', 'char ::= [^"\\\\\\x7F\\x00-\\x1F]')


class GbnfCache:
    """Compiled grammars by schema: agents send the same schema (or tool list) again and again."""

    def __init__(self, size: int = GBNF_CACHE_SIZE) -> None:
        self.size = size
        self._by_schema: dict[str, str] = {}

    def get(self, schema: dict[str, Any]) -> str:
        key = json.dumps(schema, sort_keys=True)
        gbnf = self._by_schema.get(key)
        if gbnf is None:
            gbnf = schema_to_grammar(schema)
            if len(self._by_schema) > self.size:
                self._by_schema.clear()
            self._by_schema[key] = gbnf
        return gbnf
