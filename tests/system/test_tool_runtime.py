"""The tool runtime without the kernel: discovery, validation, isolated calls and every way a tool fails.

Real worker subprocesses throughout (tests/support/tools holds small tools that raise,
sleep, allocate, exit, crash, and malformed manifests). After each failure a healthy
call must succeed: a bad tool never takes the runtime down.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from aios.managers.base import OpError
from aios.managers.tools.runtime import SHIPPED_TOOLS_DIR, ToolRuntime, ToolRuntimeOptions
from aios.protocol import ErrorCode
from tests.support.errors import op_error
from tests.support.paths import REPO, SUPPORT
from tests.support.waiting import wait_until

SUPPORT_TOOLS = SUPPORT / "tools"

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def rt() -> Iterator[ToolRuntime]:
    runtime = ToolRuntime([SUPPORT_TOOLS], ToolRuntimeOptions(max_result_bytes=64 * 1024))
    try:
        yield runtime
    finally:
        runtime.close()


def healthy(rt: ToolRuntime, agent: str = "healthy") -> None:
    """The next call to a healthy tool succeeds."""
    assert rt.call("calculator", {"expression": "6*7"}, agent=agent)["value"] == 42
    assert rt.call("probe", {"x": 1}, agent=agent)["args"] == {"x": 1}




# ------------------------------------------------------------------ discovery
def test_discovery_reports_each_malformed_manifest_and_loads_the_rest(rt: ToolRuntime) -> None:
    names = {t.name for t in rt.list()}
    assert {"calculator", "python", "files", "clock", "web_fetch", "weather", "flights", "hotels"} <= names
    assert {"probe", "raiser", "sleeper", "hog", "exiter", "segfault"} <= names
    problems = {Path(p.path).parent.name: p.reason for p in rt.problems}
    assert set(problems) == {"broken_toml", "bad_schema", "invalid_schema", "wrong_name", "no_code",
                             "sneaky_builtin", "tiny_memory", "calculator"}
    assert "not valid TOML" in problems["broken_toml"]
    assert "type 'object'" in problems["bad_schema"]
    assert "not a valid JSON schema" in problems["invalid_schema"] and "no-such-type" in problems["invalid_schema"]
    assert "must equal the folder name" in problems["wrong_name"]
    assert "no file missing.py" in problems["no_code"]
    assert "only allowed for tools shipped" in problems["sneaky_builtin"]
    assert "memory_mb" in problems["tiny_memory"]
    assert "already loaded" in problems["calculator"]
    assert rt.describe("calculator").source == str(SHIPPED_TOOLS_DIR / "calculator")
    for p in rt.problems:
        assert Path(p.path).is_file(), p  # each problem names the manifest file


def test_describe_gives_schema_openai_function_and_isolation(rt: ToolRuntime) -> None:
    info = rt.describe("weather")
    assert info.parameters["required"] == ["city"]
    assert info.function == {"type": "function", "function": {
        "name": "weather", "description": info.description, "parameters": info.parameters}}
    assert "sample" in info.description.lower()
    assert info.kind == "subprocess" and info.idempotent and info.enabled
    assert "memory 64 MB" in info.isolation
    assert rt.describe("files").kind == "builtin"
    functions = rt.functions()
    assert {f["function"]["name"] for f in functions} == {t.name for t in rt.list() if t.enabled}
    assert "web_fetch" not in {f["function"]["name"] for f in functions}  # off: empty allow-list


def test_limits_come_from_the_manifests(rt: ToolRuntime) -> None:
    limits = rt.limits()
    assert limits["sleeper"] == 1 and limits["probe"] == 4 and limits["python"] == 2
    assert limits["raiser"] == 2  # the default
    assert set(limits) == {t.name for t in rt.list()}


def test_a_user_tool_folder_is_discovered_and_called() -> None:
    """The example in the top-level tools/ folder, where a user's own tools go."""
    with ToolRuntime([REPO / "tools"], {"shipped": False}) as runtime:
        assert runtime.problems == [] and [t.name for t in runtime.list()] == ["word_count"]
        out = runtime.call("word_count", {"text": "the cat and the hat\nthe end", "top": 1}, agent="u")
        assert out == {"words": 7, "lines": 2, "characters": 27, "top": [{"word": "the", "count": 3}]}


