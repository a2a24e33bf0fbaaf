"""Unit tests of the wire protocol: every way `Codec.decode` refuses a frame, and round trips."""
from __future__ import annotations

import msgpack
import pytest

from aios import protocol
from aios.protocol import (
    MAX_ROUTING_FRAMES,
    SIGNATURE_BYTES,
    VERSION,
    Codec,
    ErrorCode,
    Kind,
    ProtocolError,
    Status,
    error_body,
    pack,
    unpack,
)

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
HEADER = {"kind": "request", "id": "r1", "agent": "a", "service": "echo", "op": "echo"}
BODY = {"text": "hello", "n": [1, 2, 3], "blob": b"\x00\x01"}


@pytest.fixture
def codec() -> Codec:
    return Codec(KEY)


def rejected(codec: Codec, frames: list[bytes]) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        codec.decode(frames)
    assert isinstance(info.value.message, str) and info.value.message
    return info.value


def signed(codec: Codec, header_raw: bytes, body_raw: bytes, routing: list[bytes] | None = None) -> list[bytes]:
    """Frames whose signature is valid for arbitrary (possibly hostile) header/body bytes."""
    return codec.encode_raw(header_raw, body_raw, routing)


# --------------------------------------------------------------- round trips
def test_round_trip_without_routing(codec: Codec) -> None:
    frames = codec.encode(HEADER, BODY)
    assert frames[0] == b"" and frames[1] == VERSION and len(frames[2]) == SIGNATURE_BYTES
    msg = codec.decode(frames)
    assert msg.routing == []
    assert msg.header == HEADER
    assert msg.body == BODY


def test_round_trip_with_routing(codec: Codec) -> None:
    frames = codec.encode(HEADER, BODY, routing=[b"client-1", b"hop"])
    msg = codec.decode(frames)
    assert msg.routing == [b"client-1", b"hop"]
    assert msg.header == HEADER and msg.body == BODY


def test_round_trip_default_body_is_empty_map(codec: Codec) -> None:
    msg = codec.decode(codec.encode({"kind": "heartbeat"}))
    assert msg.body == {}
    assert msg.header == {"kind": "heartbeat"}


def test_round_trip_raw_body_forwarded_unchanged(codec: Codec) -> None:
    body_raw = pack(BODY)
    frames = codec.encode_raw(pack(HEADER), body_raw, [b"x"])
    msg = codec.decode(frames)
    assert msg.body_raw == body_raw
    # a broker re-signs the same raw body under a new header without decoding it
    again = codec.decode(codec.encode_raw(pack({"id": "r1", "status": "ok"}), msg.body_raw))
    assert again.body == BODY


def test_max_routing_frames_accepted(codec: Codec) -> None:
    routing = [b"r%d" % i for i in range(MAX_ROUTING_FRAMES)]
    assert codec.decode(codec.encode(HEADER, BODY, routing)).routing == routing


def test_key_must_be_long_enough() -> None:
    with pytest.raises(ValueError):
        Codec(b"short")


def test_new_key_and_request_ids_are_fresh() -> None:
    assert len(protocol.new_key()) == protocol.KEY_BYTES
    assert protocol.new_key() != protocol.new_key()
    ids = {protocol.new_request_id() for _ in range(100)}
    assert len(ids) == 100


# -------------------------------------------------------------- rejections
def test_no_delimiter(codec: Codec) -> None:
    frames = codec.encode(HEADER, BODY)[1:]  # drop the empty delimiter
    assert rejected(codec, frames).code is ErrorCode.BAD_FRAME
    assert rejected(codec, [b"random garbage"]).code is ErrorCode.BAD_FRAME
    assert rejected(codec, []).code is ErrorCode.BAD_FRAME


def test_too_many_routing_frames(codec: Codec) -> None:
    routing = [b"r%d" % i for i in range(MAX_ROUTING_FRAMES + 1)]
    err = rejected(codec, codec.encode(HEADER, BODY, routing))
    assert err.code is ErrorCode.BAD_FRAME and "routing" in err.message


@pytest.mark.parametrize("extra", [-2, -1, 1, 3])
def test_wrong_frame_count(codec: Codec, extra: int) -> None:
    frames = codec.encode(HEADER, BODY)
    frames = frames[:extra] if extra < 0 else frames + [b"x"] * extra
    err = rejected(codec, frames)
    assert err.code is ErrorCode.BAD_FRAME and "frames" in err.message


def test_only_delimiter(codec: Codec) -> None:
    assert rejected(codec, [b""]).code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("version", [b"AIOS0", b"AIOS2", b"", b"x" * 1000])
def test_bad_version(codec: Codec, version: bytes) -> None:
    frames = codec.encode(HEADER, BODY)
    frames[1] = version
    err = rejected(codec, frames)
    assert err.code is ErrorCode.BAD_FRAME and "version" in err.message


