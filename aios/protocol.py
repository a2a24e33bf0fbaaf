"""The AIOS wire protocol: frames, signing, limits and error codes.

Every message on every AIOS socket has the shape (the typed messages that
travel in `header` are defined in `aios.messages`)

    [routing ids ...] [b""] [VERSION] [signature] [header] [body]

`header` and `body` are msgpack maps. `signature` is HMAC-SHA256 over
VERSION + header + body with the run key, and is checked with
`hmac.compare_digest` *before* either map is unpacked, so unauthenticated
bytes never reach the msgpack decoder. Unpacking uses strict options (no ext
types, string map keys only) and any failure becomes a `ProtocolError` that
callers turn into a dropped frame or an error reply, never a crash.

This module depends on the standard library and msgpack only, so that tools
written in other languages can follow it from this file alone.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Any

import msgpack

VERSION = b"AIOS1"
SIGNATURE_BYTES = 32
#: routing ids a frame may carry before the delimiter (agent -> scheduler -> manager is at most 2)
MAX_ROUTING_FRAMES = 4
KEY_BYTES = 32


class Kind(str, enum.Enum):
    """What a message is; carried in the header's "kind" field."""

    REQUEST = "request"      # agent -> scheduler: a system call
    CALL = "call"            # manager -> scheduler: a system call on behalf of the agent it serves
    DISPATCH = "dispatch"    # scheduler -> manager: run this request
    REPLY = "reply"          # answer to a request, call or dispatch (status ok|partial|error)
    READY = "ready"          # manager -> scheduler: READY(service, capacity, incarnation)
    HEARTBEAT = "heartbeat"  # both ways between scheduler and managers
    YIELD = "yield"          # manager -> scheduler: preempted request goes back to the queue
    CANCEL = "cancel"        # scheduler -> manager: stop working on a request
    REREGISTER = "reregister"  # scheduler -> unknown manager: send READY again
    DISCONNECT = "disconnect"  # manager -> scheduler: leaving on purpose


class Status(str, enum.Enum):
    OK = "ok"
    PARTIAL = "partial"
    ERROR = "error"


class ErrorCode(str, enum.Enum):
    """Error codes. `retryable` says whether the same call may be repeated and may then succeed.

    It is the code's usual advice; one reply may override it (`error_body(..., retryable=)`): a
    MANAGER_DIED for a call that is not safe to repeat and may have run is not retryable, since
    repeating it could do the work twice."""

    BAD_FRAME = "BAD_FRAME"
    BAD_SIGNATURE = "BAD_SIGNATURE"
    TOO_LARGE = "TOO_LARGE"
    UNKNOWN_SERVICE = "UNKNOWN_SERVICE"
    UNKNOWN_OP = "UNKNOWN_OP"
    UNKNOWN_TARGET = "UNKNOWN_TARGET"  # no manager of the service serves the named model / tool
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    MANAGER_DIED = "MANAGER_DIED"
    RETRIES_EXHAUSTED = "RETRIES_EXHAUSTED"  # its manager died each time it ran: the request may be the cause
    UNAVAILABLE = "UNAVAILABLE"
    OVERLOADED = "OVERLOADED"
    DENIED = "DENIED"
    NOT_FOUND = "NOT_FOUND"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    CALL_CYCLE = "CALL_CYCLE"
    CANCELLED = "CANCELLED"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    BACKEND_ERROR = "BACKEND_ERROR"
    INTERNAL = "INTERNAL"

    @property
    def retryable(self) -> bool:
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {ErrorCode.MANAGER_DIED, ErrorCode.UNAVAILABLE, ErrorCode.OVERLOADED, ErrorCode.SHUTTING_DOWN}
)