# ----------------------------------------------------------------- validation
def test_invalid_arguments_name_the_field_and_never_start_a_worker(rt: ToolRuntime) -> None:
    before = rt.worker_stats
    err = op_error(rt.call, "probe", {"x": "abc"}, agent="v")
    assert err.code == ErrorCode.INVALID_ARGUMENT
    assert err.message == "tool 'probe': arguments.x: 'abc' is not of type 'number'"
    err = op_error(rt.call, "probe", {"x": 1, "extra": True}, agent="v")
    assert err.code == ErrorCode.INVALID_ARGUMENT and "'extra' was unexpected" in err.message
    err = op_error(rt.call, "sleeper", {}, agent="v")
    assert err.code == ErrorCode.INVALID_ARGUMENT and "'seconds' is a required property" in err.message
    err = op_error(rt.call, "weather", {"city": "Paris", "date": "July 3rd"}, agent="v")
    assert "arguments.date: 'July 3rd' is not a 'date'" in err.message
    err = op_error(rt.call, "probe", ["not", "a", "map"], agent="v")
    assert err.code == ErrorCode.INVALID_ARGUMENT
    assert rt.worker_stats == before  # the tool's code never ran: no worker was started or reused


def test_unknown_and_broken_tools_are_not_found(rt: ToolRuntime) -> None:
    err = op_error(rt.call, "nonexistent", {})
    assert err.code == ErrorCode.NOT_FOUND and "no tool named 'nonexistent'" in err.message and "calculator" in err.message
    err = op_error(rt.call, "broken_toml", {})
    assert err.code == ErrorCode.NOT_FOUND and "did not load" in err.message and "not valid TOML" in err.message
    err = op_error(rt.describe, "bad_schema")
    assert err.code == ErrorCode.NOT_FOUND
    healthy(rt)


# ------------------------------------------------------------------- failures
def test_a_tool_that_raises(rt: ToolRuntime) -> None:
    err = op_error(rt.call, "raiser", {}, agent="f")
    assert err.code == ErrorCode.BACKEND_ERROR
    assert "tool 'raiser' raised ValueError: the raiser tool always fails" in err.message
    healthy(rt)


def test_a_tool_that_sleeps_past_its_timeout_is_killed(rt: ToolRuntime) -> None:
    started = time.monotonic()
    err = op_error(rt.call, "sleeper", {"seconds": 30}, agent="t")
    assert err.code == ErrorCode.DEADLINE_EXCEEDED
    assert "did not finish within 2.5 s and was killed" in err.message and "timeout_s is 2.5" in err.message
    assert time.monotonic() - started < 20  # it did not wait for the 30 s sleep
    assert rt._pool.idle_count("sleeper") == 0
    healthy(rt)
    # a caller's shorter deadline wins over the manifest's timeout
    err = op_error(rt.call, "sleeper", {"seconds": 30}, agent="t", timeout=0.5)
    assert err.code == ErrorCode.DEADLINE_EXCEEDED and "within 0.5 s" in err.message


def test_a_tool_that_allocates_past_its_memory_limit(rt: ToolRuntime) -> None:
    err = op_error(rt.call, "hog", {"mb": 512}, agent="m")
    assert err.code == ErrorCode.QUOTA_EXCEEDED
    assert err.message.startswith("tool 'hog' exceeded its memory limit of 64 MB (manifest memory_mb)")
    assert rt.call("hog", {"mb": 8}, agent="m") == {"allocated_mb": 8}
    healthy(rt)


