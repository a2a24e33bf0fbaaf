"""Unit tests of the SDK call engine (aios.sdk.engine.PendingCall), driven with explicit times.

No sockets: each `Send` is decoded with a real Codec as the scheduler would,
and replies are real signed frames decoded the way a driver receives them.
"""
from __future__ import annotations

from typing import Any

import pytest

from aios import messages
from aios.protocol import Codec, ErrorCode, Frame, error_body
from aios.calls import (
    DEADLINE_GRACE_S,
    MAX_BACKOFF_S,
    MAX_RESEND_INTERVAL_S,
    CallResult,
    Incoming,
    PendingCall,
    Send,
    Wait,
    decode,
    match_id,
)
from aios.sdk.errors import InvalidArgument, KernelError, KernelTimeout, PermissionDenied

KEY = b"k" * 32
CODEC = Codec(KEY)


def new_call(*, idempotent: bool, timeout: float = 100.0, now: float = 0.0, resend_interval: float = 1.0,
             on_partial: Any = None, args: dict[str, Any] | None = None) -> PendingCall:
    header = messages.Request(id="unset", service="echo", op="get", agent="alice")
    return PendingCall(CODEC, header, args if args is not None else {"text": "hi"}, timeout=timeout,
                       idempotent=idempotent, now=now, resend_interval=resend_interval, on_partial=on_partial)


def sent(step: Any) -> Frame:
    """The frames of a Send, verified and decoded as the scheduler would."""
    assert isinstance(step, Send), step
    return CODEC.decode(step.frames)


def reply(rid: str, status: str = "ok", body: Any = None, **header: Any) -> Incoming:
    """A reply as the driver receives it: signed frames, verified, decoded and typed."""
    h = {"kind": "reply", "id": rid, "status": status, **header}
    incoming = decode(CODEC, CODEC.encode(h, body if body is not None else {}))
    assert incoming is not None
    return incoming


def error(rid: str, code: ErrorCode, message: str = "because") -> Incoming:
    return reply(rid, "error", error_body(code, message))


def send_times(call: PendingCall, until: float, dt: float = 0.25) -> list[tuple[float, str, float]]:
    """Step on a grid until `until` (or the call raises): (time, id, deadline header) of each Send."""
    out = []
    t = 0.0
    while t <= until:
        try:
            step = call.step(t)
        except KernelTimeout:
            break
        if isinstance(step, Send):
            m = sent(step)
            out.append((t, m.header["id"], m.header["deadline"]))
            assert isinstance(call.step(t), Wait)  # one Send per due time
        t = round(t + dt, 6)
    return out


# ------------------------------------------------------------------- first send
def test_first_step_sends_the_request_with_a_fresh_id_and_the_time_left() -> None:
    call = new_call(idempotent=False, timeout=30.0, now=5.0, args={"text": "hello"})
    m = sent(call.step(5.0))
    h = m.header
    assert (h["kind"], h["service"], h["op"], h["agent"]) == ("request", "echo", "get", "alice")
    assert h["id"] == call.rid and len(call.rid) == 32 and h["deadline"] == 30.0
    assert m.body == {"text": "hello"} and call.attempts == 1
    # the scheduler accepts what the engine sends
    assert messages.parse(h, messages.FROM_AGENT).id == call.rid


def test_a_call_header_from_a_manager_is_sent_as_a_call() -> None:
    header = messages.Call(id="unset", service="storage", op="read", parent="r1", parent_client=b"\x00a")
    call = PendingCall(CODEC, header, {}, timeout=5.0, idempotent=True, now=0.0)
    h = sent(call.step(0.0)).header
    parsed = messages.parse(h, messages.FROM_MANAGER)
    assert isinstance(parsed, messages.Call) and parsed.parent == "r1" and parsed.id == call.rid
    assert parsed.deadline == 5.0