class ProtocolError(Exception):
    """A frame that cannot be accepted. `code` says why; `header` is set when it was readable."""

    def __init__(self, code: ErrorCode, message: str, header: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.header = header


def error_body(code: ErrorCode | str, message: str, retryable: bool | None = None) -> dict[str, Any]:
    """An error reply's body; `retryable` overrides the code's usual advice for this one reply."""
    code = ErrorCode(code)
    return {"error": {"code": code.value, "message": message,
                      "retryable": code.retryable if retryable is None else retryable}}


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def new_request_id() -> str:
    # 128 random bits as 32 hex digits, the same as uuid.uuid4().hex without building a UUID object
    return os.urandom(16).hex()


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """Strict msgpack decoding for untrusted input: no ext types, string keys, bounded sizes."""
    n = len(data)
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        use_list=True,
        ext_hook=_refuse_ext,
        max_str_len=n,
        max_bin_len=n,
        max_array_len=n,
        max_map_len=n,
        # msgpack decodes ext type -1 (timestamps) itself, bypassing ext_hook: refuse every
        # ext with a payload here; the zero-length ones still reach _refuse_ext
        max_ext_len=0,
        # strict_map_key still lets bytes keys through; only str keys are allowed
        object_pairs_hook=_str_keys_only,
    )


def _str_keys_only(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    for key, _ in pairs:
        if type(key) is not str:
            raise ValueError(f"map keys must be strings, not {type(key).__name__}")
    return dict(pairs)


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed")


@dataclass(slots=True)
class Frame:
    """A verified, decoded frame set (its header still a map: `aios.messages` types it). `routing` is the
    envelope before the delimiter."""

    routing: list[bytes]
    header: dict[str, Any]
    body_raw: bytes
    _body: Any = field(default=None)
    _body_decoded: bool = False

    @property
    def body(self) -> Any:
        """Decoded lazily: a broker forwarding a body never pays for decoding it."""
        if not self._body_decoded:
            try:
                self._body = unpack(self.body_raw) if self.body_raw else {}
            except Exception as exc:  # msgpack raises many types on hostile input
                raise ProtocolError(ErrorCode.BAD_FRAME, f"body is not valid msgpack: {exc}", self.header) from exc
            self._body_decoded = True
        return self._body


class Codec:
    """Signs and verifies frames with one run key. Cheap to create; holds no socket."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("signing key must be at least 16 bytes")
        self._key = key
        # HMAC state after the key and VERSION, copied for each frame and never updated itself,
        # so threads may share it. Kept as the OpenSSL HMAC object inside hmac.HMAC when there
        # is one (same copy/update/digest API): that skips a Python layer whose digest() copies.
        mac = hmac.new(key, VERSION, hashlib.sha256)
        self._mac = getattr(mac, "_hmac", None) or mac

    def sign(self, header_raw: bytes, body_raw: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(header_raw)
        mac.update(body_raw)
        return mac.digest()

    def encode(self, header: dict[str, Any], body: Any = None, routing: list[bytes] | None = None) -> list[bytes]:
        header_raw = pack(header)
        body_raw = pack(body if body is not None else {})
        return self.encode_raw(header_raw, body_raw, routing)

    def encode_raw(self, header_raw: bytes, body_raw: bytes, routing: list[bytes] | None = None) -> list[bytes]:
        frames = list(routing) if routing else []
        frames += [b"", VERSION, self.sign(header_raw, body_raw), header_raw, body_raw]
        return frames

    def decode(self, frames: list[bytes]) -> Frame:
        """Verify and decode. Raises ProtocolError; never anything else."""
        try:
            split = frames.index(b"")
        except ValueError:
            raise ProtocolError(ErrorCode.BAD_FRAME, "no empty delimiter frame") from None
        if split > MAX_ROUTING_FRAMES:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"too many routing frames ({split})")
        rest = frames[split + 1 :]
        if len(rest) != 4:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"expected 4 frames after the delimiter, got {len(rest)}")
        version, signature, header_raw, body_raw = rest
        if version != VERSION:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"unsupported protocol version {bytes(version)[:16]!r}")
        if len(signature) != SIGNATURE_BYTES or not hmac.compare_digest(
            signature, self.sign(header_raw, body_raw)
        ):
            raise ProtocolError(ErrorCode.BAD_SIGNATURE, "signature does not match (wrong key or altered frame)")
        try:
            header = unpack(header_raw)
        except Exception as exc:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"header is not valid msgpack: {exc}") from exc
        if not isinstance(header, dict):
            raise ProtocolError(ErrorCode.BAD_FRAME, "header must be a map")
        return Frame(list(frames[:split]), header, body_raw)