def test_a_tool_that_calls_os_exit(rt: ToolRuntime) -> None:
    err = op_error(rt.call, "exiter", {"status": 3}, agent="x")
    assert err.code == ErrorCode.BACKEND_ERROR
    assert "tool 'exiter' exited before replying with status 3" in err.message
    healthy(rt)


def test_a_tool_that_crashes_with_a_signal(rt: ToolRuntime) -> None:
    err = op_error(rt.call, "segfault", {}, agent="x")
    assert err.code == ErrorCode.BACKEND_ERROR
    assert "tool 'segfault' crashed before replying: killed by SIGSEGV" in err.message
    healthy(rt)


def test_a_tool_that_fails_to_import(rt: ToolRuntime) -> None:
    err = op_error(rt.call, "badimport", {}, agent="x")
    assert err.code == ErrorCode.BACKEND_ERROR
    assert "failed to load its code" in err.message and "a_module_that_does_not_exist" in err.message
    healthy(rt)


def test_results_are_size_limited_and_must_be_json(rt: ToolRuntime) -> None:
    assert len(rt.call("bigresult", {"bytes": 1000}, agent="r")["data"]) == 1000
    err = op_error(rt.call, "bigresult", {"bytes": 200_000}, agent="r")
    assert err.code == ErrorCode.TOO_LARGE and "limit of 65536 bytes" in err.message and "max_result_bytes" in err.message
    err = op_error(rt.call, "notjson", {}, agent="r")
    assert err.code == ErrorCode.BACKEND_ERROR and "not JSON data" in err.message
    assert len(rt.call("bigresult", {"bytes": 10}, agent="r")["data"]) == 10  # the same warm worker carries on
    healthy(rt)


def test_printing_to_stdout_does_not_corrupt_the_protocol(rt: ToolRuntime) -> None:
    out = rt.call("probe", {"print_bytes": 300_000}, agent="p")
    assert out["args"] == {"print_bytes": 300_000}


def test_cancellation_kills_the_worker(rt: ToolRuntime, gates) -> None:
    """The call waits at a gate that never opens (`waiter`, timeout_s 60): only the cancel can end it."""
    gate = gates.new()
    cancelled = threading.Event()
    errors: list[OpError] = []

    def call() -> None:
        try:
            rt.call("waiter", {"seconds": 0, "gate": gate.path}, agent="c", cancelled=cancelled)
        except OpError as exc:
            errors.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    wait_until(lambda: any(w.spec.name == "waiter" and w.isolation for w in rt._pool._busy), timeout=30,
               message="the waiter worker to start")
    busy = next(w for w in rt._pool._busy if w.spec.name == "waiter")
    cancelled.set()
    worker.join(30)
    assert errors and errors[0].code == ErrorCode.CANCELLED
    wait_until(lambda: busy.proc.poll() is not None, timeout=30, message="the cancelled worker to exit")
    healthy(rt)


# ------------------------------------------------------- concurrency and reuse
def test_a_slow_tool_never_holds_up_a_fast_one(rt: ToolRuntime, gates) -> None:
    """The slow call waits at a gate until the three fast ones are done: they cannot be waiting for it."""
    gate = gates.new()
    slow_done = threading.Event()
    slow_result: list[dict] = []

    def slow() -> None:
        try:
            slow_result.append(rt.call("waiter", {"seconds": 0, "gate": gate.path}, agent="slow"))
        finally:
            slow_done.set()

    t = threading.Thread(target=slow)
    t.start()
    wait_until(lambda: rt._pool._busy and any(w.spec.name == "waiter" for w in rt._pool._busy), timeout=30,
               message="the slow call to be running")
    for _ in range(3):
        assert rt.call("calculator", {"expression": "1+1"}, agent="fast")["value"] == 2
    assert not slow_done.is_set()  # three fast calls finished while the slow one was still running
    gate.open()
    t.join(60)
    assert slow_result and "ended" in slow_result[0]


