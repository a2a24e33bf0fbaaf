"""Unit tests of the manager core (`aios.managers.manager_core`), driven through the manager harness:
no sockets, no processes; typed messages in, typed messages out."""
from __future__ import annotations

import threading
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from aios import messages
from aios.managers.base import Deferred, Manager, OpError, Preempt, RequestContext, op, request_key
from aios.protocol import ErrorCode
from tests.support.manager_harness import AGENT, ManagerHarness


class TextArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = ""
    fail: bool = False


class Probe(Manager):
    """A small manager whose ops exercise each path of the core."""

    service = "probe"
    capacity = 4

    def setup(self) -> None:
        self.batches: list[list[Any]] = []
        self.cancelled: list[str] = []
        self.forgotten: list[str] = []
        self.release = threading.Event()

    def end_batch(self, tokens: list[Any]) -> None:
        self.batches.append(list(tokens))

    def on_cancel(self, ctx: RequestContext) -> None:
        self.cancelled.append(ctx.id)

    def on_forget(self, key: str) -> None:
        self.forgotten.append(key)

    @op(TextArgs, inline=True)
    def echo(self, args: TextArgs, ctx: RequestContext) -> dict:
        return {"text": args.text, "thread": threading.current_thread().name}

    @op(TextArgs, inline=lambda args: not args.fail)
    def tally(self, args: TextArgs, ctx: RequestContext) -> Deferred:
        def finish() -> dict:
            if args.text == "boom":
                raise OpError(ErrorCode.NOT_FOUND, "this one fails alone")
            return {"batch": len(self.batches), "text": args.text}
        return Deferred(finish, args.text)

    @op(TextArgs)
    def wait(self, args: TextArgs, ctx: RequestContext) -> dict:
        """Runs on the pool until released or cancelled."""
        while not (self.release.is_set() or ctx.cancelled.is_set()):
            self.release.wait(0.01)
        return {"cancelled": ctx.cancelled.is_set()}

    @op(TextArgs)
    def lookup(self, args: TextArgs, ctx: RequestContext) -> dict:
        """Calls another service on behalf of this request's agent."""
        return {"found": ctx.call("storage", "read", path=args.text)}

    @op(TextArgs, inline=True)
    def inline_lookup(self, args: TextArgs, ctx: RequestContext) -> dict:
        return ctx.call("storage", "read", path=args.text)

    @op(TextArgs, preemptible=True, idempotent=True)
    def generate(self, args: TextArgs, ctx: RequestContext) -> Any:
        ctx.partial({"token": "a"})
        ctx.tokens = 3
        return Preempt(affinity=True)

    @op(None, inline=True)
    def crash(self, args: Any, ctx: RequestContext) -> dict:
        raise RuntimeError("a bug in a handler")


@pytest.fixture
def h() -> Any:
    harness = ManagerHarness(Probe)
    yield harness
    harness.manager.release.set()
    harness.close()


def test_an_inline_op_runs_on_the_driving_thread_and_answers_at_once(h: ManagerHarness) -> None:
    h.dispatch("r1", "echo", {"text": "hi"})
    (a,) = h.take()
    assert isinstance(a.msg, messages.Reply) and a.status == "ok" and a.msg.client == AGENT
    assert a.body == {"text": "hi", "thread": threading.current_thread().name}


@pytest.mark.parametrize("op,body,code,words", [
    ("nope", {}, ErrorCode.UNKNOWN_OP, "has no op 'nope'"),
    ("echo", {"text": 5}, ErrorCode.INVALID_ARGUMENT, "probe.echo: invalid arguments: text"),
    ("echo", {"extra": 1}, ErrorCode.INVALID_ARGUMENT, "extra"),
    ("crash", {}, ErrorCode.INTERNAL, "RuntimeError: a bug in a handler"),
])
def test_bad_requests_and_failing_handlers_become_error_replies(h: ManagerHarness, op: str, body: Any,
                                                                code: ErrorCode, words: str) -> None:
    h.dispatch("r1", op, body)
    (a,) = h.take()
    assert a.status == "error" and a.code == code.value and words in a.body["error"]["message"]
    assert h.core.running() == []  # nothing left counted as running


def test_deferred_answers_wait_for_the_end_of_their_batch_and_a_failure_fails_alone(h: ManagerHarness) -> None:
    for i, text in enumerate(["a", "boom", "c"]):
        h.dispatch(f"r{i}", "tally", {"text": text})
    assert h.take() == [] and h.manager.batches == []  # nothing answered before the batch closes
    assert len(h.core.running()) == 3
    h.end_of_batch()
    answers = {a.msg.id: a for a in h.take()}
    assert h.manager.batches == [["a", "boom", "c"]]  # end_batch once, for the whole batch
    assert answers["r0"].body == {"batch": 1, "text": "a"} and answers["r2"].body == {"batch": 1, "text": "c"}
    assert answers["r1"].code == ErrorCode.NOT_FOUND.value
    assert h.core.running() == []


