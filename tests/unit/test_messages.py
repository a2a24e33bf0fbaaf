"""Unit tests of the typed messages (aios.messages): round trips, field checks, deadlines, sides."""
from __future__ import annotations

import math
from typing import Any

import pytest

from aios import messages
from aios.messages import (
    MAX_DEADLINE_S,
    MAX_NAME,
    Call,
    Cancel,
    Disconnect,
    Dispatch,
    Heartbeat,
    OpInfo,
    Ready,
    Reregister,
    Reply,
    Timing,
    Request,
    Yield,
    check_deadline,
    parse,
)
from aios.protocol import Codec, ErrorCode, ProtocolError

LONG = "x" * (MAX_NAME + 1)

# One fully populated instance of every kind, and one with only required fields.
SAMPLES: list[Any] = [
    Request(id="r1", service="llm", op="chat", agent="alice", deadline=2.5, target="gemma"),
    Request(id="r1", service="llm", op="chat", agent="alice"),
    Request(id="r1", service="llm", op="chat", agent="alice", deadline=2.0, streamed=True),
    Call(id="c1", service="storage", op="write", parent="r1", parent_client=b"\x00abc", deadline=1.0,
         target="t"),
    Call(id="c1", service="storage", op="write", parent="r1", parent_client=b"\x00abc"),
    Dispatch(id="r1", client=b"\x00abc", agent="alice", service="llm", op="chat", target="gemma", attempt=3,
             resume=True, slice=32, deadline=4.5, caller="memory"),
    Dispatch(id="r1", client=b"@m1", agent="alice", service="llm", op="chat"),
    Reply(id="r1", status="ok", client=b"\x00abc", tokens=12),
    Reply(id="r1", status="ok", timing=Timing(wait_s=0.1, run_s=0.2, turnaround_s=0.3, attempts=1)),
    Reply(id="r1", status="partial", reset=True),
    Reply(id=None, status="error"),
    Ready(name="core0", service="llm", capacity=4, incarnation="abc", pid=42,
          running=[(b"\x00abc", "r1", "gemma"), (b"@m1", "r2", None)],
          ops={"chat": OpInfo(True, True), "count": OpInfo(False, False)}, targets=["gemma", "qwen"],
          default=True, limits={"gemma": 2}, health="degraded", detail="server slow"),
    Ready(name="core0", service="llm", capacity=1, incarnation="abc"),
    Yield(id="r1", client=b"\x00abc", affinity=False, tokens=32),
    Yield(id="r1", client=b"\x00abc"),
    Cancel(id="r1", client=b"\x00abc"),
    Heartbeat(running=[(b"\x00abc", "r1", None)]),
    Heartbeat(running=[]),
    Heartbeat(),
    Reregister(),
    Disconnect(),
]

SIDES = {
    "request": messages.FROM_AGENT,
    "call": messages.FROM_MANAGER,
    "reply": messages.FROM_MANAGER,
    "ready": messages.FROM_MANAGER,
    "yield": messages.FROM_MANAGER,
    "heartbeat": messages.FROM_MANAGER,
    "disconnect": messages.FROM_MANAGER,
    "dispatch": messages.FROM_SCHEDULER_TO_MANAGER,
    "cancel": messages.FROM_SCHEDULER_TO_MANAGER,
    "reregister": messages.FROM_SCHEDULER_TO_MANAGER,
}


def bad_frame(fn: Any, field: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn()
    assert info.value.code is ErrorCode.BAD_FRAME
    assert repr(field) in info.value.message or field in info.value.message, info.value.message
    return info.value


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: f"{type(m).__name__}")
def test_round_trip_through_header(msg: Any) -> None:
    h = msg.to_header()
    assert h["kind"] == msg.KIND
    assert type(msg).from_header(h) == msg


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: f"{type(m).__name__}")
def test_round_trip_through_signed_frames_and_parse(msg: Any) -> None:
    """Encoded and verified by the real Codec, then parsed on the side that receives it."""
    codec = Codec(b"k" * 32)
    decoded = codec.decode(codec.encode(msg.to_header(), {"a": 1}, routing=[b"id"]))
    assert parse(decoded.header, SIDES[msg.KIND]) == msg
    assert decoded.body == {"a": 1}


