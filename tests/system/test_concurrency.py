"""Many agents at once, deadlines, backpressure, streaming and the asyncio client."""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
import uuid
from typing import Any

import pytest

from aios import sdk
from aios.sdk import KernelTimeout
from tests.support.kernel import Kernel
from tests.support.waiting import wait_until

AGENTS = 32
CALLS = 200


def agent_process(run_dir: str, index: int, calls: int, barrier: Any, out: Any) -> None:
    """One agent: its own process, its own SDK client, `calls` echo calls with unique payloads."""
    try:
        from aios import sdk as agent_sdk
        client = agent_sdk.connect(run_dir, agent=f"agent-{index:02d}", timeout=60.0)
        barrier.wait(60)
        got = []
        for j in range(calls):
            payload = f"{index}:{j}:{uuid.uuid4().hex}"
            result = client.call("echo", "echo", text=payload)
            got.append((payload, result["text"], result["agent"]))
        # nothing else may arrive: a duplicated reply would be waiting here
        stray = client._sock.poll(300)
        client.close()
        out.put((index, got, stray, None))
    except BaseException as exc:  # noqa: BLE001 - report everything to the parent
        out.put((index, [], 0, repr(exc)))


@pytest.mark.timeout(150)
def test_32_agents_x_200_calls_each_answered_exactly_once(kernel) -> None:
    k = kernel(capacity=4)
    before = k.kernel_status()["services"]["echo"]
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(AGENTS)
    out = ctx.Queue()
    procs = [ctx.Process(target=agent_process, args=(str(k.run_dir.path), i, CALLS, barrier, out), daemon=True)
             for i in range(AGENTS)]
    for p in procs:
        p.start()
    reports = {}
    try:
        for _ in range(AGENTS):
            index, got, stray, error = out.get(timeout=120)
            reports[index] = (got, stray, error)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    errors = {i: r[2] for i, r in reports.items() if r[2]}
    assert not errors, errors
    assert sorted(reports) == list(range(AGENTS))
    sent: list[str] = []
    for index, (got, stray, _) in reports.items():
        assert len(got) == CALLS
        assert stray == 0, f"agent {index} received an extra reply"
        for payload, echoed, agent in got:
            assert echoed == payload  # each call got its own payload back, not someone else's
            assert agent == f"agent-{index:02d}"
        sent += [g[0] for g in got]
    assert len(sent) == len(set(sent)) == AGENTS * CALLS

    status = k.kernel_status()
    after = status["services"]["echo"]
    assert after["submitted"] - before["submitted"] == AGENTS * CALLS
    assert after["completed"] - before["completed"] == AGENTS * CALLS
    assert after["errors"] == before["errors"] and after["requeued"] == 0
    assert status["pending"] == 0 and status["queues"]["echo"] == 0
    echo = next(m for m in status["managers"] if m["name"] == "echo")
    assert echo["busy"] == 0 and echo["completed"] >= AGENTS * CALLS


# ---------------------------------------------------------------- deadlines
@pytest.fixture(scope="module")
def k2(module_kernel_factory) -> Kernel:
    """A shared kernel whose echo manager runs at most two requests at once."""
    return module_kernel_factory(capacity=2)


def _idle(k: Kernel) -> bool:
    st = k.kernel_status()
    echo = next((m for m in st["managers"] if m["name"] == "echo"), None)
    return echo is not None and echo["busy"] == 0 and st["pending"] == 0


@pytest.fixture
def idle_k2(k2: Kernel) -> Kernel:
    wait_until(lambda: _idle(k2), timeout=30, message="shared kernel idle")
    return k2


@pytest.mark.timeout(90)
def test_deadline_of_running_request(idle_k2: Kernel) -> None:
    """A 60 s sleep with a 0.5 s deadline: the kernel answers DEADLINE_EXCEEDED and cancels the sleep
    on the manager. The sleep is long enough that "before it would have finished" needs no stopwatch
    margin on a busy machine."""
    k = idle_k2
    errors_before = k.kernel_status()["services"]["echo"]["errors"]
    with k.client("hasty") as c:
        t0 = time.monotonic()
        with pytest.raises(KernelTimeout) as info:
            c.request("echo", "sleep", {"seconds": 60.0}, timeout=0.5)
        elapsed = time.monotonic() - t0
    assert info.value.code == "DEADLINE_EXCEEDED", info.value  # the kernel's verdict, not the SDK giving up
    assert "running" in info.value.message and info.value.retryable is False
    assert elapsed < 30  # long before the 60 s sleep would have finished
    assert k.kernel_status()["services"]["echo"]["errors"] == errors_before + 1
    # the request was cancelled on the manager: its slot is free again long before the sleep would end
    wait_until(lambda: _idle(k), timeout=30, message="cancelled sleep to free its slot")


