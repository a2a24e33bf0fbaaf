"""The scheduler process: a service-routing broker (after ZeroMQ's Majordomo).

Agents connect DEALERs to the ROUTER frontend; managers connect DEALERs to
the ROUTER backend and announce READY(service, capacity, incarnation). Each
service has one ready queue ordered by the configured policy. A manager gets
a request only while it has free capacity (credit), so no manager is ever
flooded and a slow one holds back only its own work.

The broker verifies every frame, forwards request bodies to managers without
decoding them, answers the built-in `kernel` service itself, watches
managers' heartbeats, enforces deadlines, and when a manager dies re-queues
its in-flight requests that are safe to repeat and answers the rest with a
retryable MANAGER_DIED error, so no request is left hanging.
"""
from __future__ import annotations

import argparse
import heapq
import logging
import os
import signal
import sys
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any

import zmq

from aios.config import Config
from aios.log import setup_logging
from aios.protocol import (
    Codec,
    ErrorCode,
    Kind,
    Message,
    ProtocolError,
    Status,
    error_body,
    pack,
)
from aios.rundir import RunDir
from aios.scheduler.policies import Policy, make_policy
from aios.scheduler.request import Request
from aios.zmqio import NOBLOCK, recv_multipart, send_multipart

log = logging.getLogger("aios.scheduler")

KERNEL = "kernel"
MAX_ATTEMPTS = 3
POLL_MS = 100
# hot-path constants: an enum member's .value costs a Python call on every access
_REQUEST, _REPLY, _OK = Kind.REQUEST.value, Kind.REPLY.value, Status.OK.value
_PONG = pack({"pong": True})


@dataclass(slots=True, eq=False)
class ManagerRecord:
    identity: bytes
    name: str
    service: str
    capacity: int
    incarnation: str
    pid: int
    ops: dict[str, dict[str, Any]]
    models: list[str]
    default: bool
    credit: int
    last_seen: float
    last_sent: float
    registered: float
    inflight: dict[tuple[bytes, str], Request] = field(default_factory=dict)
    completed: int = 0


@dataclass(slots=True)
class ServiceStats:
    submitted: int = 0
    completed: int = 0
    errors: int = 0
    requeued: int = 0
    preemptions: int = 0
    wait_s_total: float = 0.0
    turnaround_s_total: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        done = max(self.completed + self.errors, 1)
        return {
            "submitted": self.submitted,
            "completed": self.completed,
            "errors": self.errors,
            "requeued": self.requeued,
            "preemptions": self.preemptions,
            "wait_mean_s": round(self.wait_s_total / done, 6),
            "turnaround_mean_s": round(self.turnaround_s_total / done, 6),
        }


