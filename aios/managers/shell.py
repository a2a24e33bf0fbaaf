"""A manager's socket shell (after ZeroMQ's Paranoid Pirate worker): the DEALER, heartbeats, the hand-off.

Everything a manager decides lives in its core (`aios.managers.manager_core`);
this shell only moves bytes and keeps time:
- connects a DEALER to the scheduler's backend under the manager's
  unguessable routing id and announces READY;
- verifies each frame, parses it into a typed message and hands it to the
  core; the messages already queued form one batch, closed by
  `core.end_of_batch()` before the loop looks at anything else;
- heartbeats on a fixed rhythm, listing the requests running here, and
  re-announces READY when the scheduler goes quiet or comes back (a socket
  monitor reports the reconnection within milliseconds);
- turns the core's typed answers into signed frames in one place (`send`):
  from the socket thread directly, from pool threads through an inproc PUSH
  that this loop drains (only this thread touches the DEALER).

The batch-hold test hook (`ManagerCore.hold_next_batch`) is honoured here:
while the core holds a batch open, the loop neither closes it nor runs
housekeeping, but keeps heartbeating.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from aios import messages
from aios.managers.manager_core import ManagerCore, ToScheduler
from aios.protocol import Codec, ProtocolError
from aios.sockets import dealer
from aios.zmqio import NOBLOCK, recv_multipart, send_multipart

if TYPE_CHECKING:
    from aios.managers.base import Manager

#: most messages read from the scheduler before the loop looks at its other sockets and clocks
MAX_BATCH_MESSAGES = 256


class ManagerShell:
    """Runs `manager` until `manager.stop()`: sockets around a `ManagerCore`."""

    def __init__(self, manager: "Manager") -> None:
        self.manager = manager
        self.run_dir = manager.run_dir
        # how to reach the scheduler: the endpoint description the supervisor wrote, not the whole config
        self.endpoint = self.run_dir.read_endpoint()
        self.log = manager.log
        self.codec = Codec(self.run_dir.load_key())
        self.zctx = zmq.Context()
        self._pull_address = f"inproc://results-{id(self)}"
        self._results = self.zctx.socket(zmq.PULL)
        self._results.bind(self._pull_address)
        self._local = threading.local()
        self.loop_thread = threading.current_thread()
        pool = ThreadPoolExecutor(max_workers=min(manager.pool_threads or manager.capacity, manager.capacity),
                                  thread_name_prefix=manager.name)
        self.sock = dealer(self.zctx, self.run_dir, self.endpoint, role="manager", identity=manager.identity)
        self.core = ManagerCore(manager, self, self.codec, pool)

    # ---------------------------------------------------------------- outbox
    def send(self, msg: ToScheduler, body: Any = None) -> None:
        """The one place this manager's typed messages become frames."""
        self.send_frames(self.codec.encode(msg.to_header(), body))

    def send_frames(self, frames: list[bytes]) -> None:
        """Send now from the socket thread; from any other, hand the frames to it."""
        if threading.current_thread() is self.loop_thread:
            try:
                send_multipart(self.sock, frames, NOBLOCK)
            except zmq.Again:
                self.log.warning("scheduler not accepting messages; dropped one")
            return
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._local.push = self.zctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._pull_address)
        sock.send_multipart(frames)

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        m, core = self.manager, self.core
        # The connection monitor tells us at once when the scheduler goes away and comes back, so we
        # re-register within milliseconds of its restart instead of after a heartbeat expiry.
        monitor = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(self.endpoint.backend)
        e = self.endpoint
        hb_interval, hb_expiry = e.heartbeat_interval_s, e.heartbeat_interval_s * e.heartbeat_liveness
        last_heard = last_beat = time.monotonic()
        self.send(core.ready_message())
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._results, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        self.log.info("serving %s (capacity %d, ops %s)", m.service, m.capacity, sorted(m.ops))
        disconnected = False
        while not m.stopping:
            events = dict(poller.poll(int(hb_interval * 250)))
            now = time.monotonic()
            if monitor in events:
                disconnected, announced = self._connection_events(monitor, disconnected)
                if announced:
                    last_heard = last_beat = now
            if self._results in events:
                self._drain_results()
            if self.sock in events:
                # Everything already queued is one batch (bounded, so heartbeats keep their rhythm).
                for _ in range(MAX_BATCH_MESSAGES):
                    try:
                        frames = recv_multipart(self.sock, NOBLOCK)
                    except zmq.Again:
                        break
                    last_heard = now
                    self._on_frames(frames)
            if core.holding(now):
                pass  # the batch-hold test hook keeps this batch open
            elif self.sock in events or core.deferred:
                core.end_of_batch()
                core.housekeeping(False)
            elif not events:
                core.housekeeping(True)
            if now - last_heard > hb_expiry:
                # The scheduler went quiet (restarting?): announce ourselves again.
                self.log.warning("no word from the scheduler for %.1fs; re-announcing", now - last_heard)
                self.send(core.ready_message())
                last_heard = last_beat = now
            elif now - last_beat >= hb_interval:
                # Beat on a fixed rhythm even while replies flow: it lists the requests running here,
                # which is how the scheduler's view of our capacity heals after it restarts or
                # cancels a handler that is still winding down.
                self.send(messages.Heartbeat(running=core.running()))
                last_beat = now
        self.sock.disable_monitor()
        monitor.close(0)
        self._shutdown()

    def _connection_events(self, monitor: zmq.Socket, disconnected: bool) -> tuple[bool, bool]:
        """Follow the scheduler connection; (disconnected now, READY re-announced)."""
        announced = False
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return disconnected, announced
            if event == zmq.EVENT_DISCONNECTED:
                disconnected = True
                self.core.connection_lost()
            elif event == zmq.EVENT_CONNECTED and disconnected:
                disconnected = False
                self.log.info("scheduler connection back; announcing READY")
                self.send(self.core.ready_message())
                announced = True

    def _drain_results(self) -> None:
        while True:
            try:
                frames = recv_multipart(self._results, NOBLOCK)
            except zmq.Again:
                return
            self.send_frames(frames)

    def _on_frames(self, frames: list[bytes]) -> None:
        """Verify, type and hand over one message."""
        try:
            raw = self.codec.decode(frames)
            typed = messages.parse(raw.header, messages.FROM_SCHEDULER_TO_MANAGER)
        except ProtocolError as exc:
            self.log.warning("rejected frame from scheduler: %s", exc.message)
            return
        self.core.handle(typed, raw)

    def _shutdown(self) -> None:
        self.send(messages.Disconnect("stopping"))
        self.core.cancel_all()
        self.core.pool.shutdown(wait=True, cancel_futures=True)
        self.manager.teardown()
        self.sock.close(0)
        self._results.close(0)
        self.zctx.term()