def test_every_kind_has_a_sample_and_a_side() -> None:
    kinds = {m.KIND for m in SAMPLES}
    assert kinds == set(SIDES) == {k.value for k in messages.Kind}


def test_reply_final_and_optional_fields_left_out() -> None:
    assert Reply("r", "ok").final and Reply("r", "error").final and not Reply("r", "partial").final
    assert Reply("r", "ok").to_header() == {"kind": "reply", "id": "r", "status": "ok"}
    assert Request(id="a", service="s", op="o", agent="g").to_header() == {
        "kind": "request", "id": "a", "agent": "g", "service": "s", "op": "o"}
    assert Heartbeat().to_header() == {"kind": "heartbeat"}


def test_defaults_when_optional_fields_are_absent() -> None:
    d = Dispatch.from_header({"kind": "dispatch", "id": "r", "client": b"c", "agent": "a", "service": "s",
                              "op": "o"})
    assert (d.attempt, d.resume, d.slice, d.deadline, d.target, d.caller) == (1, False, None, None, None, None)
    r = Ready.from_header({"name": "n", "service": "s", "incarnation": "i"})
    assert (r.capacity, r.running, r.ops, r.targets, r.limits, r.default, r.health) == (1, [], {}, [], {}, False, "ok")
    y = Yield.from_header({"id": "r", "client": b"c"})
    assert y.affinity is False and y.tokens == 0
    assert Dispatch.from_header({"id": "r", "client": b"c", "agent": "a", "service": "s", "op": "o",
                                 "deadline": 3}).deadline == 3.0


def test_a_request_says_whether_its_caller_holds_partials_only_when_it_does() -> None:
    """`streamed` (a re-sent call whose caller already got partials) travels only when true, and the
    fast path of a well-formed request never drops it."""
    assert "streamed" not in Request(id="a", service="s", op="o", agent="g").to_header()
    h = Request(id="a", service="s", op="o", agent="g", deadline=1.5, streamed=True).to_header()
    assert h["streamed"] is True
    assert Request.from_header(h).streamed is True
    assert parse(h, messages.FROM_AGENT) == Request(id="a", service="s", op="o", agent="g", deadline=1.5,
                                                    streamed=True)
    assert Request.from_header({**h, "streamed": False}).streamed is False


def test_ready_detail_is_truncated() -> None:
    r = Ready.from_header({"name": "n", "service": "s", "incarnation": "i", "detail": "d" * 5000})
    assert len(r.detail) == 1000


# ---------------------------------------------------------------- field checks
def _request(**over: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"kind": "request", "id": "r1", "service": "llm", "op": "chat", "agent": "alice"}
    h.update(over)
    return {k: v for k, v in h.items() if v is not _DROP}


def _call(**over: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"kind": "call", "id": "c1", "service": "s", "op": "o", "parent": "r1",
                         "parent_client": b"\x00a"}
    h.update(over)
    return {k: v for k, v in h.items() if v is not _DROP}


def _dispatch(**over: Any) -> dict[str, Any]:
    h: dict[str, Any] = Dispatch(id="r1", client=b"\x00a", agent="alice", service="s", op="o").to_header()
    h.update(over)
    return {k: v for k, v in h.items() if v is not _DROP}


def _reply(**over: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"kind": "reply", "id": "r1", "status": "ok"}
    h.update(over)
    return {k: v for k, v in h.items() if v is not _DROP}


def _ready(**over: Any) -> dict[str, Any]:
    h: dict[str, Any] = Ready(name="m", service="s", capacity=2, incarnation="i").to_header()
    h.update(over)
    return {k: v for k, v in h.items() if v is not _DROP}


def _yield(**over: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"kind": "yield", "id": "r1", "client": b"\x00a"}
    h.update(over)
    return {k: v for k, v in h.items() if v is not _DROP}


