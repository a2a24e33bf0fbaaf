"""The bare pyzmq baseline for `aios bench syscall`.

The same shape as an AIOS system call to a manager, with nothing of AIOS in
it: client DEALER -> broker ROUTER/ROUTER -> worker DEALER -> broker ->
client, over ipc, each in its own process, with a small msgpack body that the
client packs, the worker unpacks and answers, and the client unpacks. No
signing, no validation, no bookkeeping: the floor a Python broker on this
machine can reach. The broker and the worker drain their sockets in batches
like the AIOS scheduler does, so the comparison is between message handling
costs, not between loop styles.

Like the kernel's processes (which the supervisor starts with
`start_new_session`), the broker and the worker run in sessions of their own.
That matters on Linux with autogroup scheduling: CPU time is shared fairly
between sessions first, so a broker sharing its session with 32 busy clients
gets a smaller share than a scheduler in its own. Same treatment, fair
comparison.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

READY = b"READY"
WORKER_ID = b"worker-0"
POLL_MS = 100
BATCH = 256


@contextlib.contextmanager
def echo_service(timeout_s: float = 15.0) -> Iterator[str]:
    """Run the echo broker and worker processes; yield the frontend endpoint clients connect to.

    Forks: the calling process must not own a ZeroMQ context yet.
    """
    path = Path(tempfile.mkdtemp(prefix="aios-echo-", dir="/tmp" if Path("/tmp").is_dir() else None))
    front, back = f"ipc://{path / 'f.ipc'}", f"ipc://{path / 'b.ipc'}"
    ctx = mp.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    broker = ctx.Process(target=_broker_main, args=(front, back, ready, stop), name="echo-broker", daemon=True)
    worker = ctx.Process(target=_worker_main, args=(back, stop), name="echo-worker", daemon=True)
    broker.start()
    worker.start()
    try:
        if not ready.wait(timeout_s):
            raise RuntimeError("the echo baseline broker/worker did not start")
        yield front
    finally:
        stop.set()
        for p in (worker, broker):
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        shutil.rmtree(path, ignore_errors=True)


def make_echo_caller(front: str) -> Callable[[int], tuple[Callable[[], None], Callable[[], None]]]:
    """`make_caller` for `run_closed_loop`: one DEALER per client process."""

    def make(index: int) -> tuple[Callable[[], None], Callable[[], None]]:
        import msgpack
        import zmq

        zctx = zmq.Context()
        sock = zctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(front)
        packb, unpackb = msgpack.packb, msgpack.unpackb
        counter = iter(range(1 << 62))

        def call() -> None:
            rid = next(counter)
            sock.send_multipart([b"", packb({"id": rid, "agent": "echo", "op": "ping"})])
            frames = sock.recv_multipart()
            reply = unpackb(frames[1])
            if reply.get("id") != rid:
                raise RuntimeError(f"echo reply out of order: {reply!r}")

        def close() -> None:
            sock.close(0)
            zctx.term()

        return call, close

    return make


def _broker_main(front_ep: str, back_ep: str, ready: Any, stop: Any) -> None:
    import zmq

    _own_session()
    zctx = zmq.Context()
    front, back = zctx.socket(zmq.ROUTER), zctx.socket(zmq.ROUTER)
    for s in (front, back):
        s.setsockopt(zmq.LINGER, 0)
    front.bind(front_ep)
    back.bind(back_ep)
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    worker: bytes | None = None
    NOBLOCK, Again = zmq.NOBLOCK, zmq.Again
    while not stop.is_set():
        events = dict(poller.poll(POLL_MS))
        if back in events:
            for _ in range(BATCH):
                try:
                    frames = back.recv_multipart(NOBLOCK)
                except Again:
                    break
                if frames[1:] == [b"", READY]:
                    worker = frames[0]
                    ready.set()
                    continue
                front.send_multipart(frames[1:], NOBLOCK)  # [client, b"", body]
        if front in events and worker is not None:
            for _ in range(BATCH):
                try:
                    frames = front.recv_multipart(NOBLOCK)
                except Again:
                    break
                back.send_multipart([worker] + frames, NOBLOCK)
    front.close(0)
    back.close(0)
    zctx.term()


def _worker_main(back_ep: str, stop: Any) -> None:
    import msgpack
    import zmq

    _own_session()
    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, WORKER_ID)
    sock.connect(back_ep)
    sock.send_multipart([b"", READY])
    packb, unpackb = msgpack.packb, msgpack.unpackb
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    NOBLOCK, Again = zmq.NOBLOCK, zmq.Again
    while not stop.is_set():
        if not poller.poll(POLL_MS):
            continue
        for _ in range(BATCH):
            try:
                client, empty, body = sock.recv_multipart(NOBLOCK)
            except Again:
                break
            request = unpackb(body)
            sock.send_multipart([client, empty, packb({"id": request["id"], "status": "ok",
                                                       "result": {"pong": True}})], NOBLOCK)
    sock.close(0)
    zctx.term()


def _own_session() -> None:
    """A new session (and so its own autogroup), as the supervisor gives each kernel process."""
    import os
    try:
        os.setsid()
    except OSError:
        pass
