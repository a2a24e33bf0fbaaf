"""MCP servers over stdio mounted as tools: listed, validated, limited, timed out, restarted.

The server is tests/support/mcp_server.py, a real MCP server process (mcp 2.x MCPServer).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import Iterator

import pytest

from aios.managers.tools.runtime import ToolRuntime
from aios.protocol import ErrorCode
from tests.support.errors import op_error
from tests.support.paths import SUPPORT
from tests.support.waiting import wait_until

SERVER = str(SUPPORT / "mcp_server.py")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def rt() -> Iterator[ToolRuntime]:
    runtime = ToolRuntime([], {"shipped": False, "max_result_bytes": 8192, "mcp": [
        {"name": "demo", "command": [sys.executable, SERVER], "limit": 3, "timeout_s": 1.5},
        {"name": "capped", "command": [sys.executable, SERVER], "memory_mb": 512},
        {"name": "jailed", "command": [sys.executable, SERVER], "sandbox": True},
        {"name": "broken", "command": ["/nonexistent/mcp-server"], "start_timeout_s": 5},
    ]})
    try:
        yield runtime
    finally:
        runtime.close()




def test_mcp_tools_are_listed_like_local_tools(rt: ToolRuntime) -> None:
    names = {t.name for t in rt.list()}
    assert {"demo__add", "demo__slow", "demo__boom", "capped__hog", "jailed__connect"} <= names
    info = rt.describe("demo__add")
    assert info.kind == "mcp" and info.source == "mcp:demo" and info.description == "Add two numbers."
    assert info.parameters["required"] == ["a", "b"]
    assert info.function["function"]["name"] == "demo__add"
    assert rt.limits()["demo__add"] == 3 and rt.limits()["capped__hog"] == 2
    problems = [p for p in rt.all_problems() if p.path == "mcp:broken"]
    assert len(problems) == 1 and "failed to start" in problems[0].reason


def test_mcp_call_returns_structured_data(rt: ToolRuntime) -> None:
    assert rt.call("demo__add", {"a": 2, "b": 3}, agent="m") == {"result": 5.0}
    assert rt.call("demo__echo", {"text": "hi"}, agent="m") == {"result": "hi"}


def test_invalid_arguments_never_reach_the_server(rt: ToolRuntime) -> None:
    before = rt.call("demo__calls", {}, agent="m")["result"]
    err = op_error(rt.call, "demo__add", {"a": "x", "b": 1}, agent="m")
    assert err.code == ErrorCode.INVALID_ARGUMENT and err.message == "tool 'demo__add': arguments.a: 'x' is not of type 'number'"
    err = op_error(rt.call, "demo__add", {"a": 1}, agent="m")
    assert "'b' is a required property" in err.message
    assert rt.call("demo__calls", {}, agent="m")["result"] == before


def test_a_raising_mcp_tool(rt: ToolRuntime) -> None:
    err = op_error(rt.call, "demo__boom", {}, agent="m")
    assert err.code == ErrorCode.BACKEND_ERROR and "tool 'demo__boom' failed" in err.message
    assert rt.call("demo__add", {"a": 1, "b": 1}, agent="m") == {"result": 2.0}


def test_mcp_timeout_then_healthy(rt: ToolRuntime) -> None:
    err = op_error(rt.call, "demo__slow", {"seconds": 20}, agent="m")
    assert err.code == ErrorCode.DEADLINE_EXCEEDED and "within 1.5 s" in err.message
    assert rt.call("demo__add", {"a": 1, "b": 2}, agent="m") == {"result": 3.0}


def test_a_slow_mcp_call_does_not_hold_up_a_fast_one(rt: ToolRuntime, gates) -> None:
    """The slow call waits at a gate until three fast calls to the same server are done. On `capped`
    (the default 30 s timeout), not `demo`: its 1.5 s timeout would end the slow call while a busy
    machine is still making the fast ones."""
    gate = gates.new()
    done = threading.Event()
    slow_result: list[dict] = []
    before = rt.call("capped__calls", {}, agent="m")["result"]

    def slow() -> None:
        try:
            slow_result.append(rt.call("capped__slow", {"seconds": 0, "gate": gate.path}, agent="slow"))
        finally:
            done.set()

    t = threading.Thread(target=slow)
    t.start()
    wait_until(lambda: rt.call("capped__calls", {}, agent="m")["result"] > before, timeout=30,
               message="the slow call to reach the server")
    for _ in range(3):
        assert rt.call("capped__add", {"a": 1, "b": 1}, agent="fast") == {"result": 2.0}
    assert not done.is_set()
    gate.open()
    t.join(60)
    assert slow_result == [{"result": "done"}]


def test_result_size_limit(rt: ToolRuntime) -> None:
    assert rt.call("demo__echo", {"text": "x" * 100}, agent="m")["result"] == "x" * 100
    err = op_error(rt.call, "demo__echo", {"text": "x" * 20_000}, agent="m")
    assert err.code == ErrorCode.TOO_LARGE and "8192 bytes" in err.message


def test_server_crash_mid_call_is_clear_and_restarted_on_next_use(rt: ToolRuntime) -> None:
    first = rt.call("demo__pid", {}, agent="m")["result"]
    err = op_error(rt.call, "demo__crash", {}, agent="m")
    assert err.code == ErrorCode.UNAVAILABLE and err.code.retryable
    assert "MCP server 'demo' exited during the call" in err.message and "restarted" in err.message
    second = rt.call("demo__pid", {}, agent="m")["result"]
    assert second != first
    assert rt.call("demo__add", {"a": 2, "b": 2}, agent="m") == {"result": 4.0}


def test_server_killed_while_idle_is_restarted_transparently(rt: ToolRuntime) -> None:
    pid = rt.call("demo__pid", {}, agent="m")["result"]
    os.kill(pid, signal.SIGKILL)
    assert rt.call("demo__add", {"a": 5, "b": 5}, agent="m") == {"result": 10.0}
    assert rt.call("demo__pid", {}, agent="m")["result"] != pid


def test_server_memory_limit(rt: ToolRuntime) -> None:
    assert rt.call("capped__hog", {"mb": 16}, agent="m") == {"result": 16}
    err = op_error(rt.call, "capped__hog", {"mb": 4096}, agent="m")
    assert err.code in (ErrorCode.BACKEND_ERROR, ErrorCode.UNAVAILABLE)
    assert rt.call("capped__add", {"a": 1, "b": 1}, agent="m") == {"result": 2.0}


def test_sandboxed_server_has_no_network(rt: ToolRuntime) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        assert rt.call("demo__connect", {"port": port}, agent="m") == {"result": "connected"}  # unsandboxed: reaches it
        listener.accept()[0].close()
        assert rt.call("jailed__connect", {"port": port}, agent="m")["result"].startswith("refused")
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_a_server_that_cannot_start(rt: ToolRuntime) -> None:
    err = op_error(rt.call, "broken__anything", {}, agent="m")
    assert err.code == ErrorCode.UNAVAILABLE and "MCP server 'broken' failed to start" in err.message
    assert rt.call("demo__add", {"a": 0, "b": 1}, agent="m") == {"result": 1.0}