@pytest.mark.timeout(60)
def test_deadline_of_queued_request(idle_k2: Kernel, gates) -> None:
    """Both slots are held at a gate (not by sleeps that might end before the late call's deadline
    on a busy machine): the late call's deadline passes while it is still queued."""
    k = idle_k2
    gate = gates.new()
    blockers = [k.client(f"blocker{i}") for i in range(2)]
    threads = [threading.Thread(target=c.request, args=("echo", "sleep", {"seconds": 0, "gate": gate.path}),
                                kwargs={"idempotent": False}) for c in blockers]
    for t in threads:
        t.start()
    wait_until(lambda: next(m for m in k.kernel_status()["managers"] if m["name"] == "echo")["busy"] == 2,
               timeout=30, message="both slots busy")
    with k.client("late") as c:
        with pytest.raises(KernelTimeout) as info:
            c.request("echo", "echo", {"text": "too late"}, timeout=0.3)
    assert info.value.code == "DEADLINE_EXCEEDED"
    assert "still queued" in info.value.message
    gate.open()
    for t in threads:
        t.join(30)
    assert k.kernel_status()["queues"]["echo"] == 0


# ------------------------------------------------------------- backpressure
def _max_concurrency(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


@pytest.mark.timeout(60)
def test_backpressure_capacity_two(idle_k2: Kernel, gates) -> None:
    """Six 0.3 s sleeps on a manager of capacity two. They wait at a gate until the test has seen two
    running and four queued, so "all six at once" holds however late a busy machine sends some."""
    k = idle_k2
    gate = gates.new()
    results: dict[int, Any] = {}
    clients = [k.client(f"bp{i}") for i in range(6)]

    def run(i: int) -> None:
        results[i] = clients[i].request("echo", "sleep", {"seconds": 0.3, "tag": f"s{i}", "gate": gate.path},
                                        idempotent=False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: k.busy("echo") == 2 and k.kernel_status()["queues"]["echo"] == 4, timeout=30,
               message="two sleeps running and four queued")
    gate.open()
    for t in threads:
        t.join(30)
    assert sorted(results) == list(range(6))
    for i, reply in results.items():
        assert reply.result["tag"] == f"s{i}"
    intervals = [(r.result["started"], r.result["ended"]) for r in results.values()]
    # the manager never ran more than its capacity, and it did use both slots
    assert _max_concurrency(intervals) == 2
    # so six 0.3 s sleeps needed three rounds: in start order, the k-th waited for k-2 to finish
    ordered = sorted(intervals)
    for idx, (start, _) in enumerate(ordered):
        finished_before = sum(1 for s, e in ordered if e <= start)
        assert finished_before >= idx - 1
    assert ordered[-1][1] - ordered[0][0] >= 3 * 0.3 * 0.95
    # the scheduler measured the queueing: the four queued waited for a 0.3 s sleep to end at least
    waited = [r for r in results.values() if r.timing["first_wait_s"] >= 0.2]
    assert len(waited) >= 4


@pytest.mark.timeout(60)
def test_slow_service_does_not_block_kernel_calls(idle_k2: Kernel, gates) -> None:
    """The echo manager full (both slots held at a gate until the test is done looking) and two more
    sleeps queued: kernel calls are still answered at once."""
    k = idle_k2
    gate = gates.new()
    clients = [k.client(f"slow{i}") for i in range(4)]
    threads = [threading.Thread(target=c.request, args=("echo", "sleep", {"seconds": 0, "gate": gate.path}),
                                kwargs={"idempotent": False}) for c in clients]
    for t in threads:
        t.start()
    wait_until(lambda: k.kernel_status()["queues"]["echo"] == 2, timeout=30, message="two sleeps queued")
    with k.client("pinger") as c:
        for _ in range(10):
            # answered at once, while the echo manager is full and its queue still waits
            assert c.call("kernel", "ping") == {"pong": True}
            st = c.call("kernel", "status")
            assert st["queues"]["echo"] == 2
            assert next(m for m in st["managers"] if m["name"] == "echo")["busy"] == 2
    gate.open()
    for t in threads:
        t.join(30)


# ---------------------------------------------------------------- streaming
def test_streaming_partials_arrive_in_order(idle_k2: Kernel) -> None:
    seen: list[Any] = []
    with idle_k2.client("streamer") as c:
        reply = c.request("echo", "count", {"n": 200}, on_partial=seen.append)
    assert reply.result == {"n": 200}
    assert seen == [{"i": i} for i in range(200)]
    assert reply.partials == seen


def test_streaming_zero_partials(idle_k2: Kernel) -> None:
    with idle_k2.client("streamer0") as c:
        reply = c.request("echo", "count", {"n": 0}, on_partial=lambda b: pytest.fail("unexpected partial"))
    assert reply.result == {"n": 0} and reply.partials == []


@pytest.mark.timeout(120)
def test_agent_gone_mid_stream_frees_its_slot_for_waiting_work(idle_k2: Kernel) -> None:
    """Agents that vanish while their calls stream must not hold the manager's capacity."""
    import zmq

    from aios.protocol import Codec, new_request_id

    k = idle_k2
    codec = Codec(k.run_dir.load_key())
    ctx = zmq.Context()
    leavers = []
    for i in range(2):  # fill both slots with 60 s streams
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(k.run_dir.frontend_endpoint(k.run_dir.load_config()))
        sock.send_multipart(codec.encode({"kind": "request", "id": new_request_id(), "agent": f"leaver{i}",
                                          "service": "echo", "op": "drip"}, {"seconds": 60.0}))
        leavers.append(sock)
    for sock in leavers:
        partials = 0
        while partials < 3:
            assert sock.poll(30_000), "no partial reply"
            header = codec.decode(sock.recv_multipart()).header
            if header.get("kind") == "heartbeat":
                continue  # the scheduler checking that this agent is still there
            assert header["status"] == "partial"
            partials += 1
    results: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: results.setdefault(
        "reply", k.client("waiter").request("echo", "echo", {"text": "my turn"}, timeout=30.0)))
    waiter.start()
    wait_until(lambda: k.kernel_status()["queues"]["echo"] == 1, timeout=30, message="waiter queued")
    for sock in leavers:
        sock.close(0)  # gone without a word
    ctx.term()
    waiter.join(60)
    assert "reply" in results, "the waiting call was not served after the streaming agents left"
    assert results["reply"].result["text"] == "my turn"  # served within 30 s: long before the drips would end
    wait_until(lambda: _idle(k), timeout=30, message="cancelled streams to free both slots")