# ------------------------------------------------------------------- re-sending
def test_an_idempotent_call_resends_the_same_id_doubling_up_to_the_cap() -> None:
    call = new_call(idempotent=True, timeout=100.0, resend_interval=1.0)
    sends = send_times(call, until=60.0)
    times = [t for t, _, _ in sends]
    # intervals 1, 2, 4, then capped at MAX_RESEND_INTERVAL_S (8)
    assert MAX_RESEND_INTERVAL_S == 8.0
    assert times[:9] == [0.0, 1.0, 3.0, 7.0, 15.0, 23.0, 31.0, 39.0, 47.0]
    assert {rid for _, rid, _ in sends} == {call.rid}  # the scheduler dedups by id
    assert all(deadline == pytest.approx(100.0 - t) for t, _, deadline in sends)
    assert call.attempts == len(sends)


def test_waits_say_when_the_next_resend_is_due() -> None:
    call = new_call(idempotent=True, timeout=100.0, resend_interval=0.5)
    sent(call.step(0.0))
    assert call.step(0.1) == Wait(0.5)
    sent(call.step(0.5))
    assert call.step(0.6) == Wait(1.5)


def test_an_idempotent_call_never_resends_after_its_deadline() -> None:
    call = new_call(idempotent=True, timeout=10.0)
    sends = send_times(call, until=20.0, dt=0.05)
    assert [t for t, _, _ in sends] == [0.0, 1.0, 3.0, 7.0]
    assert all(t < 10.0 and d > 0 for t, _, d in sends)


def test_a_non_idempotent_call_is_sent_once() -> None:
    call = new_call(idempotent=False, timeout=10.0)
    sends = send_times(call, until=20.0, dt=0.05)
    assert [t for t, _, _ in sends] == [0.0]
    call2 = new_call(idempotent=False, timeout=10.0)
    sent(call2.step(0.0))
    assert call2.step(5.0) == Wait(10.0 + DEADLINE_GRACE_S)


# --------------------------------------------------------------- deadline grace
def test_the_deadline_grace_of_a_non_idempotent_call() -> None:
    call = new_call(idempotent=False, timeout=10.0)
    sent(call.step(0.0))
    assert call.step(10.0) == Wait(10.0 + DEADLINE_GRACE_S)  # the kernel's verdict may be on its way
    with pytest.raises(KernelTimeout) as info:
        call.step(10.0 + DEADLINE_GRACE_S)
    assert info.value.code == "TIMEOUT" and "echo.get" in info.value.message and "the kernel" in info.value.message
    # the kernel's own verdict, arriving within the grace, is what the caller sees
    call2 = new_call(idempotent=False, timeout=10.0)
    sent(call2.step(0.0))
    call2.feed(error(call2.rid, ErrorCode.DEADLINE_EXCEEDED, "deadline passed after 10.001s (running)"))
    with pytest.raises(KernelTimeout) as info2:
        call2.step(10.1)
    assert info2.value.code == "DEADLINE_EXCEEDED" and "running" in info2.value.message


def test_the_deadline_grace_of_an_idempotent_call() -> None:
    """An idempotent call's last re-send is scheduled at its deadline; at the deadline it must not
    give up at once but wait the grace for the kernel's DEADLINE_EXCEEDED (or a last-moment reply)."""
    call = new_call(idempotent=True, timeout=10.0)
    assert [t for t, _, _ in send_times(call, until=9.9)] == [0.0, 1.0, 3.0, 7.0]
    step = call.step(10.0)
    assert step == Wait(10.0 + DEADLINE_GRACE_S)
    call.feed(reply(call.rid, "ok", {"v": 1}))
    assert isinstance(call.step(10.1), CallResult)


# ------------------------------------------------------------- retryable errors
@pytest.mark.parametrize("code", [ErrorCode.MANAGER_DIED, ErrorCode.OVERLOADED])
def test_an_idempotent_call_is_retried_under_a_new_id_after_backoff(code: ErrorCode) -> None:
    call = new_call(idempotent=True, timeout=100.0, resend_interval=1.0)
    first = sent(call.step(0.0)).header["id"]
    call.feed(reply(first, "partial", {"tok": "a"}))
    call.feed(error(first, code))
    assert call.step(0.5) == Wait(1.5)  # backoff: resend_interval
    assert call.step(1.0) == Wait(1.5)
    second = sent(call.step(1.5))
    assert second.header["id"] != first and second.header["id"] == call.rid
    assert second.header["deadline"] == pytest.approx(98.5)
    assert call.partials == []  # what the first attempt streamed is gone
    # backoff doubles: 2 s, then 4, capped at MAX_BACKOFF_S
    call.feed(error(call.rid, code))
    assert call.step(2.0) == Wait(4.0)
    third = sent(call.step(4.0)).header["id"]
    assert third not in (first, second.header["id"])
    waits = []
    t = 5.0
    for _ in range(4):
        call.feed(error(call.rid, code))
        w = call.step(t)
        assert isinstance(w, Wait)
        waits.append(round(w.until - t, 6))
        t = w.until
        sent(call.step(t))
    assert waits == [4.0, 8.0, 8.0, 8.0] and MAX_BACKOFF_S == 8.0
    call.feed(reply(call.rid, "ok", {"v": 1}))
    assert call.step(t + 0.1).result == {"v": 1}