class Broker:
    def __init__(self, run_dir: RunDir, config: Config) -> None:
        self.run_dir = run_dir
        self.config = config
        self.codec = Codec(run_dir.load_key())
        self.started_at = time.monotonic()
        k = config.kernel
        self.hb_interval = k.heartbeat_interval_s
        self.hb_expiry = k.heartbeat_interval_s * k.heartbeat_liveness
        self.ctx = zmq.Context()
        self.frontend = self._router(k.max_message_bytes)
        self.backend = self._router(max(k.max_message_bytes, 64 * 1024 * 1024))
        self.backend.setsockopt(zmq.ROUTER_HANDOVER, 1)
        run_dir.secure_server(self.frontend, config)
        run_dir.secure_server(self.backend, config)
        self.frontend.bind(run_dir.frontend_endpoint(config, bind=True))
        self.backend.bind(run_dir.backend_endpoint(config, bind=True))
        self.expected_services = self._expected_services(config)
        self.queues: dict[str, Policy] = {}
        self.managers: dict[bytes, ManagerRecord] = {}
        self.by_service: dict[str, list[ManagerRecord]] = defaultdict(list)
        self.pending: dict[tuple[bytes, str], Request] = {}
        self.reply_cache: OrderedDict[tuple[bytes, str], list[bytes]] = OrderedDict()
        self.deadlines: list[tuple[float, int, Request]] = []
        self.stats: dict[str, ServiceStats] = defaultdict(ServiceStats)
        self.stopping = False

    # ------------------------------------------------------------------ setup
    def _router(self, max_bytes: int) -> zmq.Socket:
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        s.setsockopt(zmq.SNDHWM, self.config.kernel.high_water_mark)
        s.setsockopt(zmq.RCVHWM, self.config.kernel.high_water_mark)
        return s

    @staticmethod
    def _expected_services(config: Config) -> set[str]:
        services = {KERNEL}
        if config.llm:
            services.add("llm")
        services.update(m.service for m in config.managers if m.service)
        return services

    def queue(self, service: str) -> Policy:
        q = self.queues.get(service)
        if q is None:
            q = self.queues[service] = make_policy(self.config.scheduler)
        return q

    # ------------------------------------------------------------------- loop
    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        next_tick = time.monotonic()
        log.info("ready: frontend %s, backend %s, policy %s", self.frontend.LAST_ENDPOINT.decode(),
                 self.backend.LAST_ENDPOINT.decode(), self.config.scheduler.policy)
        while not self.stopping:
            wake = next_tick
            if self.deadlines:  # wake exactly at the next deadline, not at the next tick
                wake = min(wake, self.deadlines[0][0])
            timeout = max(0.0, wake - time.monotonic()) * 1000
            events = dict(poller.poll(min(timeout, POLL_MS)))
            if self.backend in events:
                self._drain(self.backend, self.on_backend)
            if self.frontend in events:
                self._drain(self.frontend, self.on_frontend)
            now = time.monotonic()
            if now >= next_tick:
                self.tick(now)
                next_tick = now + min(self.hb_interval / 4, 0.25)
            else:
                self.expire_deadlines(now)
        self.close()

    def _drain(self, sock: zmq.Socket, handler: Any, limit: int = 256) -> None:
        """Take what is waiting (bounded, so one side cannot starve the other)."""
        for _ in range(limit):
            try:
                frames = recv_multipart(sock, NOBLOCK)
            except zmq.Again:
                return
            try:
                handler(frames)
            except Exception:  # a bug must not take the kernel down with it
                log.exception("failed to handle a message")

    def close(self) -> None:
        for req in list(self.pending.values()):
            self._finish_error(req, ErrorCode.SHUTTING_DOWN, "the kernel is shutting down")
        self.frontend.close(0)
        self.backend.close(0)
        self.ctx.term()

    # ---------------------------------------------------------------- sending
    def _send(self, sock: zmq.Socket, frames: list[bytes]) -> bool:
        try:
            send_multipart(sock, frames, NOBLOCK)
            return True
        except zmq.Again:
            log.warning("send queue full; dropped a message to %r", frames[0][:16])
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            if sock is self.frontend:
                self._client_gone(frames[0])
        return False

    def reply(self, client: bytes, header: dict[str, Any], body: Any) -> bool:
        return self._send(self.frontend, self.codec.encode(header, body, [client]))

    def reply_error(self, client: bytes, rid: Any, code: ErrorCode, message: str) -> None:
        rid = rid if isinstance(rid, str) else None
        self.reply(client, {"kind": Kind.REPLY.value, "id": rid, "status": Status.ERROR.value}, error_body(code, message))

    # ----------------------------------------------------------- agent side
    def on_frontend(self, frames: list[bytes]) -> None:
        client = frames[0]
        try:
            msg = self.codec.decode(frames)
        except ProtocolError as exc:
            log.warning("rejected frame from agent: %s", exc.message)
            rid = exc.header.get("id") if exc.header else None
            self.reply_error(client, rid, exc.code, exc.message)
            return
        if len(msg.routing) != 1:
            self.reply_error(client, msg.header.get("id"), ErrorCode.BAD_FRAME, "unexpected routing frames")
            return
        self.on_request(client, msg)

    def on_request(self, client: bytes, msg: Message) -> None:
        h = msg.header
        rid = h.get("id")
        if h.get("kind", _REQUEST) != _REQUEST:
            return self.reply_error(client, rid, ErrorCode.BAD_FRAME, f"agents may only send requests, not {h.get('kind')!r}")
        service, op, agent = h.get("service"), h.get("op"), h.get("agent", "anonymous")
        for name, value in (("id", rid), ("service", service), ("op", op), ("agent", agent)):
            if not isinstance(value, str) or not value or len(value) > 256:
                return self.reply_error(client, rid, ErrorCode.BAD_FRAME, f"header field {name!r} must be a non-empty string")
        deadline_s = h.get("deadline")
        if deadline_s is not None and (not isinstance(deadline_s, (int, float)) or deadline_s <= 0):
            return self.reply_error(client, rid, ErrorCode.BAD_FRAME, "header field 'deadline' must be a positive number of seconds")
        target = h.get("target")
        if target is not None and not isinstance(target, str):
            return self.reply_error(client, rid, ErrorCode.BAD_FRAME, "header field 'target' must be a string")
        key = (client, rid)
        if key in self.pending:
            return  # a retry of a request we are still working on: its reply will come
        cached = self.reply_cache.get(key)
        if cached is not None:
            self._send(self.frontend, cached)
            return
        if service == KERNEL:
            return self.on_kernel(client, rid, op, msg)
        if self.stopping:
            return self.reply_error(client, rid, ErrorCode.SHUTTING_DOWN, "the kernel is shutting down")
        managers = self.by_service.get(service)
        if service not in self.expected_services and not managers:
            known = sorted(self.expected_services | set(self.by_service))
            return self.reply_error(client, rid, ErrorCode.UNKNOWN_SERVICE, f"unknown service {service!r}; services: {known}")
        meta = self._op_meta(service, op)
        if meta is None and managers:
            ops = sorted({o for m in managers for o in m.ops})
            return self.reply_error(client, rid, ErrorCode.UNKNOWN_OP, f"service {service!r} has no op {op!r}; ops: {ops}")
        if target is not None and managers and not any(target in m.models for m in managers):
            models = sorted({x for m in managers for x in m.models})
            return self.reply_error(client, rid, ErrorCode.UNKNOWN_MODEL, f"no {service} manager serves model {target!r}; models: {models}")
        q = self.queue(service)
        if len(q) >= self.config.kernel.max_queue:
            return self.reply_error(client, rid, ErrorCode.OVERLOADED, f"the {service} queue is full ({len(q)} requests)")
        now = time.monotonic()
        req = Request(id=rid, client=client, agent=agent, service=service, op=op, body_raw=msg.body_raw,
                      created=now, target=target,
                      deadline=now + float(deadline_s) if deadline_s else None,
                      idempotent=bool(meta and meta.get("idempotent")),
                      preemptible=bool(meta and meta.get("preemptible")))
        self.pending[key] = req
        self.stats[service].submitted += 1
        if req.deadline is not None:
            heapq.heappush(self.deadlines, (req.deadline, req.arrival, req))
        q.push(req)
        self.dispatch(service)

    def _op_meta(self, service: str, op: str) -> dict[str, Any] | None:
        for m in self.by_service.get(service, ()):
            meta = m.ops.get(op)
            if meta is not None:
                return meta
        return None

    def _client_gone(self, client: bytes) -> None:
        """An agent disconnected: drop its queued work and cancel what is running."""
        services: set[str] = set()
        for key in [k for k in self.pending if k[0] == client]:
            req = self.pending.pop(key)
            services.add(req.service)
            q = self.queues.get(req.service)
            if q is not None:
                q.remove(req)
            self._send_manager_cancel(req)
        log.info("agent connection %r gone; its pending requests were cancelled", client[:8])
        for service in services:  # cancelling returned credit: hand it to whoever waits
            self.dispatch(service)

    # --------------------------------------------------------------- dispatch
    def dispatch(self, service: str) -> None:
        q = self.queues.get(service)
        if not q:
            return
        managers = self.by_service.get(service, ())
        free = [m for m in managers if m.credit > 0]
        # A request that names no model goes to a default manager, if the service has one,
        # even when only non-default ones are free: another model is not the same service.
        only_default = any(m.default for m in managers)
        while free and len(q):
            req = q.pop(lambda r: self._pick(free, r, only_default) is not None)
            if req is None:
                return
            mgr = self._pick(free, req, only_default)
            assert mgr is not None
            self._start(req, mgr, q)
            if mgr.credit <= 0:
                free.remove(mgr)

    @staticmethod
    def _pick(free: list[ManagerRecord], req: Request, only_default: bool) -> ManagerRecord | None:
        """The free manager with the most credit that may run `req` (its saved context, its model)."""
        best: ManagerRecord | None = None
        for m in free:
            if req.affinity is not None and m.identity != req.affinity:
                continue
            if req.target is not None and req.target not in m.models:
                continue
            if req.target is None and only_default and not m.default:
                continue
            if best is None or m.credit > best.credit:
                best = m
        return best

    def _start(self, req: Request, mgr: ManagerRecord, q: Policy) -> None:
        now = time.monotonic()
        if req.started is None:
            req.started = now
        req.dispatched_at = now
        req.attempts += 1
        req.manager = mgr.identity
        mgr.credit -= 1
        mgr.inflight[req.key] = req
        header = {
            "kind": Kind.REQUEST.value,
            "id": req.id,
            "client": req.client,
            "agent": req.agent,
            "service": req.service,
            "op": req.op,
            "target": req.target,
            "attempt": req.failures + 1,
            "resume": req.affinity is not None,
            "slice": q.slice_tokens(req) if req.preemptible else None,
            "deadline": (req.deadline - now) if req.deadline is not None else None,
        }
        mgr.last_sent = now
        self._send(self.backend, self.codec.encode_raw(pack(header), req.body_raw, [mgr.identity]))

    # ---------------------------------------------------------- manager side
    def on_backend(self, frames: list[bytes]) -> None:
        try:
            msg = self.codec.decode(frames)
        except ProtocolError as exc:
            log.warning("rejected frame from manager %r: %s", frames[0][:32], exc.message)
            return
        identity = msg.routing[0] if msg.routing else b""
        h = msg.header
        kind = h.get("kind")
        now = time.monotonic()
        mgr = self.managers.get(identity)
        if mgr is not None:
            mgr.last_seen = now
        if kind == Kind.READY.value:
            self.on_ready(identity, h, now)
        elif mgr is None:
            self._send(self.backend, self.codec.encode({"kind": Kind.REREGISTER.value}, None, [identity]))
        elif kind == Kind.HEARTBEAT.value:
            pass
        elif kind == Kind.REPLY.value:
            self.on_manager_reply(mgr, msg)
        elif kind == Kind.YIELD.value:
            self.on_yield(mgr, h)
        elif kind == Kind.DISCONNECT.value:
            self.manager_lost(mgr, "disconnected")
        else:
            log.warning("manager %s sent unknown kind %r", mgr.name, kind)

    def on_ready(self, identity: bytes, h: dict[str, Any], now: float) -> None:
        try:
            name, service = str(h["name"]), str(h["service"])
            capacity, incarnation = int(h["capacity"]), str(h["incarnation"])
            ops = {str(k): dict(v) for k, v in dict(h.get("ops", {})).items()}
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("malformed READY from %r: %s", identity[:32], exc)
            return
        old = self.managers.get(identity)
        if old is not None:
            if old.incarnation == incarnation:
                return  # duplicate READY
            self.manager_lost(old, f"replaced by incarnation {incarnation}")
        busy = int(h.get("busy", 0))
        mgr = ManagerRecord(identity=identity, name=name, service=service, capacity=capacity,
                            incarnation=incarnation, pid=int(h.get("pid", 0)), ops=ops,
                            models=[str(x) for x in h.get("models", [])], default=bool(h.get("default", False)),
                            credit=max(capacity - busy, 0), last_seen=now, last_sent=now, registered=now)
        self.managers[identity] = mgr
        self.by_service[service].append(mgr)
        log.info("manager %s ready: service=%s capacity=%d incarnation=%s", name, service, capacity, incarnation)
        self.dispatch(service)

    def _inflight(self, mgr: ManagerRecord, h: dict[str, Any]) -> Request | None:
        rid, client = h.get("id"), h.get("client")
        if not isinstance(rid, str) or not isinstance(client, bytes):
            return None
        return mgr.inflight.get((client, rid))

    def on_manager_reply(self, mgr: ManagerRecord, msg: Message) -> None:
        h = msg.header
        req = self._inflight(mgr, h)
        if req is None:
            return  # late reply for a request that timed out, was cancelled or re-queued
        status = h.get("status")
        out = {"kind": Kind.REPLY.value, "id": req.id, "status": status}
        if status == Status.PARTIAL.value:
            req.streamed = True
            self._send(self.frontend, self.codec.encode_raw(pack(out), msg.body_raw, [req.client]))
            return
        now = time.monotonic()
        self._release(mgr, req, now, int(h.get("tokens", 0) or 0))
        req.finished = now
        out["timing"] = req.timing()
        if "usage" in h:
            out["usage"] = h["usage"]
        frames = self.codec.encode_raw(pack(out), msg.body_raw, [req.client])
        stats = self.stats[req.service]
        if status == Status.ERROR.value:
            stats.errors += 1
        else:
            stats.completed += 1
            mgr.completed += 1
        stats.wait_s_total += (req.finished - req.created) - req.run_s
        stats.turnaround_s_total += req.finished - req.created
        self.pending.pop(req.key, None)
        self._cache(req, frames)
        self._send(self.frontend, frames)
        self.dispatch(mgr.service)

    def on_yield(self, mgr: ManagerRecord, h: dict[str, Any]) -> None:
        req = self._inflight(mgr, h)
        if req is None:
            return
        self._release(mgr, req, time.monotonic(), int(h.get("tokens", 0) or 0))
        req.preemptions += 1
        req.affinity = mgr.identity if h.get("affinity") else None
        self.stats[req.service].preemptions += 1
        if req.key in self.pending:
            self.queue(req.service).requeue(req)
        self.dispatch(mgr.service)

    def _release(self, mgr: ManagerRecord, req: Request, now: float, tokens: int) -> None:
        """A request stops running on `mgr`: return the credit and charge the service used."""
        mgr.inflight.pop(req.key, None)
        mgr.credit = min(mgr.credit + 1, mgr.capacity)
        run_s = now - (req.dispatched_at or now)
        req.run_s += run_s
        req.tokens += tokens
        req.manager = None
        self.queue(req.service).charge(req, run_s, tokens)

    def manager_lost(self, mgr: ManagerRecord, why: str) -> None:
        """Forget a manager; re-queue or fail what it was running."""
        if self.managers.get(mgr.identity) is mgr:
            del self.managers[mgr.identity]
        if mgr in self.by_service.get(mgr.service, []):
            self.by_service[mgr.service].remove(mgr)
        log.warning("manager %s (incarnation %s) lost: %s; %d request(s) in flight",
                    mgr.name, mgr.incarnation, why, len(mgr.inflight))
        now = time.monotonic()
        for req in list(mgr.inflight.values()):
            req.run_s += now - (req.dispatched_at or now)
            req.manager = None
            if mgr.identity == req.affinity:
                req.affinity = None  # its saved context died with the manager
            if req.key not in self.pending:
                continue
            req.failures += 1
            if req.idempotent and req.failures < MAX_ATTEMPTS:
                self.stats[req.service].requeued += 1
                if req.streamed:
                    # the retry starts over: tell the agent to drop what it was streamed
                    self.reply(req.client, {"kind": Kind.REPLY.value, "id": req.id, "status": Status.PARTIAL.value,
                                            "reset": True}, {})
                    req.streamed = False
                self.queue(req.service).requeue(req)
            else:
                self._finish_error(req, ErrorCode.MANAGER_DIED,
                                   f"the {req.service} manager {mgr.name} died while running this request")
        mgr.inflight.clear()
        # requests waiting for this manager's saved context can no longer resume there
        for req in self.queues.get(mgr.service, ()):
            if req.affinity == mgr.identity:
                req.affinity = None
        self.dispatch(mgr.service)

    def _send_manager_cancel(self, req: Request) -> None:
        """Tell the manager running the request (or holding its saved context) to let go of it."""
        target = req.manager or req.affinity
        mgr = self.managers.get(target) if target else None
        if mgr is not None:
            if req.manager is not None:
                mgr.inflight.pop(req.key, None)
                mgr.credit = min(mgr.credit + 1, mgr.capacity)
            self._send(self.backend, self.codec.encode(
                {"kind": Kind.CANCEL.value, "id": req.id, "client": req.client}, None, [mgr.identity]))
        req.manager = None
        req.affinity = None

    def _finish_error(self, req: Request, code: ErrorCode, message: str) -> None:
        self.pending.pop(req.key, None)
        q = self.queues.get(req.service)
        if q is not None:
            q.remove(req)
        self._send_manager_cancel(req)
        req.finished = time.monotonic()
        self.stats[req.service].errors += 1
        header = {"kind": Kind.REPLY.value, "id": req.id, "status": Status.ERROR.value, "timing": req.timing()}
        self.reply(req.client, header, error_body(code, message))

    def _cache(self, req: Request, frames: list[bytes]) -> None:
        size = self.config.kernel.reply_cache
        if size <= 0:
            return
        self.reply_cache[req.key] = frames
        while len(self.reply_cache) > size:
            self.reply_cache.popitem(last=False)

    # ------------------------------------------------------------------ timers
    def tick(self, now: float) -> None:
        for mgr in list(self.managers.values()):
            if now - mgr.last_seen > self.hb_expiry:
                self.manager_lost(mgr, f"no heartbeat for {now - mgr.last_seen:.1f}s")
            elif now - mgr.last_sent >= self.hb_interval:
                mgr.last_sent = now
                self._send(self.backend, self.codec.encode({"kind": Kind.HEARTBEAT.value}, None, [mgr.identity]))
        self.expire_deadlines(now)

    def expire_deadlines(self, now: float) -> None:
        """Answer DEADLINE_EXCEEDED for every pending request whose deadline has passed."""
        if len(self.deadlines) > 2 * len(self.pending) + 1024:
            # entries of finished requests wait for their deadline; drop them in bulk so the
            # heap (and the request bodies it holds) stays proportional to the pending work
            self.deadlines = [e for e in self.deadlines if self.pending.get(e[2].key) is e[2]]
            heapq.heapify(self.deadlines)
        while self.deadlines and self.deadlines[0][0] <= now:
            _, _, req = heapq.heappop(self.deadlines)
            if self.pending.get(req.key) is req:
                self._finish_error(req, ErrorCode.DEADLINE_EXCEEDED,
                                   f"deadline passed after {now - req.created:.3f}s "
                                   f"({'running' if req.manager else 'still queued'})")
                self.dispatch(req.service)

    # ------------------------------------------------------------ kernel ops
    def on_kernel(self, client: bytes, rid: str, op: str, msg: Message) -> None:
        header = {"kind": _REPLY, "id": rid, "status": _OK}
        if op == "ping":  # the body is a constant: packed once
            self._send(self.frontend, self.codec.encode_raw(pack(header), _PONG, [client]))
            return
        elif op == "status":
            body = self.status()
        elif op == "shutdown":
            body = {"stopping": True}
            self.request_shutdown()
        else:
            return self.reply_error(client, rid, ErrorCode.UNKNOWN_OP,
                                    f"service 'kernel' has no op {op!r}; ops: ['ping', 'shutdown', 'status']")
        self.reply(client, header, body)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        state = self.run_dir.read_state() or {}
        services = sorted(self.expected_services | set(self.by_service) | set(self.queues))
        return {
            "scheduler": {"pid": os.getpid(), "policy": self.config.scheduler.policy,
                          "uptime_s": round(now - self.started_at, 3)},
            "processes": state.get("processes", []),
            "managers": [
                {"name": m.name, "service": m.service, "pid": m.pid, "incarnation": m.incarnation,
                 "capacity": m.capacity, "busy": m.capacity - m.credit, "models": m.models,
                 "ops": sorted(m.ops), "completed": m.completed,
                 "last_seen_s": round(now - m.last_seen, 3)}
                for m in self.managers.values()
            ],
            "queues": {s: len(self.queues[s]) if s in self.queues else 0 for s in services if s != KERNEL},
            "services": {s: self.stats[s].as_dict() for s in services if s != KERNEL},
            "pending": len(self.pending),
        }

    def request_shutdown(self) -> None:
        """Ask the supervisor to stop the whole tree (it stops us last)."""
        pid = self.run_dir.read_pid()
        if pid and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGTERM)
                return
            except ProcessLookupError:
                pass
        self.stopping = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aios-scheduler", description="AIOS scheduler (started by the supervisor)")
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    setup_logging("scheduler")
    run_dir = RunDir(args.run_dir)
    broker = Broker(run_dir, run_dir.load_config())

    def _stop(signum: int, frame: Any) -> None:
        broker.stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    from aios.procutil import exit_with_parent
    exit_with_parent()
    broker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