def test_the_runtime_keeps_a_tool_within_its_limit(rt: ToolRuntime) -> None:
    """waiter has limit 1: two calls at once run one after the other (the scheduler does this too).
    (Not sleeper: its 2.5 s timeout covers the wait for the slot and two cold worker starts, which a
    busy machine can exceed.)"""
    spans: list[dict[str, float]] = []
    threads = [threading.Thread(target=lambda i=i: spans.append(rt.call("waiter", {"seconds": 0.2}, agent=f"l{i}")))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(spans) == 2
    first, second = sorted(spans, key=lambda s: s["started"])
    assert second["started"] >= first["ended"]


def test_warm_workers_are_reused_per_agent_only(rt: ToolRuntime) -> None:
    a1 = rt.call("probe", {}, agent="alice")
    a2 = rt.call("probe", {}, agent="alice")
    b1 = rt.call("probe", {}, agent="bob")
    assert a2["worker_started"] == a1["worker_started"] and a2["calls"] == a1["calls"] + 1  # same process
    assert b1["calls"] == 1  # bob never sees the worker (and module state) alice used
    assert rt._pool.idle_count("probe", "alice") == 1 and rt._pool.idle_count("probe", "bob") == 1


def test_python_tool_gets_a_fresh_worker_every_call(rt: ToolRuntime) -> None:
    code = "import os; open('state.txt', 'a').write('x'); print(len(open('state.txt').read()))"
    assert rt.call("python", {"code": code}, agent="py")["stdout"].strip() == "1"
    assert rt.call("python", {"code": code}, agent="py")["stdout"].strip() == "1"  # nothing carried over
    assert rt._pool.idle_count("python") == 0


def test_idle_warm_workers_expire(tmp_path: Path) -> None:
    """A call leaves a warm worker; once idle for warm_idle_s it is closed. The idle time is shortened
    only after the test has seen the warm worker (set to 0.2 s from the start, a busy machine could
    take that long between the call and the look)."""
    with ToolRuntime([SUPPORT_TOOLS], {"shipped": False, "warm_idle_s": 3600}) as runtime:
        runtime.call("probe", {}, agent="a")
        assert runtime._pool.idle_count("probe") == 1
        runtime._pool.idle_s = 0.2  # the reaper reads it on every pass (at most 5 s apart)
        wait_until(lambda: runtime._pool.idle_count("probe") == 0, timeout=30, message="the idle worker to expire")


def test_closing_the_runtime_ends_every_worker() -> None:
    runtime = ToolRuntime([SUPPORT_TOOLS], {"shipped": False})
    runtime.call("probe", {}, agent="a")
    runtime.call("probe", {}, agent="b")
    procs = [w.proc for ws in runtime._pool._idle.values() for w in ws]
    assert len(procs) == 2 and all(p.poll() is None for p in procs)
    runtime.close()
    assert all(p.poll() is not None for p in procs)
    err = op_error(runtime.call, "probe", {})
    assert err.code == ErrorCode.SHUTTING_DOWN


@pytest.mark.timeout(60)
def test_workers_die_with_the_tool_manager(tmp_path: Path) -> None:
    """A manager killed with SIGKILL leaves no worker behind (parent-death signal)."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from aios.managers.tools.runtime import ToolRuntime
        rt = ToolRuntime([{str(SUPPORT_TOOLS)!r}], {{"shipped": False}})
        rt.call("probe", {{}}, agent="a")
        rt.call("probe", {{}}, agent="b")
        pids = [w.proc.pid for ws in rt._pool._idle.values() for w in ws]
        print(" ".join(map(str, pids)), flush=True)
        os.kill(os.getpid(), 9)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50, cwd=REPO)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stderr

    def gone() -> bool:
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                pass
        return True

    wait_until(gone, timeout=30, message="the orphaned workers to exit")


# ------------------------------------------------------------ the bound on workers
def running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class WorkerCounter:
    """Samples, on a thread, the worker processes started since it was made (children of this test
    process, zombies included: a worker counts until it is reaped) and keeps the largest count seen."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.before = {p.pid for p in self.me.children()}
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def count(self) -> int:
        return len([p for p in self.me.children() if p.pid not in self.before])

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.count())
            self._stop.wait(0.005)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return max(self.peak, self.count())