@pytest.mark.parametrize("mutate", [
    lambda s: bytes(32),                       # all zeros
    lambda s: s[:-1] + bytes([s[-1] ^ 1]),      # one bit flipped
    lambda s: s[:16],                           # truncated
    lambda s: s + b"\x00",                      # too long
    lambda s: b"",                              # missing
])
def test_bad_signature(codec: Codec, mutate) -> None:
    frames = codec.encode(HEADER, BODY)
    frames[2] = mutate(frames[2])
    assert rejected(codec, frames).code is ErrorCode.BAD_SIGNATURE


def test_wrong_key(codec: Codec) -> None:
    frames = Codec(OTHER_KEY).encode(HEADER, BODY)
    err = rejected(codec, frames)
    assert err.code is ErrorCode.BAD_SIGNATURE
    assert err.header is None  # nothing unauthenticated was unpacked


def test_altered_header(codec: Codec) -> None:
    frames = codec.encode(HEADER, BODY)
    frames[3] = pack({**HEADER, "agent": "mallory"})
    assert rejected(codec, frames).code is ErrorCode.BAD_SIGNATURE


def test_altered_body(codec: Codec) -> None:
    frames = codec.encode(HEADER, BODY)
    frames[4] = pack({**BODY, "text": "changed"})
    assert rejected(codec, frames).code is ErrorCode.BAD_SIGNATURE


def test_swapped_header_and_body(codec: Codec) -> None:
    frames = codec.encode(HEADER, BODY)
    frames[3], frames[4] = frames[4], frames[3]
    assert rejected(codec, frames).code is ErrorCode.BAD_SIGNATURE


