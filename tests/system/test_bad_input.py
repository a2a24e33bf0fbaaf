"""Hostile and malformed input on the agent socket.

Each test talks to the scheduler's frontend through its own raw zmq DEALER,
sends something wrong, checks the kernel rejects it (with the right error
code when a reply comes), and then an autouse check makes a well-formed SDK
call and verifies that neither the scheduler nor the manager was restarted.
"""
from __future__ import annotations

import os
import time
from typing import Any, Iterator

import msgpack
import pytest
import zmq

from aios import sdk
from aios.protocol import VERSION, Codec, ErrorCode, Frame, ProtocolError, new_request_id, pack
from tests.support.kernel import Kernel
from tests.support.waiting import wait_until


@pytest.fixture(scope="module")
def k(module_kernel_factory) -> Kernel:
    return module_kernel_factory(capacity=2)


@pytest.fixture(scope="module")
def baseline(k: Kernel) -> dict[str, Any]:
    return {"scheduler": k.pid("scheduler"), "echo": k.pid("echo")}


@pytest.fixture(autouse=True)
def kernel_survives(k: Kernel, baseline: dict[str, Any]) -> Iterator[None]:
    yield
    with sdk.connect(k.run_dir, agent="after", timeout=10.0) as c:
        text = f"still alive {new_request_id()}"
        assert c.call("echo", "echo", text=text)["text"] == text
        status = c.call("kernel", "status")
    assert status["scheduler"]["pid"] == baseline["scheduler"]
    rows = k.processes()
    assert rows["scheduler"]["pid"] == baseline["scheduler"] and rows["scheduler"]["restarts"] == 0
    assert rows["echo"]["pid"] == baseline["echo"] and rows["echo"]["restarts"] == 0
    assert "Traceback" not in k.log("scheduler"), k.log("scheduler")[-3000:]
    assert "Traceback" not in k.log("echo"), k.log("echo")[-3000:]


