"""One embedded llama.cpp generation: all its state, and how each token it takes becomes text.

Everything a step depends on lives here (KV snapshot while suspended, tokens,
RNG, text-stream state), so a suspended generation is plain data: the core can
keep it, pickle it to disk, and resume it bit for bit.  The grammar sampler (a
C object) and the sequence it occupies are transient and dropped on pickling.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Literal

import numpy as np

from aios.managers.llm.backends import prompting
from aios.managers.llm.backends.grammar import Grammar
from aios.managers.llm.types import ChatArgs, Generation, Usage

Mode = Literal["text", "json", "tools"]

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

    # ------------------------------------------------------------ grammar
    @property
    def grammar(self) -> Grammar | None:
        return self._grammar

    def ensure_grammar(self, vocab: Any) -> None:
        """Give a constrained generation its grammar sampler back (after a resume from plain data)."""
        if self.mode != "text" and self._grammar is None:
            self._grammar = Grammar.rebuilt(vocab, self.gbnf or "", self.tokens)

    def drop_grammar(self) -> None:
        if self._grammar is not None:
            self._grammar.free()
            self._grammar = None

    # -------------------------------------------------------------- text
    def take(self, tok: int, piece: bytes, on_text: Callable[[str], None]) -> None:
        """Append a sampled token (not an end-of-generation one) whose text is `piece`; stream the text
        that is final through `on_text`, and decide whether the generation is done."""
        self.tokens.append(tok)
        self.pending = tok
        self.usage.completion_tokens += 1
        if self._grammar is not None:
            self._grammar.accept(tok)
        text = self.utf8.feed(piece)
        if text:
            self.raw += text
            if self.mode != "tools":  # a tool call is returned as structure, not streamed as text
                out = self.stream.feed(text)
                if out:
                    self.text += out
                    on_text(out)
        if self.stream.stopped:
            self.finish_reason = "stop"
        elif self.mode in ("json", "tools") and prompting.json_complete(self.raw):
            self.end("stop", on_text)
        elif len(self.tokens) >= self.args.max_tokens:
            self.end("length", on_text)

    def end(self, reason: Literal["stop", "length"], on_text: Callable[[str], None]) -> None:
        """Finish: flush the text held back (partial UTF-8, a possible stop string's start)."""
        tail = self.utf8.flush()
        if tail:
            self.raw += tail
        if self.mode != "tools":
            out = self.stream.feed(tail) if tail else ""
            if not self.stream.stopped:
                out += self.stream.flush()
            if out:
                self.text += out
                on_text(out)
        self.finish_reason = reason

    # ---------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_grammar"] = None
        state["seq"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