def _cancel(**over: Any) -> dict[str, Any]:
    h: dict[str, Any] = {"kind": "cancel", "id": "r1", "client": b"\x00a"}
    h.update(over)
    return {k: v for k, v in h.items() if v is not _DROP}


_DROP = object()
NAME_BAD = [_DROP, 1, b"bytes", "", LONG, None, ["x"]]
OPT_NAME_BAD = [1, "", LONG, b"x"]
BYTES_BAD = [_DROP, "text", 5, b"b" * (MAX_NAME + 1)]
COUNT_BAD = [-1, "3", 1.5, True, 1 << 32]
RUNNING_BAD = [5, "r", [b"c"], [[b"c", "r"]], [["c", "r", None]], [[b"c", "", None]], [[b"c", "r", 5]],
               [[b"c", "r", None]] * (messages.MAX_READY_ENTRIES + 1)]

CASES: list[tuple[str, Any, str, list[Any]]] = [
    # (message class name, header builder, field, bad values)
    *[("Request", _request, f, NAME_BAD) for f in ("id", "service", "op", "agent")],
    ("Request", _request, "target", OPT_NAME_BAD),
    ("Request", _request, "streamed", [1, "yes", 0.0]),
    *[("Call", _call, f, NAME_BAD) for f in ("id", "service", "op", "parent")],
    ("Call", _call, "parent_client", BYTES_BAD),
    ("Call", _call, "target", OPT_NAME_BAD),
    *[("Dispatch", _dispatch, f, NAME_BAD) for f in ("id", "agent", "service", "op")],
    ("Dispatch", _dispatch, "client", BYTES_BAD),
    ("Dispatch", _dispatch, "target", OPT_NAME_BAD),
    ("Dispatch", _dispatch, "caller", OPT_NAME_BAD),
    ("Dispatch", _dispatch, "attempt", [0, -1, "2", 2.0, True]),
    ("Dispatch", _dispatch, "resume", [1, "yes", None]),
    ("Dispatch", _dispatch, "slice", [0, -5, "32", 1.5, True]),
    ("Dispatch", _dispatch, "deadline", [math.nan, math.inf, -math.inf, "1", True]),
    ("Reply", _reply, "id", [5, b"r", LONG]),
    ("Reply", _reply, "status", [_DROP, "done", 1, None]),
    ("Reply", _reply, "client", ["c", 1]),
    ("Reply", _reply, "tokens", COUNT_BAD),
    ("Reply", _reply, "timing", [[1], "fast", 3]),
    ("Reply", _reply, "reset", [1, "true"]),
    *[("Ready", _ready, f, NAME_BAD) for f in ("name", "service", "incarnation")],
    ("Ready", _ready, "capacity", [0, -1, (1 << 16) + 1, "2", 2.0]),
    ("Ready", _ready, "pid", COUNT_BAD),
    ("Ready", _ready, "running", RUNNING_BAD),
    ("Ready", _ready, "default", [1, "yes"]),
    ("Ready", _ready, "ops", [["chat"], "chat", {f"op{i}": {} for i in range(messages.MAX_READY_ENTRIES + 1)}]),
    ("Ready", _ready, "targets", ["gemma", [1], [""], [LONG], {"gemma": 1},
                                  ["t"] * (messages.MAX_READY_ENTRIES + 1)]),
    ("Ready", _ready, "limits", [[1], {"t": 0}, {"t": -1}, {"t": "2"}, {"t": 1.5}, {"t": True}]),
    ("Ready", _ready, "health", ["fine", 1, None]),
    ("Ready", _ready, "detail", [1, None, b"x"]),
    ("Yield", _yield, "id", NAME_BAD),
    ("Yield", _yield, "client", BYTES_BAD),
    ("Yield", _yield, "affinity", [1, "no"]),
    ("Yield", _yield, "tokens", COUNT_BAD),
    ("Cancel", _cancel, "id", NAME_BAD),
    ("Cancel", _cancel, "client", BYTES_BAD),
    ("Heartbeat", lambda **o: {"kind": "heartbeat", **o}, "running", RUNNING_BAD),
]


