"""What every manager process shares (after ZeroMQ's Paranoid Pirate worker).

A manager is written by declaring its ops, never by touching sockets:

    class EchoArgs(BaseModel):
        text: str

    class EchoManager(Manager):
        service = "echo"
        capacity = 4

        class Options(BaseModel):          # its settings, validated at aios-start
            shout: bool = False

        @op(EchoArgs, idempotent=True)
        def echo(self, args: EchoArgs, ctx: RequestContext) -> dict:
            return {"text": args.text.upper() if self.options.shout else args.text}

This module is the authoring API: everything a manager author imports (`op`,
`Manager`, `RequestContext`, `OpError`, `Preempt`, `Deferred`). The machinery
behind it is in two parts, as the scheduler's is: the core
(`manager_core.py`: dispatch, validation, inline batches, cancel, calls;
no sockets, unit-tested through `tests/support/manager_harness.py`) and the
socket shell (`shell.py`: the DEALER under an unguessable routing id,
READY(service, capacity, incarnation, ops, targets), heartbeats, the hand-off
from pool threads). Together they validate each request's body with the
op's pydantic model, run handlers on a pool of `capacity` threads (so the
socket loop keeps heartbeating while a long handler runs), and turn
exceptions into error replies. Handlers may stream partial
replies (`ctx.partial`), hand a preemptible request back to the scheduler by
returning `Preempt`, and call other services on behalf of the same agent
(`ctx.call`), which the scheduler queues and charges like the agent's own.

Quick ops that never block may be declared `inline`: they run on the socket
thread itself, in arrival order, with no hand-off to the pool (a hand-off and
the reply's way back cost a small op about as much as its work: the storage
manager measured 2,300 small writes/s through the pool, 3,400 inline). The
requests that arrive together form a batch, closed by the `end_batch` hook
before their replies go out; an inline handler may return `Deferred` to be
answered only then, which is how the storage manager commits the writes of a
batch in one transaction (4,600 writes/s). Upkeep that should not delay an
answer goes in the `housekeeping` hook: it runs on the socket thread after a
batch's replies went out, and when the socket was quiet for a poll interval
(the storage manager applies its full-text index log there).
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aios.config import Config, ManagerSpec
from aios.protocol import ErrorCode, Status
from aios.rundir import RunDir

if TYPE_CHECKING:
    from aios.managers.manager_core import ManagerCore

log = logging.getLogger("aios.manager")

#: set to 1 in a kernel's environment to give every manager the `test_hold_batch` op (tests only)
TEST_HOOKS_ENV = "AIOS_TEST_HOOKS"


class OpError(Exception):
    """Raise from a handler to answer with a specific error code (`retryable` overrides the code's
    usual advice for this answer: see `ErrorCode`)."""

    def __init__(self, code: ErrorCode | str, message: str, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True)
class Preempt:
    """Returned by a preemptible handler whose slice ran out: re-queue the request.

    `affinity` says this manager keeps the request's saved context, so the
    scheduler must bring it back here.
    """

    affinity: bool = True


@dataclass(frozen=True)
class OpSpec:
    name: str
    func: Callable[..., Any]
    args_model: type[BaseModel] | None
    idempotent: bool
    preemptible: bool
    inline: bool | Callable[[Any], bool] = False


@dataclass(frozen=True)
class Deferred:
    """Returned by an inline handler whose answer is known only once its batch ends.

    Once the batch's last request is handled, the base calls the manager's
    `end_batch(tokens)` with the `token` of each deferred request, then
    `finish()` for each; what `finish` returns (or raises) is the reply.
    """

    finish: Callable[[], Any]
    token: Any = None


def op(args_model: type[BaseModel] | None = None, *, name: str | None = None,
       idempotent: bool = False, preemptible: bool = False,
       inline: bool | Callable[[Any], bool] = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a method as a syscall handler.

    idempotent: safe to run again if its manager dies mid-way (the scheduler re-queues it).
    preemptible: the handler honours `ctx.slice` and may return `Preempt`.
    inline: run on the socket thread, never on the pool: only for handlers that take well
        under a millisecond or so and never wait (no `ctx.call`, no `Preempt`); may return `Deferred`.
        A function of the validated arguments decides per request (e.g. small writes inline,
        large ones on the pool).
    """
    if inline is not False and preemptible:
        raise ValueError("an inline op cannot be preemptible: it runs on the socket thread")

    def mark(func: Callable[..., Any]) -> Callable[..., Any]:
        func.__aios_op__ = OpSpec(name or func.__name__, func, args_model, idempotent, preemptible,  # type: ignore[attr-defined]
                                  inline)
        return func

    return mark


