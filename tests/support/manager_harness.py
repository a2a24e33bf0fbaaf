"""Drive a `ManagerCore` by hand: a recording outbox, typed messages in and out, no sockets.

The manager-side twin of `core_harness.py`. Every message goes the way the
shell would carry it: built as a typed message, signed and framed, verified
and parsed back (`messages.parse`), handed to the core. Every answer the core
sends is framed and parsed back the same way, so a test also checks that the
core only ever sends well-formed messages.

    h = ManagerHarness(EchoManager)
    h.dispatch("r1", "echo", {"text": "hi"})
    h.end_of_batch()
    (reply,) = h.replies()

Ops declared `inline` run on the test's thread (the harness plays the socket
thread); the others run on a real thread pool, so `h.wait_for(n)` waits for
their answers. `ctx.call` requests a handler makes are captured (`h.calls()`)
and answered with `h.answer_call(...)`.
"""
from __future__ import annotations

import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aios import messages
from aios.config import Config
from aios.managers.base import Manager
from aios.managers.manager_core import ManagerCore
from aios.protocol import Codec, ErrorCode, Status, error_body
from aios.rundir import RunDir

KEY = b"manager-harness-key-0123456789ab"
AGENT = b"\x00agent-a"


@dataclass
class Answer:
    """A message the core sent to the scheduler, framed and parsed back."""

    msg: messages.Message
    body: Any

    @property
    def status(self) -> str | None:
        return self.msg.status if isinstance(self.msg, messages.Reply) else None

    @property
    def code(self) -> str | None:
        err = self.body.get("error") if isinstance(self.body, dict) else None
        return err["code"] if isinstance(err, dict) else None


class RecordingOutbox:
    """The core's Outbox as a list; safe to call from pool threads."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.lock = threading.Condition()
        self.sent: list[Answer] = []
        self.call_frames: list[list[bytes]] = []

    def send(self, msg: messages.Message, body: Any = None) -> None:
        raw = self.codec.decode(self.codec.encode(msg.to_header(), body))
        typed = messages.parse(raw.header, messages.FROM_MANAGER)
        with self.lock:
            self.sent.append(Answer(typed, raw.body))
            self.lock.notify_all()

    def send_frames(self, frames: list[bytes]) -> None:
        with self.lock:
            self.call_frames.append(frames)
            self.lock.notify_all()


class ManagerHarness:
    """A manager (built from its class, `setup()` run) wired to a `ManagerCore` with a recording outbox."""

    def __init__(self, cls: type[Manager], *, options: Any = None, capacity: int | None = None,
                 config: Config | None = None) -> None:
        self.codec = Codec(KEY)
        self.run_dir = RunDir(tempfile.mkdtemp(prefix="aios-mh-"))
        self.manager = cls("harness", self.run_dir, config or Config(), options, capacity)
        self.manager.setup()
        self.out = RecordingOutbox(self.codec)
        self.pool = ThreadPoolExecutor(max_workers=self.manager.capacity, thread_name_prefix="harness-pool")
        self.core = ManagerCore(self.manager, self.out, self.codec, self.pool)

    # ---------------------------------------------------------------- input
    def _deliver(self, msg: messages.Message, body: Any = None) -> None:
        raw = self.codec.decode(self.codec.encode(msg.to_header(), body if body is not None else {}))
        self.core.handle(messages.parse(raw.header, messages.FROM_SCHEDULER_TO_MANAGER), raw)

    def dispatch(self, rid: str, op: str, body: Any = None, *, client: bytes = AGENT, agent: str = "alice",
                 deadline: float | None = None, slice: int | None = None, attempt: int = 1) -> None:
        """`attempt` > 1: the scheduler runs the request again after its manager died under it."""
        self._deliver(messages.Dispatch(id=rid, client=client, agent=agent, service=self.manager.service, op=op,
                                        slice=slice, deadline=deadline, attempt=attempt), body)

    def cancel(self, rid: str, client: bytes = AGENT) -> None:
        self._deliver(messages.Cancel(rid, client))

    def end_of_batch(self) -> None:
        self.core.end_of_batch()

    # --------------------------------------------------------------- output
    def wait_for(self, n: int, timeout: float = 10.0) -> list[Answer]:
        """The first `n` answers, waiting for handlers on the pool (an event count, not a speed check)."""
        end = time.monotonic() + timeout
        with self.out.lock:
            while len(self.out.sent) < n:
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {n} answers, got {len(self.out.sent)}: {self.out.sent}")
                self.out.lock.wait(left)
            return list(self.out.sent[:n])

    def replies(self) -> list[Answer]:
        with self.out.lock:
            return [a for a in self.out.sent if isinstance(a.msg, messages.Reply)]

    def take(self) -> list[Answer]:
        """Everything sent since the last take."""
        with self.out.lock:
            out, self.out.sent = self.out.sent, []
            return out

    # ---------------------------------------------------------------- calls
    def calls(self, n: int = 1, timeout: float = 10.0) -> list[messages.Call]:
        """The first `n` calls handlers made, as the scheduler would parse them."""
        end = time.monotonic() + timeout
        with self.out.lock:
            while len(self.out.call_frames) < n:
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {n} calls, got {len(self.out.call_frames)}")
                self.out.lock.wait(left)
            frames = list(self.out.call_frames[:n])
        out = []
        for f in frames:
            typed = messages.parse(self.codec.decode(f).header, messages.FROM_MANAGER)
            assert isinstance(typed, messages.Call)
            out.append(typed)
        return out

    def answer_call(self, call: messages.Call, result: Any = None, *,
                    error: tuple[ErrorCode, str] | None = None) -> None:
        """The scheduler's final reply to a handler's call."""
        if error is not None:
            self._deliver(messages.Reply(call.id, Status.ERROR.value), error_body(*error))
        else:
            self._deliver(messages.Reply(call.id, Status.OK.value), result if result is not None else {})

    def close(self) -> None:
        self.core.cancel_all()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.manager.teardown()