class Raw:
    """A bare DEALER on the agent socket, for sending anything at all."""

    def __init__(self, k: Kernel) -> None:
        config = k.run_dir.load_config()
        self.codec = Codec(k.run_dir.load_key())
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 50)
        self.sock.connect(k.run_dir.frontend_endpoint(config))

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = 20.0) -> Frame | None:
        """The next reply; the scheduler's heartbeats (it probes agents with work pending) are skipped."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                return None
            msg = self.codec.decode(self.sock.recv_multipart())  # the kernel's own replies are well formed
            if msg.header.get("kind") != "heartbeat":
                return msg
        return None

    def request(self, header: dict[str, Any], body: Any = None) -> list[bytes]:
        return self.codec.encode(header, {} if body is None else body)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def raw(k: Kernel) -> Iterator[Raw]:
    r = Raw(k)
    yield r
    r.close()


def good_header(service: str = "echo", op: str = "echo", **extra: Any) -> dict[str, Any]:
    return {"kind": "request", "id": new_request_id(), "agent": "hostile", "service": service, "op": op, **extra}


def expect_error(raw: Raw, code: ErrorCode, rid: str | None = None, text: str | None = None) -> dict[str, Any]:
    msg = raw.recv()
    assert msg is not None, f"no reply; expected {code.value}"
    assert msg.header.get("status") == "error", (msg.header, msg.body)
    err = msg.body["error"]
    assert err["code"] == code.value, err
    assert err["retryable"] is code.retryable
    assert isinstance(err["message"], str) and err["message"]
    assert msg.header.get("id") == rid
    if text is not None:
        assert text in err["message"], err
    return err


def expect_silence(raw: Raw, timeout: float = 0.3) -> None:
    assert raw.recv(timeout) is None


# ---------------------------------------------------------- frame structure
def test_random_bytes(raw: Raw) -> None:
    raw.send([os.urandom(200)])
    expect_error(raw, ErrorCode.BAD_FRAME, text="delimiter")


def test_many_random_frames(raw: Raw) -> None:
    raw.send([os.urandom(n) for n in (1, 50, 3000, 7)])
    expect_error(raw, ErrorCode.BAD_FRAME)


def test_only_a_delimiter(raw: Raw) -> None:
    raw.send([b""])
    expect_error(raw, ErrorCode.BAD_FRAME, text="frames")


@pytest.mark.parametrize("cut", [2, 3, 4])
def test_too_few_frames(raw: Raw, cut: int) -> None:
    raw.send(raw.request(good_header())[:cut])
    expect_error(raw, ErrorCode.BAD_FRAME, text="frames")


def test_too_many_frames(raw: Raw) -> None:
    raw.send(raw.request(good_header()) + [b"extra", b"more"])
    expect_error(raw, ErrorCode.BAD_FRAME, text="frames")


def test_extra_routing_frames(raw: Raw) -> None:
    h = good_header()
    raw.send([b"spoofed-client", b"hop"] + raw.request(h))
    expect_error(raw, ErrorCode.BAD_FRAME, rid=h["id"], text="routing")


def test_too_many_routing_frames(raw: Raw) -> None:
    raw.send([b"r"] * 10 + raw.request(good_header()))
    expect_error(raw, ErrorCode.BAD_FRAME, text="routing")


def test_bad_version(raw: Raw) -> None:
    frames = raw.request(good_header())
    frames[1] = b"AIOS9"
    raw.send(frames)
    expect_error(raw, ErrorCode.BAD_FRAME, text="version")


# ----------------------------------------------------------------- signing
def test_valid_msgpack_bad_signature(raw: Raw) -> None:
    h = good_header()
    raw.send([b"", VERSION, os.urandom(32), pack(h), pack({"text": "x"})])
    err = expect_error(raw, ErrorCode.BAD_SIGNATURE)  # unauthenticated header is never read: no id
    assert err["retryable"] is False


def test_wrong_key(raw: Raw) -> None:
    frames = Codec(os.urandom(32)).encode(good_header(), {"text": "x"})
    raw.send(frames)
    expect_error(raw, ErrorCode.BAD_SIGNATURE)


def test_altered_body(raw: Raw) -> None:
    frames = raw.request(good_header(), {"text": "x"})
    frames[-1] = pack({"text": "y"})
    raw.send(frames)
    expect_error(raw, ErrorCode.BAD_SIGNATURE)


def test_sdk_with_wrong_key_times_out(k: Kernel) -> None:
    c = sdk.connect(k.run_dir, agent="forger", timeout=5.0)
    c._link.codec = Codec(os.urandom(32))
    try:
        # the rejection carries no id (the header was never trusted), so the client times out
        with pytest.raises(sdk.KernelTimeout):
            c.request("echo", "echo", {"text": "x"}, timeout=1.0)
    finally:
        c.close()


# -------------------------------------------------------------- oversized
@pytest.mark.timeout(60)
def test_100mb_frame_is_dropped(raw: Raw, k: Kernel) -> None:
    raw.send([b"", VERSION, b"\0" * 32, pack(good_header()), b"\0" * (100 * 1024 * 1024)])
    expect_silence(raw, 1.0)  # over MAXMSGSIZE: zmq drops the connection, nothing is answered
    # the same socket reconnects by itself and is served again
    def answered() -> bool:
        hh = good_header()
        raw.send(raw.request(hh, {"text": "after the flood"}))
        end = time.monotonic() + 2.0
        while (msg := raw.recv(max(0.0, end - time.monotonic()))) is not None:  # skip late answers to earlier tries
            if msg.header.get("id") == hh["id"]:
                return msg.body["text"] == "after the flood"
        return False
    wait_until(answered, timeout=30, interval=0, message="raw socket served again")


def test_just_over_the_limit_is_dropped_and_just_under_is_served(raw: Raw, k: Kernel) -> None:
    limit = k.run_dir.load_config().kernel.max_message_bytes
    h = good_header()
    raw.send(raw.request(h, {"text": "x" * 900_000}))  # well under: served
    msg = raw.recv()
    assert msg is not None and msg.header["id"] == h["id"] and len(msg.body["text"]) == 900_000
    raw.send([b"", VERSION, b"\0" * 32, pack(good_header()), b"\0" * (limit + 1)])
    expect_silence(raw, 0.5)


# ------------------------------------------------------------------ header
def test_header_not_a_map(raw: Raw) -> None:
    raw.send(raw.codec.encode_raw(pack(["kind", "request"]), pack({})))
    expect_error(raw, ErrorCode.BAD_FRAME, text="map")


def test_header_not_msgpack(raw: Raw) -> None:
    raw.send(raw.codec.encode_raw(b"\xc1\xc1\xc1", pack({})))
    expect_error(raw, ErrorCode.BAD_FRAME, text="msgpack")


def test_header_bomb(raw: Raw) -> None:
    raw.send(raw.codec.encode_raw(b"\xdf\xff\xff\xff\xff", pack({})))  # claims 4 billion entries
    expect_error(raw, ErrorCode.BAD_FRAME)


def test_header_ext_type(raw: Raw) -> None:
    raw.send(raw.codec.encode_raw(msgpack.packb({"id": msgpack.ExtType(1, b"x")}), pack({})))
    expect_error(raw, ErrorCode.BAD_FRAME)


@pytest.mark.parametrize("field", ["id", "service", "op"])
def test_header_missing_field(raw: Raw, field: str) -> None:
    h = good_header()
    rid = h["id"]
    del h[field]
    raw.send(raw.request(h, {"text": "x"}))
    expect_error(raw, ErrorCode.BAD_FRAME, rid=None if field == "id" else rid, text=repr(field))


@pytest.mark.parametrize("field, value", [
    ("id", 12345), ("id", ""), ("id", "x" * 1000), ("agent", 7), ("agent", ""),
    ("service", ["echo"]), ("op", b"echo"), ("op", None),
])
def test_header_field_wrong_type(raw: Raw, field: str, value: Any) -> None:
    h = good_header()
    h[field] = value
    raw.send(raw.request(h, {"text": "x"}))
    expect_error(raw, ErrorCode.BAD_FRAME, rid=h["id"] if isinstance(h["id"], str) else None, text=repr(field))


@pytest.mark.parametrize("deadline", [-1, 0, "soon", [1], float("nan"), float("inf"), -float("inf"), 1e12, True])
def test_bad_deadline(raw: Raw, deadline: Any) -> None:
    h = good_header(deadline=deadline)
    raw.send(raw.request(h, {"text": "x"}))
    expect_error(raw, ErrorCode.BAD_FRAME, rid=h["id"], text="deadline")


def test_deadlines_still_expire_after_a_nan_deadline_was_sent(raw: Raw, k: Kernel, gates) -> None:
    """A NaN deadline once stopped deadline expiry for every request in the kernel. Both echo slots
    are held at a gate, so the late call can only end by its deadline."""
    h = good_header(deadline=float("nan"))
    raw.send(raw.request(h, {"text": "x"}))
    expect_error(raw, ErrorCode.BAD_FRAME, rid=h["id"], text="deadline")
    gate = gates.new()
    with sdk.connect(k.run_dir, agent="busy", timeout=30) as c1, sdk.connect(k.run_dir, agent="late", timeout=30) as c2:
        import threading
        blockers = [threading.Thread(target=lambda: sdk.connect(k.run_dir, agent=f"b{i}", timeout=60).call(
            "echo", "sleep", seconds=0, gate=gate.path)) for i in range(2)]
        for t in blockers:
            t.start()
        wait_until(lambda: next(m for m in c1.call("kernel", "status")["managers"] if m["name"] == "echo")["busy"] == 2,
                   timeout=30, message="echo busy")
        with pytest.raises(sdk.KernelTimeout) as info:
            c2.request("echo", "echo", {"text": "queued"}, timeout=0.3)
        assert info.value.code == "DEADLINE_EXCEEDED"
        gate.open()
        for t in blockers:
            t.join(30)


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0, 0, 1e12])
def test_sdk_refuses_absurd_timeouts_at_the_caller(k: Kernel, timeout: float) -> None:
    with sdk.connect(k.run_dir, agent="careless", timeout=5) as c:
        with pytest.raises(sdk.InvalidArgument) as info:
            c.request("echo", "echo", {"text": "x"}, timeout=timeout)
        assert "timeout" in info.value.message
    with pytest.raises(sdk.InvalidArgument):
        sdk.connect(k.run_dir, agent="careless", timeout=timeout)


@pytest.mark.parametrize("agent, why", [
    ("a\x00b", "NUL"), ("*", "wildcard"), ("../alice", "path separator"), ("alice/bob", "path separator"),
    ("..", "'.' and '..'"), ("kernel", "reserved"), (" alice", "white space"), ("al\u202eice", "U+202E"),
    ("é" * 200, "at most 255 bytes"),
])
def test_an_agent_name_storage_could_not_key_is_refused_at_the_frontend(raw: Raw, agent: str, why: str) -> None:
    """One agent-name rule, applied where requests come in: before, the frontend accepted names
    (a NUL, '*', '../alice', 'kernel') that the storage service then refused or mis-keyed."""
    h = good_header(agent=agent)
    raw.send(raw.request(h, {"text": "x"}))
    expect_error(raw, ErrorCode.BAD_FRAME, rid=h["id"], text=why)


def test_bad_target(raw: Raw) -> None:
    h = good_header(target=42)
    raw.send(raw.request(h, {"text": "x"}))
    expect_error(raw, ErrorCode.BAD_FRAME, rid=h["id"], text="target")


@pytest.mark.parametrize("kind", ["reply", "ready", "heartbeat", "disconnect", 5])
def test_agents_may_only_send_requests(raw: Raw, kind: Any) -> None:
    h = good_header(kind=kind)
    raw.send(raw.request(h))
    expect_error(raw, ErrorCode.BAD_FRAME, rid=h["id"], text="only send requests")


# ------------------------------------------------------------- addressing
def test_unknown_service(raw: Raw) -> None:
    h = good_header(service="nosuchservice")
    raw.send(raw.request(h))
    expect_error(raw, ErrorCode.UNKNOWN_SERVICE, rid=h["id"], text="nosuchservice")


def test_unknown_op(raw: Raw) -> None:
    h = good_header(op="nosuchop")
    raw.send(raw.request(h))
    err = expect_error(raw, ErrorCode.UNKNOWN_OP, rid=h["id"], text="nosuchop")
    assert "echo" in err["message"]  # the error lists the ops that exist


def test_unknown_kernel_op(raw: Raw) -> None:
    h = good_header(service="kernel", op="reboot")
    raw.send(raw.request(h))
    expect_error(raw, ErrorCode.UNKNOWN_OP, rid=h["id"])


def test_unknown_model(raw: Raw) -> None:
    h = good_header(target="gpt-17")
    raw.send(raw.request(h, {"text": "x"}))
    expect_error(raw, ErrorCode.UNKNOWN_TARGET, rid=h["id"], text="gpt-17")


# -------------------------------------------------------------------- body
@pytest.mark.parametrize("op, body", [
    ("echo", {"text": 123}),
    ("echo", {"text": None}),
    ("echo", {}),
    ("echo", {"text": "x", "unexpected": 1}),
    ("sleep", {"seconds": "a while"}),
    ("sleep", {"seconds": -1}),
    ("sleep", {"seconds": 1e9}),
    ("count", {"n": [1, 2]}),
])
def test_wrong_argument_types(raw: Raw, op: str, body: dict[str, Any]) -> None:
    h = good_header(op=op)
    raw.send(raw.request(h, body))
    expect_error(raw, ErrorCode.INVALID_ARGUMENT, rid=h["id"], text=f"echo.{op}")


@pytest.mark.parametrize("body", [[1, 2, 3], "text", 42, None, b"bytes", True])
def test_non_map_body(raw: Raw, body: Any) -> None:
    h = good_header()
    raw.send(raw.codec.encode_raw(pack(h), pack(body)))
    expect_error(raw, ErrorCode.INVALID_ARGUMENT, rid=h["id"], text="map")


@pytest.mark.parametrize("body_raw", [
    b"\xc1",                                        # not msgpack
    b"\x82\xa4text",                                # truncated map
    msgpack.packb({1: "int key"}),                  # non-string key
    msgpack.packb({"text": msgpack.ExtType(3, b"e")}),  # ext type
    msgpack.packb({"text": msgpack.Timestamp(1, 0)}),  # timestamp ext
    b"\xdd\xff\xff\xff\xff",                         # array bomb
])
def test_body_not_decodable(raw: Raw, body_raw: bytes) -> None:
    h = good_header()
    raw.send(raw.codec.encode_raw(pack(h), body_raw))
    expect_error(raw, ErrorCode.BAD_FRAME, rid=h["id"], text="body")


def test_sdk_maps_errors_to_exceptions(k: Kernel) -> None:
    with sdk.connect(k.run_dir, agent="typo", timeout=10.0) as c:
        with pytest.raises(sdk.InvalidArgument) as info:
            c.call("echo", "echo", text=123)
        assert info.value.code == "INVALID_ARGUMENT" and not info.value.retryable
        with pytest.raises(sdk.InvalidArgument) as info:
            c.call("nosuchservice", "x")
        assert info.value.code == "UNKNOWN_SERVICE"
        with pytest.raises(sdk.InvalidArgument) as info:
            c.call("echo", "nosuchop")
        assert info.value.code == "UNKNOWN_OP"


# ------------------------------------------------------------------ volume
@pytest.mark.timeout(60)
def test_flood_of_garbage_then_service(raw: Raw) -> None:
    for i in range(2000):
        kind = i % 4
        if kind == 0:
            raw.send([os.urandom(i % 100 + 1)])
        elif kind == 1:
            raw.send([b"", VERSION, os.urandom(32), os.urandom(20), os.urandom(20)])
        elif kind == 2:
            raw.send(raw.codec.encode_raw(os.urandom(30), pack({})))
        else:
            raw.send(raw.request(good_header(op="nosuchop")))
    answered = 0
    deadline = time.monotonic() + 30
    while answered < 2000 and time.monotonic() < deadline:
        if raw.recv(5.0) is None:
            break
        answered += 1
    assert answered == 2000  # every bad frame got exactly one error reply
    expect_silence(raw, 0.2)
    h = good_header()
    raw.send(raw.request(h, {"text": "served"}))
    msg = raw.recv()
    assert msg is not None and msg.header["id"] == h["id"] and msg.header["status"] == "ok"


def test_duplicate_request_id_while_pending_runs_once(raw: Raw, gates) -> None:
    """A re-sent request id is not run twice (the SDK's retry relies on this). The first run waits
    at a gate until the scheduler has surely read the copy: it answers a ping sent after it on the
    same connection (frames on one connection are read in order)."""
    gate = gates.new()
    h = good_header(op="sleep")
    frames = raw.request(h, {"seconds": 0, "tag": "dup", "gate": gate.path})
    raw.send(frames)
    raw.send(frames)
    ping = good_header(service="kernel", op="ping")
    raw.send(raw.request(ping))
    pong = raw.recv()
    assert pong is not None and pong.header["id"] == ping["id"], pong  # nothing else came first
    gate.open()
    first = raw.recv()
    assert first is not None and first.header["id"] == h["id"] and first.body["tag"] == "dup"
    # once finished, the same id is answered from the reply cache, not re-run
    raw.send(frames)
    cached = raw.recv()
    assert cached is not None and cached.body == first.body
    expect_silence(raw, 0.5)


def test_protocol_error_never_escapes_codec(k: Kernel) -> None:
    codec = Codec(k.run_dir.load_key())
    with pytest.raises(ProtocolError):
        codec.decode([b"nope"])