def test_a_deferred_op_run_on_the_pool_closes_a_batch_of_its_own(h: ManagerHarness) -> None:
    h.dispatch("inline", "tally", {"text": "x"})
    h.dispatch("pooled", "tally", {"text": "y", "fail": True})  # its inline predicate says: the pool
    (a,) = h.wait_for(1)
    assert a.msg.id == "pooled" and h.manager.batches == [["y"]]
    h.end_of_batch()
    assert h.manager.batches == [["y"], ["x"]]


def test_cancel_flags_a_running_handler_and_forgets_a_finished_one(h: ManagerHarness) -> None:
    h.dispatch("r1", "wait", {})
    assert [e[1] for e in h.core.running()] == ["r1"]
    h.cancel("r1")
    (a,) = h.wait_for(1)
    assert a.body == {"cancelled": True} and h.manager.cancelled == ["r1"]
    h.cancel("gone")
    assert h.manager.forgotten == [request_key("gone", AGENT)]


def test_a_handler_calls_another_service_through_the_scheduler(h: ManagerHarness) -> None:
    h.dispatch("r1", "lookup", {"text": "notes.md"}, deadline=30.0)
    (call,) = h.calls(1)
    assert (call.service, call.op, call.parent, call.parent_client) == ("storage", "read", "r1", AGENT)
    assert call.deadline is not None and 0 < call.deadline <= 30.0  # within the parent's time
    h.answer_call(call, {"data": "hello"})
    (a,) = h.wait_for(1)
    assert a.status == "ok" and a.body == {"found": {"data": "hello"}}


def test_a_failed_call_fails_the_handler_with_the_callee_code(h: ManagerHarness) -> None:
    h.dispatch("r1", "lookup", {"text": "missing.md"})
    (call,) = h.calls(1)
    h.answer_call(call, error=(ErrorCode.NOT_FOUND, "no file missing.md"))
    (a,) = h.wait_for(1)
    assert a.code == ErrorCode.NOT_FOUND.value and "storage.read: no file missing.md" in a.body["error"]["message"]


def test_an_inline_op_may_not_make_calls(h: ManagerHarness) -> None:
    h.dispatch("r1", "inline_lookup", {"text": "x"})
    (a,) = h.take()
    assert a.code == ErrorCode.INTERNAL.value and "is an inline op" in a.body["error"]["message"]


def test_a_preempted_handler_streams_then_yields_with_its_tokens(h: ManagerHarness) -> None:
    h.dispatch("r1", "generate", {}, slice=4)
    partial, yielded = h.wait_for(2)
    assert partial.status == "partial" and partial.body == {"token": "a"} and partial.msg.tokens == 0
    assert isinstance(yielded.msg, messages.Yield) and yielded.msg.affinity and yielded.msg.tokens == 3


def test_ready_announces_ops_with_their_nature(h: ManagerHarness) -> None:
    ready = h.core.ready_message()
    assert ready.service == "probe" and ready.capacity == 4
    assert ready.ops["generate"] == messages.OpInfo(idempotent=True, preemptible=True)
    assert "test_hold_batch" not in ready.ops  # only with AIOS_TEST_HOOKS=1


def test_the_hold_hook_keeps_the_next_batch_open_until_n_dispatches(h: ManagerHarness) -> None:
    h.core.hold_next_batch(3)
    assert not h.core.holding(0.0)  # armed: it applies from the next batch on
    h.end_of_batch()
    h.dispatch("r1", "tally", {"text": "a"})
    h.dispatch("r2", "tally", {"text": "b"})
    assert h.core.holding(1.0)  # two of three in: the driver must not close the batch
    h.dispatch("r3", "tally", {"text": "c"})
    assert not h.core.holding(1.0)
    h.end_of_batch()
    assert h.manager.batches == [["a", "b", "c"]]
    assert len(h.take()) == 3


def test_a_held_batch_closes_after_the_bound_even_if_fewer_came(h: ManagerHarness) -> None:
    from aios.managers.manager_core import HOLD_BATCH_MAX_S
    h.core.hold_next_batch(5)
    h.end_of_batch()
    h.dispatch("r1", "tally", {"text": "a"})
    assert h.core.holding(100.0)
    assert not h.core.holding(100.0 + HOLD_BATCH_MAX_S)  # a test hook never hangs a kernel


def test_the_hold_op_exists_only_with_test_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOS_TEST_HOOKS", "1")
    harness = ManagerHarness(Probe)
    try:
        harness.dispatch("r0", "test_hold_batch", {"n": 2})
        assert harness.take()[0].body == {"holding": 2}
        harness.end_of_batch()
        harness.dispatch("r1", "tally", {"text": "a"})
        assert harness.core.holding(0.0)
    finally:
        harness.close()