def test_signature_is_not_checked_after_unpacking(codec: Codec, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unauthenticated bytes never reach the msgpack decoder."""
    calls = []
    real = protocol.unpack
    monkeypatch.setattr(protocol, "unpack", lambda data: calls.append(data) or real(data))
    frames = Codec(OTHER_KEY).encode(HEADER, BODY)
    rejected(codec, frames)
    assert calls == []


@pytest.mark.parametrize("header", [[1, 2, 3], "a string", 42, None, b"bytes", True])
def test_non_map_header(codec: Codec, header) -> None:
    err = rejected(codec, signed(codec, pack(header), pack({})))
    assert err.code is ErrorCode.BAD_FRAME and "map" in err.message


@pytest.mark.parametrize("raw", [b"\xc1", b"\x85\xa1a", b"\xdb\xff\xff\xff\xff", b"", b"\x81\xa1a\x01\x02"])
def test_non_msgpack_header(codec: Codec, raw: bytes) -> None:
    err = rejected(codec, signed(codec, raw, pack({})))
    assert err.code is ErrorCode.BAD_FRAME and "header" in err.message


def test_ext_types_refused_in_header(codec: Codec) -> None:
    raw = msgpack.packb({"id": msgpack.ExtType(5, b"payload")})
    err = rejected(codec, signed(codec, raw, pack({})))
    assert err.code is ErrorCode.BAD_FRAME and "ext" in err.message


@pytest.mark.parametrize("raw", [
    msgpack.packb({"t": msgpack.Timestamp(1, 0)}),           # timestamp32 (ext -1)
    msgpack.packb({"t": msgpack.Timestamp(2 ** 40, 5)}),     # timestamp96
    b"\x81\xa1t\xc7\x00\xff",                                # ext8, type -1, no payload
    b"\x81\xa1t\xc7\x00\x05",                                # ext8, type 5, no payload
])
def test_timestamp_and_empty_ext_refused(codec: Codec, raw: bytes) -> None:
    # msgpack decodes ext -1 itself without calling ext_hook; it must still be refused
    assert rejected(codec, signed(codec, raw, pack({}))).code is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("key", [1, b"bytes-key", 1.5, None])
def test_non_string_map_keys_refused(codec: Codec, key) -> None:
    raw = msgpack.packb({key: "v"}, use_bin_type=True)
    assert rejected(codec, signed(codec, raw, pack({}))).code is ErrorCode.BAD_FRAME


def test_nested_non_string_keys_refused(codec: Codec) -> None:
    raw = msgpack.packb({"id": "x", "nested": {1: 2}})
    assert rejected(codec, signed(codec, raw, pack({}))).code is ErrorCode.BAD_FRAME


def test_header_with_declared_length_beyond_data(codec: Codec) -> None:
    # a map32 claiming 2**32-1 entries in 5 bytes: must fail fast, not allocate
    raw = b"\xdf\xff\xff\xff\xff"
    assert rejected(codec, signed(codec, raw, pack({}))).code is ErrorCode.BAD_FRAME


# ---------------------------------------------------------- body decoding
@pytest.mark.parametrize("raw", [
    b"\xc1",                                             # never-used byte
    b"\x92\x01",                                         # truncated array
    msgpack.packb({1: "int key"}),                       # non-string key
    msgpack.packb({"x": msgpack.ExtType(1, b"e")}),      # ext type
    pack({"a": 1}) + b"\x00",                             # trailing data
])
def test_body_decode_errors(codec: Codec, raw: bytes) -> None:
    msg = codec.decode(signed(codec, pack(HEADER), raw))  # the header is fine: decode succeeds
    with pytest.raises(ProtocolError) as info:
        msg.body
    assert info.value.code is ErrorCode.BAD_FRAME
    assert "body" in info.value.message
    assert info.value.header == HEADER  # so the error reply can name the request


def test_body_is_decoded_lazily(codec: Codec, monkeypatch: pytest.MonkeyPatch) -> None:
    msg = codec.decode(codec.encode(HEADER, BODY))
    calls = []
    real = protocol.unpack
    monkeypatch.setattr(protocol, "unpack", lambda data: calls.append(1) or real(data))
    assert msg.body == BODY
    assert msg.body == BODY
    assert len(calls) == 1


def test_empty_body_is_empty_map(codec: Codec) -> None:
    msg = codec.decode(signed(codec, pack(HEADER), b""))
    assert msg.body == {}


def test_non_map_body_is_accepted_by_the_codec(codec: Codec) -> None:
    # the codec does not judge the body's shape; managers reject non-map bodies
    msg = codec.decode(codec.encode(HEADER, [1, 2]))
    assert msg.body == [1, 2]


def test_unpack_is_strict() -> None:
    with pytest.raises(Exception):
        unpack(msgpack.packb({1: 2}))
    with pytest.raises(Exception):
        unpack(msgpack.packb(msgpack.ExtType(3, b"x")))
    assert unpack(pack({"s": "str", "b": b"bin"})) == {"s": "str", "b": b"bin"}


def test_decode_never_raises_anything_but_protocol_error(codec: Codec) -> None:
    import random
    rng = random.Random(1234)
    good = codec.encode(HEADER, BODY)
    for _ in range(500):
        frames = [bytes(f) for f in good]
        i = rng.randrange(len(frames))
        choice = rng.random()
        if choice < 0.4:
            frames[i] = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        elif choice < 0.7:
            del frames[i]
        else:
            frames.insert(i, bytes(rng.randrange(256) for _ in range(rng.randrange(8))))
        try:
            msg = codec.decode(frames)
        except ProtocolError:
            continue
        try:
            msg.body
        except ProtocolError:
            pass


# ------------------------------------------------------------- error codes
def test_retryable_flags() -> None:
    retryable = {c for c in ErrorCode if c.retryable}
    assert retryable == {ErrorCode.MANAGER_DIED, ErrorCode.UNAVAILABLE, ErrorCode.OVERLOADED,
                         ErrorCode.SHUTTING_DOWN}
    for code in (ErrorCode.BAD_FRAME, ErrorCode.BAD_SIGNATURE, ErrorCode.INVALID_ARGUMENT,
                 ErrorCode.DEADLINE_EXCEEDED, ErrorCode.UNKNOWN_OP, ErrorCode.DENIED, ErrorCode.INTERNAL):
        assert code.retryable is False


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_body_shape(code: ErrorCode) -> None:
    body = error_body(code, "what happened")
    assert body == {"error": {"code": code.value, "message": "what happened", "retryable": code.retryable}}
    # it survives the wire
    assert unpack(pack(body)) == body


def test_error_body_accepts_code_strings_and_rejects_unknown() -> None:
    assert error_body("MANAGER_DIED", "m")["error"]["retryable"] is True
    with pytest.raises(ValueError):
        error_body("NO_SUCH_CODE", "m")


def test_one_reply_may_override_the_codes_retry_advice() -> None:
    """A MANAGER_DIED for a call not safe to repeat, which may have run, is not retryable."""
    from aios.sdk import errors
    body = error_body(ErrorCode.MANAGER_DIED, "it may or may not have taken effect", retryable=False)
    assert body["error"] == {"code": "MANAGER_DIED", "message": "it may or may not have taken effect",
                             "retryable": False}
    died = errors.error_from_body(unpack(pack(body)))
    assert isinstance(died, errors.KernelError) and died.retryable is False
    assert error_body(ErrorCode.DENIED, "m", retryable=None)["error"]["retryable"] is False


def test_error_codes_round_trip_to_sdk_exceptions() -> None:
    from aios.sdk import errors
    assert isinstance(errors.error_from_body(error_body(ErrorCode.DEADLINE_EXCEEDED, "x")), errors.KernelTimeout)
    assert isinstance(errors.error_from_body(error_body(ErrorCode.UNKNOWN_OP, "x")), errors.InvalidArgument)
    died = errors.error_from_body(error_body(ErrorCode.MANAGER_DIED, "x"))
    assert isinstance(died, errors.KernelError) and died.retryable and died.code == "MANAGER_DIED"
    assert isinstance(errors.error_from_body({"nonsense": 1}), errors.KernelError)
    assert isinstance(errors.error_from_body([1, 2]), errors.KernelError)


def test_enums_values() -> None:
    assert {k.value for k in Kind} >= {"request", "reply", "ready", "heartbeat", "yield", "cancel"}
    assert {s.value for s in Status} == {"ok", "partial", "error"}