def _flat_cases() -> list[Any]:
    out = []
    for cls_name, build, field, values in CASES:
        for i, v in enumerate(values):
            label = "missing" if v is _DROP else f"{type(v).__name__}{i}"
            out.append(pytest.param(cls_name, build, field, v, id=f"{cls_name}.{field}-{label}"))
    return out


@pytest.mark.parametrize("cls_name,build,field,value", _flat_cases())
def test_bad_field_is_bad_frame_naming_it(cls_name: str, build: Any, field: str, value: Any) -> None:
    h = build(**{field: value})
    cls = getattr(messages, cls_name)
    err = bad_frame(lambda: cls.from_header(h), field)
    assert err.header is h  # the readable header travels with the error (for an error reply's id)
    # and the same through parse() on the side that receives this kind
    bad_frame(lambda: parse(h, SIDES[cls.KIND]), field)


@pytest.mark.parametrize("ops,named", [({"chat": "fast"}, "'chat'"), ({"chat": True}, "'chat'"),
                                       ({"": {}}, "''"), ({LONG: {}}, LONG)])
def test_a_bad_op_entry_names_the_op(ops: dict[str, Any], named: str) -> None:
    err = bad_frame(lambda: Ready.from_header(_ready(ops=ops)), named)
    assert "READY op" in err.message


# -------------------------------------------------------------------- deadlines
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1, -0.5, 0, 0.0, MAX_DEADLINE_S + 1, 1e300,
                                   "5", True, [1]])
def test_bad_deadlines_are_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="finite number of seconds"):
        check_deadline(value)
    err = bad_frame(lambda: Request.from_header(_request(deadline=value)), "deadline")
    assert "finite number of seconds" in err.message
    bad_frame(lambda: Call.from_header(_call(deadline=value)), "deadline")


@pytest.mark.parametrize("value,expected", [(None, None), (1, 1.0), (0.001, 0.001), (MAX_DEADLINE_S, MAX_DEADLINE_S)])
def test_good_deadlines(value: Any, expected: float | None) -> None:
    got = check_deadline(value)
    assert got == expected and (got is None or type(got) is float)
    assert Request.from_header(_request(deadline=value)).deadline == expected


# ------------------------------------------------------------------------ sides
def test_agents_may_only_send_requests() -> None:
    # an agent's header may leave out the kind: it can only be a request
    no_kind = {k: v for k, v in _request().items() if k != "kind"}
    assert parse(no_kind, messages.FROM_AGENT) == Request(id="r1", service="llm", op="chat", agent="alice")
    for msg in SAMPLES:
        if msg.KIND == "request":
            continue
        err = bad_frame(lambda: parse(msg.to_header(), messages.FROM_AGENT), msg.KIND)
        assert "agents may only send requests" in err.message


@pytest.mark.parametrize("allowed", [messages.FROM_MANAGER, messages.FROM_SCHEDULER_TO_MANAGER],
                         ids=["from-manager", "to-manager"])
def test_each_side_refuses_kinds_it_may_not_receive(allowed: frozenset[str]) -> None:
    for msg in SAMPLES:
        if msg.KIND in allowed:
            assert parse(msg.to_header(), allowed) == msg
        else:
            err = bad_frame(lambda: parse(msg.to_header(), allowed), msg.KIND)
            assert "unexpected message kind" in err.message
    # a manager's header must say what it is
    bad_frame(lambda: parse({"id": "r1"}, allowed), "None")


def test_managers_cannot_send_requests_or_dispatches() -> None:
    assert "request" not in messages.FROM_MANAGER and "dispatch" not in messages.FROM_MANAGER
    bad_frame(lambda: parse(_request(), messages.FROM_MANAGER), "request")