def request_key(rid: str, client: bytes) -> str:
    """A request's identity on a manager (ids are unique per caller connection); a string,
    so managers can use it to name what they keep for the request."""
    return rid + "\0" + client.hex()


@dataclass
class RequestContext:
    """What a handler knows about the request it serves."""

    id: str
    client: bytes
    agent: str
    op: str
    attempt: int
    resume: bool
    slice: int | None
    deadline: float | None
    target: str | None
    caller: str | None = None  # service of the manager that made this call; None when an agent did
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: int = 0  # service units consumed in this run (LLM tokens), reported to the policy
    _core: "ManagerCore | None" = field(default=None, repr=False)

    def partial(self, body: Any) -> None:
        """Stream a partial reply to the caller now."""
        if self._core is not None:
            self._core.post(self, Status.PARTIAL.value, body, final=False)

    def call(self, service: str, op: str, /, *, target: str | None = None, timeout: float | None = None,
             idempotent: bool = False, **args: Any) -> Any:
        """Call another service on behalf of this request's agent; return its result.

        The call goes through the scheduler (queued, scheduled and charged like
        the agent's own), within this request's deadline. Failures raise
        `OpError` with the callee's code, so an unhandled one becomes this
        request's error. A call that would form a cycle (a service waiting on
        itself) is refused with CALL_CYCLE. `idempotent=True` lets it be
        re-sent when no answer comes and retried after a retryable error,
        like an agent's idempotent call.
        """
        if self._core is None:
            raise OpError(ErrorCode.INTERNAL, "this request context cannot make calls")
        return self._core.service_call(self, service, op, args, target, timeout, idempotent)

    @property
    def key(self) -> str:
        return request_key(self.id, self.client)


class _HoldArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(ge=1, le=10_000)