def test_a_retry_that_would_end_after_the_deadline_raises_the_error() -> None:
    call = new_call(idempotent=True, timeout=3.0, resend_interval=1.0)
    sent(call.step(0.0))
    call.feed(error(call.rid, ErrorCode.OVERLOADED, "the echo queue is full"))
    with pytest.raises(KernelError) as info:
        call.step(2.5)  # 2.5 + 1.0 backoff >= 3.0
    assert info.value.code == "OVERLOADED" and info.value.retryable


def test_unavailable_is_raised_at_once_even_for_an_idempotent_call() -> None:
    call = new_call(idempotent=True, timeout=100.0)
    sent(call.step(0.0))
    call.feed(error(call.rid, ErrorCode.UNAVAILABLE, "service 'echo' cannot serve: echo1 is FATAL"))
    with pytest.raises(KernelError) as info:
        call.step(0.1)
    assert (info.value.code, info.value.retryable) == ("UNAVAILABLE", True)
    assert "echo1 is FATAL" in info.value.message


@pytest.mark.parametrize("code", [ErrorCode.MANAGER_DIED, ErrorCode.OVERLOADED, ErrorCode.UNAVAILABLE,
                                  ErrorCode.SHUTTING_DOWN])
def test_a_non_idempotent_call_raises_retryable_errors_at_once(code: ErrorCode) -> None:
    call = new_call(idempotent=False, timeout=100.0)
    sent(call.step(0.0))
    call.feed(error(call.rid, code))
    with pytest.raises(KernelError) as info:
        call.step(0.1)
    assert info.value.code == code.value and info.value.retryable
    assert call.attempts == 1


@pytest.mark.parametrize("code,cls", [(ErrorCode.DENIED, PermissionDenied), (ErrorCode.UNKNOWN_OP, InvalidArgument),
                                      (ErrorCode.INVALID_ARGUMENT, InvalidArgument),
                                      (ErrorCode.DEADLINE_EXCEEDED, KernelTimeout),
                                      (ErrorCode.INTERNAL, KernelError)])
def test_errors_become_typed_exceptions_without_retry(code: ErrorCode, cls: type) -> None:
    call = new_call(idempotent=True, timeout=100.0)
    sent(call.step(0.0))
    call.feed(error(call.rid, code, "what went wrong"))
    with pytest.raises(cls) as info:
        call.step(0.1)
    assert type(info.value) is cls and info.value.code == code.value and info.value.message == "what went wrong"
    assert not info.value.retryable


# --------------------------------------------------------------------- replies
def test_partials_and_the_final_reply() -> None:
    seen: list[Any] = []
    call = new_call(idempotent=False, on_partial=seen.append)
    sent(call.step(0.0))
    call.feed(reply(call.rid, "partial", {"tok": "Pa"}))
    call.feed(reply(call.rid, "partial", {"tok": "ris"}))
    assert isinstance(call.step(0.5), Wait)
    timing = {"wait_s": 0.1, "run_s": 0.4, "turnaround_s": 0.5, "first_wait_s": 0.1, "preemptions": 0,
              "attempts": 1}
    call.feed(reply(call.rid, "ok", {"text": "Paris"}, timing=timing))
    r = call.step(0.6)
    assert isinstance(r, CallResult)
    assert r.result == {"text": "Paris"} and r.partials == [{"tok": "Pa"}, {"tok": "ris"}]
    assert r.timing == timing and r.reply.id == call.rid
    assert seen == [{"tok": "Pa"}, {"tok": "ris"}]
    assert call.step(50.0) is r and call.step(500.0) is r  # done is done, even past the deadline