def test_max_workers_bounds_all_workers_and_a_new_agent_takes_an_idle_ones_place() -> None:
    counter = WorkerCounter()
    with ToolRuntime([SUPPORT_TOOLS], {"shipped": False, "max_workers": 2, "warm_workers": 16}) as runtime:
        for i in range(8):
            assert runtime.call("probe", {"x": i}, agent=f"agent-{i}")["args"] == {"x": i}
        stats = runtime.status()["workers"]
        assert stats["live"] <= 2 and stats["max"] == 2
        assert stats["cold"] == 8 and stats["evicted"] == 6  # each new agent took the oldest idle one's place
    assert counter.stop() <= 2


def test_at_the_bound_a_call_waits_for_a_busy_worker_within_its_deadline() -> None:
    """One worker at most, held by a call that only ends when cancelled: another call times out naming
    max_workers; a third, with time to spare, runs once the first is cancelled and its worker gone."""
    counter = WorkerCounter()
    with ToolRuntime([SUPPORT_TOOLS], {"shipped": False, "max_workers": 1}) as runtime:
        cancel = threading.Event()
        first: list[object] = []

        def hold() -> None:
            try:
                runtime.call("forker", {"children": 1, "mb": 1, "hold_s": 25}, agent="a", cancelled=cancel)
            except OpError as exc:
                first.append(exc.code)

        holder = threading.Thread(target=hold)
        holder.start()
        wait_until(lambda: len(runtime._pool._busy) == 1, timeout=20, message="the first call's worker to be busy")
        err = op_error(runtime.call, "probe", {}, agent="b", timeout=0.3)
        assert err.code == ErrorCode.DEADLINE_EXCEEDED
        assert "all 1 are busy (tools max_workers)" in err.message
        third: list[object] = []
        waiter = threading.Thread(target=lambda: third.append(runtime.call("probe", {"x": 1}, agent="c", timeout=60)))
        waiter.start()
        cancel.set()
        holder.join(20)
        waiter.join(30)
        assert first == [ErrorCode.CANCELLED]
        assert len(third) == 1 and third[0]["args"] == {"x": 1}  # type: ignore[index]
    assert counter.stop() <= 1


def test_descriptors_past_1023_do_not_break_calls() -> None:
    """select() raised "filedescriptor out of range" once a worker's pipe got a number above 1023."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with ToolRuntime([SUPPORT_TOOLS], {"shipped": False}) as runtime:
            assert runtime.call("probe", {"x": 2}, agent="fd")["args"] == {"x": 2}
            worker = next(w for ws in runtime._pool._idle.values() for w in ws)
            assert worker.proc.stdout.fileno() > 1023
            assert runtime.call("probe", {"x": 3}, agent="fd")["args"] == {"x": 3}
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ------------------------------------------------------------------- limits per call
def test_memory_mb_limits_the_whole_call_not_each_process(rt: ToolRuntime) -> None:
    """30 forked children each well under the tool's 64 MB (each alone would pass its RLIMIT_AS) hold
    far more together: the call fails naming the limit, and the worker's whole tree is gone."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    err = op_error(rt.call, "forker", {"children": 30, "mb": 16, "hold_s": 25}, agent="forks")
    assert err.code == ErrorCode.QUOTA_EXCEEDED, err
    assert "tool 'forker' exceeded its memory limit of 64 MB per call" in err.message
    assert "manifest memory_mb" in err.message
    left = [p for p in me.children(recursive=True) if p.pid not in before and running(p)]
    assert left == [], "processes of the call outlived its error"
    assert rt.call("forker", {"children": 2, "mb": 4, "hold_s": 0}, agent="forks") == {"children": 2, "held_mb": 8}
    healthy(rt)
    method = rt.status()["call_limits"]
    assert method["method"] in ("cgroup v2", "process-tree accounting") and method["summary"]