@pytest.mark.parametrize("kind", [["request"], {"a": 1}, 5, None, b"request"])
@pytest.mark.parametrize("allowed", [messages.FROM_AGENT, messages.FROM_MANAGER], ids=["agent", "manager"])
def test_a_kind_of_the_wrong_type_is_bad_frame(kind: Any, allowed: frozenset[str]) -> None:
    """Nothing but ProtocolError may escape parse: a list or map kind must not raise TypeError."""
    h = _request(kind=kind)
    with pytest.raises(ProtocolError) as info:
        parse(h, allowed)
    assert info.value.code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("status", [["ok"], {"s": "ok"}])
def test_a_status_of_the_wrong_type_is_bad_frame(status: Any) -> None:
    """Nothing but ProtocolError may escape Reply.from_header: a list or map status must not raise TypeError."""
    bad_frame(lambda: Reply.from_header(_reply(status=status)), "status")


def test_timing_is_typed_and_still_reads_as_a_map() -> None:
    t = Reply.from_header({"kind": "reply", "id": "r", "status": "ok",
                           "timing": {"wait_s": 0.5, "run_s": 1.5, "turnaround_s": 2.0, "attempts": 1}}).timing
    assert isinstance(t, Timing) and t.wait_s == 0.5 and t.preemptions == 0
    assert t["run_s"] == 1.5 and dict(t) == t.to_wire() and t == t.to_wire()
    with pytest.raises(KeyError):
        t["nope"]


@pytest.mark.parametrize("timing", [{"wait_s": "slow"}, {"run_s": float("nan")}, {"attempts": None},
                                    {"turnaround_s": float("inf")}])
def test_a_reply_with_malformed_timing_figures_is_refused(timing: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        Reply.from_header({"kind": "reply", "id": "r", "status": "ok", "timing": timing})
    assert info.value.code == ErrorCode.BAD_FRAME and "timing." in info.value.message


def test_request_id_of_names_only_readable_ids() -> None:
    assert messages.request_id_of({"id": "r1"}) == "r1"
    assert messages.request_id_of({"id": 5}) is None and messages.request_id_of(None) is None
    assert messages.request_id_of({"id": ""}) == ""  # refused, but still the caller's to match


# ------------------------------------------------------------------ the agent-name rule
BAD_AGENT_NAMES = [
    ("a\x00b", "NUL"), ("*", "wildcard"), ("team*", "wildcard"), ("../alice", "path separator"),
    ("alice/bob", "path separator"), ("a\\b", "path separator"), (".", "'.' and '..'"), ("..", "'.' and '..'"),
    ("kernel", "reserved"), (" alice", "white space"), ("alice\t", "U+0009"), ("al\u200bice", "U+200B"),
    ("al\u202eice", "U+202E"), ("a\ud800", "lone surrogate"), ("é" * 128, "at most 255 bytes"),
]


@pytest.mark.parametrize("name, why", BAD_AGENT_NAMES)
def test_a_request_naming_an_agent_storage_could_not_key_is_bad_frame_naming_the_rule(name: str, why: str) -> None:
    from aios.agent_names import agent_name_problem

    problem = agent_name_problem(name)
    assert problem is not None and why in problem
    h = Request(id="r1", service="echo", op="echo", agent=name).to_header()
    for header in (h, {**h, "target": "t"}):  # the common path, and the one through the field helpers
        with pytest.raises(ProtocolError) as info:
            Request.from_header(header)
        assert info.value.code is ErrorCode.BAD_FRAME
        assert info.value.message == f"header field 'agent': {problem}"


@pytest.mark.parametrize("name", ["alice", "agent-1234", "bench-07", "Grüße", "日本語のエージェント", "a.b", "a..b",
                                  "my agent", "kernel-helper", "x" * 255])
def test_ordinary_agent_names_pass(name: str) -> None:
    from aios.agent_names import agent_name_problem, good_agent_name

    assert agent_name_problem(name) is None and good_agent_name(name) and good_agent_name(name)
    assert Request.from_header(Request(id="r1", service="echo", op="echo", agent=name).to_header()).agent == name