def test_a_reset_partial_clears_what_was_collected() -> None:
    seen: list[Any] = []
    call = new_call(idempotent=True, on_partial=seen.append)
    sent(call.step(0.0))
    call.feed(reply(call.rid, "partial", {"tok": "Lyo"}))
    call.feed(reply(call.rid, "partial", {"reset": True}, reset=True))
    assert call.partials == []
    call.feed(reply(call.rid, "partial", {"tok": "Paris"}))
    call.feed(reply(call.rid, "ok", {"text": "Paris"}))
    r = call.step(1.0)
    assert isinstance(r, CallResult) and r.partials == [{"tok": "Paris"}]
    assert seen == [{"tok": "Lyo"}, {"reset": True}, {"tok": "Paris"}]


def test_reply_without_timing() -> None:
    call = new_call(idempotent=False)
    sent(call.step(0.0))
    call.feed(reply(call.rid, "ok", {"x": 1}))
    assert call.step(0.1).timing is None  # answered by the scheduler itself (kernel ops): nothing measured


# ------------------------------------------------------------- connection lost
def test_connection_lost_resends_an_idempotent_call_at_once() -> None:
    call = new_call(idempotent=True, timeout=100.0)
    rid = sent(call.step(0.0)).header["id"]
    sent(call.step(1.0))
    assert call.step(1.5) == Wait(3.0)
    call.connection_lost(1.5)
    again = sent(call.step(1.5))
    assert again.header["id"] == rid and again.header["deadline"] == pytest.approx(98.5)
    assert isinstance(call.step(1.6), Wait)


def test_a_resend_says_whether_partials_arrived_so_the_scheduler_knows_to_reset_a_rerun() -> None:
    """After a scheduler restart, the new scheduler adopts the call if it still runs (no reset) or runs
    it again; in that case it must first reset what the caller was streamed, which only the caller
    knows: the re-sent request says so. A retry under a new id starts with nothing streamed."""
    call = new_call(idempotent=True, timeout=100.0)
    first = sent(call.step(0.0))
    assert "streamed" not in first.header
    call.feed(reply(call.rid, "partial", {"tok": "Pa"}))
    call.connection_lost(0.5)
    again = sent(call.step(0.5))
    assert again.header["id"] == first.header["id"] and again.header["streamed"] is True
    assert messages.parse(again.header, messages.FROM_AGENT).streamed  # as the scheduler reads it
    call.feed(reply(call.rid, "partial", {"reset": True}, reset=True))  # it ran again: nothing held now
    call.connection_lost(0.7)
    assert "streamed" not in sent(call.step(0.7)).header
    call.feed(reply(call.rid, "partial", {"tok": "Pa"}))
    call.feed(error(call.rid, ErrorCode.OVERLOADED))
    assert isinstance(call.step(0.8), Wait)
    retry = sent(call.step(2.0))
    assert retry.header["id"] != first.header["id"] and "streamed" not in retry.header


def test_connection_lost_before_anything_was_sent_changes_nothing() -> None:
    for idempotent in (True, False):
        call = new_call(idempotent=idempotent, now=0.0)
        call.connection_lost(0.0)
        assert sent(call.step(0.0)).header["id"] == call.rid


def test_connection_lost_fails_a_non_idempotent_call_in_flight_with_unavailable() -> None:
    call = new_call(idempotent=False, timeout=100.0)
    sent(call.step(0.0))
    call.connection_lost(2.0)
    with pytest.raises(KernelError) as info:
        call.step(2.0)
    # its outcome is unknown and it is not safe to repeat: not retryable (a retry could do it twice)
    assert (info.value.code, info.value.retryable) == ("UNAVAILABLE", False)
    assert "echo.get" in info.value.message and "may or may not have taken effect" in info.value.message


def test_connection_lost_after_the_answer_changes_nothing() -> None:
    call = new_call(idempotent=False)
    sent(call.step(0.0))
    call.feed(reply(call.rid, "ok", {"v": 1}))
    call.connection_lost(0.5)
    assert call.step(0.5).result == {"v": 1}
    call2 = new_call(idempotent=False)
    sent(call2.step(0.0))
    call2.feed(error(call2.rid, ErrorCode.NOT_FOUND, "no such key"))
    call2.connection_lost(0.5)
    with pytest.raises(Exception) as info:
        call2.step(0.5)
    assert getattr(info.value, "code", None) == "NOT_FOUND"


