"""Lean multipart send and receive for the syscall hot path (scheduler and SDK).

pyzmq's `send_multipart` ORs `zmq.SNDMORE` (an IntFlag enum member) into the
flags of every frame but the last, and its `recv_multipart` asks
`getsockopt(RCVMORE)` after every frame, which converts the option to a
`SocketOption` enum member first. Python's enum machinery makes each of those
cost more than the frame itself: about 3-4 µs per AIOS frame set each way,
paid on both sides of every system call. These helpers do the same with
plain ints and `Frame.more`.

The contracts are those of `send_multipart(frames, flags)` and
`recv_multipart(flags)` for lists of bytes:
- send: all frames go out as one message, or the first frame raises
  (`zmq.Again` when NOBLOCK and the queue is full, `zmq.ZMQError` such as
  EHOSTUNREACH from a ROUTER_MANDATORY socket) before anything was queued.
  Frames of 64 KiB and more are sent without copying (like `copy=False`);
  smaller ones are copied, which is cheaper than wrapping them in zmq.Frame.
- recv: one whole message as a list of bytes, or `zmq.Again` (NOBLOCK and
  nothing waiting). The frames of a message arrive together, so only the
  first receive can block or fail.
"""
from __future__ import annotations

from typing import Sequence

import zmq

SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
#: frames at least this large are sent zero-copy (pyzmq's own copy threshold)
COPY_THRESHOLD = zmq.COPY_THRESHOLD


def send_multipart(sock: zmq.Socket, frames: Sequence[bytes], flags: int = 0) -> None:
    send = sock.send
    flags = int(flags)
    more = flags | SNDMORE
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        if len(frame) < COPY_THRESHOLD:
            send(frame, more if i < last else flags)
        else:
            send(frame, more if i < last else flags, copy=False)


def recv_multipart(sock: zmq.Socket, flags: int = 0) -> list[bytes]:
    recv = sock.recv
    frame = recv(flags, copy=False)
    parts = [frame.bytes]
    while frame.more:
        frame = recv(flags, copy=False)
        parts.append(frame.bytes)
    return parts
