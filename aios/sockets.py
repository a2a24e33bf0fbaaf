"""One socket factory for the scheduler, the managers and the SDK.

Every AIOS socket gets the same hygiene, set in one place: `LINGER 0` (a
closing process never blocks on unsent messages), bounded high-water marks,
a maximum message size on sockets that read untrusted input,
`ROUTER_MANDATORY` on routers (an unroutable reply is an error we see, not a
silent drop), quick reconnects on dealers, and CurveZMQ when the transport is
tcp with `curve = true`.

Callers' dealers (the SDK, the supervisor's probe) keep one routing id for
their lifetime, an unguessable one chosen here, instead of the one ZeroMQ
generates per connection: a call re-sent after the scheduler restarted then
comes from the address the managers know it by, so the new scheduler can
bind it to the run still going on (`aios.scheduler.adoption`). The frontend
router hands an id over to the newest connection claiming it (a caller that
reconnects before the scheduler noticed its old connection die); claiming
another caller's id takes knowing it: 128 random bits, never shown to
callers.

Each factory takes either the kernel's `Config` (the scheduler and the
managers, which read it anyway) or the run directory's `Endpoint`
description (agents: `RunDir.read_endpoint()`); both say the same.
"""
from __future__ import annotations

import os

import zmq

from aios.config import Config
from aios.endpoint import Endpoint
from aios.rundir import RunDir

#: dealers retry a lost connection after 50 ms, backing off to 1 s (the scheduler restarts in well under that)
RECONNECT_IVL_MS = 50
RECONNECT_IVL_MAX_MS = 1000
#: first byte of a caller's routing id: never a zero byte (ZeroMQ's generated ids) nor "@" (the scheduler's
#: prefix for calls between managers, `aios.scheduler.request.BACKEND_CLIENT`)
CALLER_ID_PREFIX = b"c"


def caller_identity() -> bytes:
    """A routing id for one caller socket: the prefix and 128 random bits."""
    return CALLER_ID_PREFIX + os.urandom(16)


def high_water_mark(source: Config | Endpoint) -> int:
    """The bound on queued messages per socket direction (`[kernel] high_water_mark`)."""
    return source.high_water_mark if isinstance(source, Endpoint) else source.kernel.high_water_mark


def router(ctx: zmq.Context, run_dir: RunDir, config: Config | Endpoint, *, max_message_bytes: int,
           role: str) -> zmq.Socket:
    """A scheduler-side ROUTER. `role` is "frontend" (agents) or "backend" (managers)."""
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.ROUTER_MANDATORY, 1)
    s.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    s.setsockopt(zmq.SNDHWM, high_water_mark(config))
    s.setsockopt(zmq.RCVHWM, high_water_mark(config))
    if role == "frontend":
        s.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a caller's fixed routing id follows its newest connection
    run_dir.secure_server(s, config, role)
    return s


def dealer(ctx: zmq.Context, run_dir: RunDir, config: Config | Endpoint, *, role: str,
           identity: bytes | None = None, max_message_bytes: int | None = None) -> zmq.Socket:
    """A DEALER for an agent (`role="agent"`) or a manager (`role="manager"`), not yet connected.
    An agent's gets a fixed random routing id unless `identity` is given."""
    if identity is None and role == "agent":
        identity = caller_identity()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    s.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    s.setsockopt(zmq.SNDHWM, high_water_mark(config))
    s.setsockopt(zmq.RCVHWM, high_water_mark(config))
    if max_message_bytes is not None:
        s.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    if identity is not None:
        s.setsockopt(zmq.IDENTITY, identity)
    run_dir.secure_client(s, config, role)
    return s
