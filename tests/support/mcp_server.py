"""A small MCP server over stdio for the tool runtime's tests (mcp 2.x MCPServer).

Tools: add (numbers), echo (text), slow (sleeps), boom (raises), crash (os._exit
mid-call), hog (allocates), connect (TCP to 127.0.0.1), calls (how many tool calls reached this process), pid.
`calls` lets a test prove that a call rejected by validation never reached the server.
"""
from __future__ import annotations

import os
import time

from mcp.server.mcpserver import MCPServer

app = MCPServer("aios-test")
CALLS = 0


def _count() -> None:
    global CALLS
    CALLS += 1


@app.tool()
def add(a: float, b: float) -> float:
    """Add two numbers."""
    _count()
    return a + b


@app.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    _count()
    return text


@app.tool()
def slow(seconds: float, gate: str = "") -> str:
    """Sleep for the given seconds, after waiting at `gate` (a file path) if one is given."""
    _count()
    # tests/support/gates.py's wait (this script runs with only its own folder on the path): until
    # the test opens the gate (the file exists) or removes the gates' folder
    while gate and not os.path.exists(gate) and os.path.isdir(os.path.dirname(gate)):
        time.sleep(0.01)
    time.sleep(seconds)
    return "done"


@app.tool()
def boom() -> str:
    """Always raises."""
    _count()
    raise ValueError("boom went the tool")


@app.tool()
def crash() -> str:
    """Kill the server process in the middle of the call."""
    os._exit(9)


@app.tool()
def hog(mb: int) -> int:
    """Allocate the given megabytes."""
    _count()
    return len(bytearray(mb << 20)) >> 20


@app.tool()
def connect(port: int) -> str:
    """Try to open a TCP connection to 127.0.0.1:port."""
    import socket
    _count()
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect(("127.0.0.1", port))
        return "connected"
    except OSError as exc:
        return f"refused: {exc}"
    finally:
        s.close()


@app.tool()
def calls() -> int:
    """How many tool calls reached this server process."""
    return CALLS


@app.tool()
def pid() -> int:
    """The server's process id."""
    return os.getpid()


if __name__ == "__main__":
    app.run()