class _NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Manager:
    """Base class of every manager. Subclasses set `service`, `capacity` and declare ops.

    `Options` is the pydantic model of the manager's settings (the options of
    its configuration entry); `self.options` is the validated instance.
    `targets`, `default_target`, `limits` and `idempotent_targets` are what
    READY announces (set them in `setup`): the named resources this manager
    serves, whether it serves requests that name none, per-target concurrency
    limits, and the targets whose requests are safe to repeat whatever the op.
    """

    service: ClassVar[str]
    capacity: ClassVar[int] = 1
    #: threads for the ops that run on the pool; None: `capacity` (every request in hand may need one).
    #: A manager whose common ops run inline can hold more requests than it needs threads.
    pool_threads: ClassVar[int | None] = None
    Options: ClassVar[type[BaseModel]] = _NoOptions

    def __init__(self, name: str, run_dir: RunDir, config: Config, options: BaseModel | None = None,
                 capacity: int | None = None) -> None:
        self.name = name
        self.run_dir = run_dir
        self.config = config
        self.options: Any = options if options is not None else self.Options()
        if capacity is not None:
            self.capacity = capacity  # type: ignore[misc]
        self.log = logging.getLogger(f"aios.{name}")
        self.incarnation = f"{os.getpid()}-{int(time.time() * 1000)}"
        # An unguessable routing id per incarnation: nobody can claim it to receive this manager's work.
        self.identity = f"{name}.{secrets.token_hex(8)}".encode()
        self.ops: dict[str, OpSpec] = self.op_specs()
        self.targets: list[str] = []
        self.default_target = False
        self.limits: dict[str, int] = {}
        self.idempotent_targets: list[str] = []
        self.health = "ok"
        self.health_detail = ""
        self._stopping = threading.Event()
        self._core: "ManagerCore | None" = None
        if os.environ.get(TEST_HOOKS_ENV) == "1":
            self.ops["test_hold_batch"] = OpSpec("test_hold_batch", Manager._test_hold_batch, _HoldArgs,
                                                 idempotent=False, preemptible=False, inline=True)

    def _test_hold_batch(self, args: _HoldArgs, ctx: "RequestContext") -> dict[str, int]:
        """Test hook: hold the next batch open until `n` requests are in it (`ManagerCore.hold_next_batch`)."""
        assert self._core is not None
        self._core.hold_next_batch(args.n)
        return {"holding": args.n}

    @classmethod
    def default_memory_limit_mb(cls, options: Any, config: Config) -> int | None:
        """The resident memory above which the supervisor kills and restarts this manager, when its
        configuration sets none (`memory_limit_mb`). None: no limit."""
        return None

    @classmethod
    def op_specs(cls) -> dict[str, OpSpec]:
        specs: dict[str, OpSpec] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                spec = getattr(attr, "__aios_op__", None)
                if isinstance(spec, OpSpec):
                    specs[spec.name] = spec
        return specs

    # ------------------------------------------------------------- hooks
    def setup(self) -> None:
        """Acquire resources (load a model, open a database) before READY."""

    def teardown(self) -> None:
        """Release resources on the way out."""

    def on_cancel(self, ctx: RequestContext) -> None:
        """A running request was cancelled (agent gone, deadline): `ctx.cancelled` is already set."""

    def end_batch(self, tokens: list[Any]) -> None:
        """The requests that arrived together have all been handled: finish what inline handlers
        deferred (e.g. commit their writes); `tokens` are their `Deferred.token`s.

        Runs on the socket thread, before any `Deferred` is finished; a handler that ran on the
        pool and returned `Deferred` gets a batch of its own, closed on its pool thread. An
        exception here is logged, and each deferred request's `finish` decides its reply.
        (Closing batches on a thread of their own, so that the socket thread reads the next
        batch meanwhile, measured slower: 3,500-3,800 small writes/s against 4,700, the two
        threads handing the GIL to each other costing more than the overlap gains.)"""

    def on_forget(self, key: str) -> None:
        """A request that is not running here was cancelled: drop anything kept for it
        (e.g. a preempted generation's saved context). `key` is `RequestContext.key`."""

    def housekeeping(self, idle: bool) -> None:
        """Deferred upkeep, on the socket thread: after each batch of requests once their replies
        have gone out (`idle` False: keep it short, the next batch waits meanwhile), and when no
        message came for a poll interval (`idle` True). An exception here is logged."""

    # ------------------------------ the kernel around it: configuration rules, the standard `status` op
    @classmethod
    def check_kernel(cls, spec: ManagerSpec, options: Any, config: Config) -> list[str]:
        """Problems with how this manager fits the rest of the configuration, for rules that span
        managers (memory keeps its entries in storage, so `[storage]` must be on): one line each,
        naming its place in the file (`spec.where`). Run for every configured manager once its
        options validated (`aios.managers.runner.resolve_managers`: `aios config check`, start).
        Default: none."""
        return []

    @classmethod
    def complete_options(cls, spec: ManagerSpec, options: Any, config: Config) -> Any:
        """The validated options completed from the whole configuration, decided once where every
        manager is visible (which LLM core serves requests that name no model), so that a running
        manager never reads its siblings' settings. Default: unchanged."""
        return options

    class StatusArgs(BaseModel):
        """`per_target`: the scheduler's view of this manager's targets ({target: {limit, running,
        queued}}); `aios status` passes it in, as only the scheduler knows what is queued."""

        model_config = ConfigDict(extra="forbid")
        per_target: dict[str, dict[str, int]] | None = None

    @op(StatusArgs, idempotent=True)
    def status(self, args: "Manager.StatusArgs", ctx: RequestContext) -> dict[str, Any]:
        """The op every manager answers, for `aios status -v`: its figures (`status_figures`, with
        `per_target` when given) and "summary", the one line that describes them (`status_line`)."""
        figures = dict(self.status_figures())
        if args.per_target is not None:
            figures["per_target"] = args.per_target
        try:
            summary = self.status_line(figures)
        except (KeyError, TypeError, ValueError, AttributeError):  # figures of an unexpected shape
            self.log.exception("status_line failed; showing the generic line")
            summary = Manager.status_line(self, figures)
        return {**figures, "summary": summary}

    def status_figures(self) -> dict[str, Any]:
        """This manager's own figures (`aios status --json -v`); never an agent's data. Default: none."""
        return {}

    def status_line(self, figures: dict[str, Any]) -> str:
        """`figures` as one line: what an operator needs at a glance, not every counter."""
        return f"{self.service} service, capacity {self.capacity}; ops: {', '.join(sorted(self.ops))}"

    # ------------------------------------------------------------ running
    def stop(self) -> None:
        """Ask the serving loop (`aios.managers.shell.ManagerShell.run`) to finish and tear down."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def pool(self) -> Executor:
        """The threads handlers run on (while serving): for work that must not run on the socket thread."""
        if self._core is None:
            raise RuntimeError(f"{self.name} is not serving: it has no pool yet")
        return self._core.pool

    def set_health(self, health: str, detail: str = "") -> None:
        """Report "ok" or "degraded" (with why) to the scheduler; `aios status` shows it."""
        if (health, detail) != (self.health, self.health_detail):
            self.health, self.health_detail = health, detail
            if self._core is not None:
                self._core.out.send(self._core.ready_message())


def describe_validation(exc: ValidationError) -> str:
    """Pydantic's errors as one line: `field.path: problem; ...` (first five)."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ())) or "arguments"
        msg = str(err.get("msg"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        parts.append(f"{where}: {msg}")
    more = len(exc.errors()) - 5
    return "invalid arguments: " + "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