# ----------------------------------------------------------- the driver's part
def test_routing_by_id_is_the_drivers_business() -> None:
    """The driver feeds only messages whose id is the call's current one; after a retry the old
    id's late messages no longer match."""
    call = new_call(idempotent=True, timeout=100.0)
    old = sent(call.step(0.0)).header["id"]
    call.feed(error(old, ErrorCode.MANAGER_DIED))
    sent(call.step(call.step(0.0).until))
    late = reply(old, "ok", {"stale": True})
    assert match_id(late) == old != call.rid
    fresh = reply(call.rid, "ok", {"fresh": True})
    assert match_id(fresh) == call.rid
    assert match_id(None) is None and match_id(reply("x", "error", {}, id=None)) is None


def test_decode_drops_frames_it_cannot_trust() -> None:
    good = CODEC.encode({"kind": "reply", "id": "r1", "status": "ok"}, {"v": 1})
    assert match_id(decode(CODEC, good)) == "r1"
    forged = Codec(b"z" * 32).encode({"kind": "reply", "id": "r1", "status": "ok"}, {"v": 1})
    assert decode(CODEC, forged) is None
    assert decode(CODEC, [b"garbage"]) is None


# ------------------------------------------------- what cannot be sent fails before it is sent
@pytest.mark.parametrize("args, named, why", [
    ({"path": "notes/\ud800.md", "data": "x"}, "'path'", "lone surrogate (U+D800"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 2 ** 64}, "'seed'", "-2**63 to 2**64-1"),
    ({"seed": -(2 ** 63) - 1}, "'seed'", "outside the range"),
    ({"text": object()}, "'text'", "of type object"),
    ({"messages": [{"role": "user", "content": {1, 2}}]}, "'messages[0].content'", "of type set"),
    ({"meta": {"\udc80": 1}}, "'meta.\\udc80 (its name)'", "lone surrogate"),
])
def test_an_argument_a_call_cannot_carry_is_invalid_and_named(args: dict[str, Any], named: str, why: str) -> None:
    """Not a raw UnicodeEncodeError, OverflowError or TypeError from msgpack: InvalidArgument naming
    the argument, raised when the call is made (nothing is sent)."""
    with pytest.raises(InvalidArgument) as info:
        new_call(idempotent=False, args=args)
    assert info.value.code == "INVALID_ARGUMENT" and not info.value.retryable
    assert info.value.message.startswith("echo.get: argument " + named) and why in info.value.message


def test_a_target_a_call_cannot_carry_is_invalid_and_named() -> None:
    header = messages.Request(id="", service="tools", op="call", agent="alice", target="calc\udcff")
    call = PendingCall(CODEC, header, {}, timeout=10.0, idempotent=False, now=0.0)
    with pytest.raises(InvalidArgument) as info:
        call.step(0.0)
    assert "argument 'target' is not valid Unicode text" in info.value.message


def test_a_request_over_the_kernels_message_limit_is_refused_before_it_is_sent() -> None:
    """The scheduler would drop the connection of a peer sending a frame over `[kernel]
    max_message_bytes`, which the caller would take for a restart ("outcome unknown")."""
    header = messages.Request(id="", service="storage", op="write", agent="alice")
    args = {"path": "big.bin", "data": b"\0" * 5000}
    with pytest.raises(InvalidArgument) as info:
        PendingCall(CODEC, header, args, timeout=10.0, idempotent=False, now=0.0, max_message_bytes=4096)
    err = info.value
    assert err.code == "TOO_LARGE" and not err.retryable
    assert "storage.write" in err.message and "4096 bytes" in err.message
    assert "[kernel] max_message_bytes" in err.message
    fits = PendingCall(CODEC, header, {"path": "big.bin", "data": b"\0" * 4000}, timeout=10.0, idempotent=False,
                       now=0.0, max_message_bytes=4096)
    assert isinstance(fits.step(0.0), Send)