# ------------------------------------------------------------- async client
@pytest.mark.timeout(60)
def test_async_client_concurrent_calls(idle_k2: Kernel) -> None:
    async def main() -> None:
        async with sdk.connect_async(idle_k2.run_dir, agent="async", timeout=30.0) as c:
            payloads = [f"p{i}-{uuid.uuid4().hex}" for i in range(300)]
            results = await asyncio.gather(*(c.call("echo", "echo", text=p) for p in payloads))
            assert [r["text"] for r in results] == payloads

            # streams and sleeps interleaved on one socket: each gets its own replies
            streams: dict[int, list[Any]] = {3: [], 50: [], 120: []}
            replies = await asyncio.gather(
                *(c.request("echo", "count", {"n": n}, on_partial=streams[n].append) for n in streams),
                *(c.request("echo", "sleep", {"seconds": 0.2, "tag": f"t{i}"}) for i in range(4)),
                c.call("kernel", "ping"),
            )
            for n, reply in zip(streams, replies[:3]):
                assert reply.result == {"n": n}
                assert streams[n] == [{"i": i} for i in range(n)] == reply.partials
            assert [r.result["tag"] for r in replies[3:7]] == [f"t{i}" for i in range(4)]
            assert replies[7] == {"pong": True}

            # errors are per call, and do not disturb the others
            outcomes = await asyncio.gather(c.call("echo", "echo", text=1), c.call("echo", "echo", text="ok"),
                                            return_exceptions=True)
            assert isinstance(outcomes[0], sdk.InvalidArgument) and outcomes[1]["text"] == "ok"

            # a deadline on one call while others succeed
            slow = c.request("echo", "sleep", {"seconds": 2.0}, timeout=0.4)
            fast = c.call("echo", "echo", text="fast")
            outcomes = await asyncio.gather(slow, fast, return_exceptions=True)
            assert isinstance(outcomes[0], KernelTimeout) and outcomes[0].code == "DEADLINE_EXCEEDED"
            assert outcomes[1]["text"] == "fast"

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_many_threads_one_client_each(idle_k2: Kernel) -> None:
    """Threads in one process, each with its own client (the documented way)."""
    errors: list[BaseException] = []
    counts: dict[int, int] = {}

    def run(i: int) -> None:
        try:
            with sdk.connect(idle_k2.run_dir, agent=f"t{i}", timeout=30.0) as c:
                for j in range(50):
                    text = f"{i}/{j}"
                    assert c.call("echo", "echo", text=text)["text"] == text
                counts[i] = 50
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sum(counts.values()) == 16 * 50
