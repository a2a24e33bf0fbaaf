"""What a call checks before anything is sent, and the one deadline everything a call does draws on.

Through a real kernel: the SDK refuses, with `InvalidArgument` naming the argument or the limit,
what the kernel could not take (an argument msgpack cannot carry, a request over `[kernel]
max_message_bytes`, an agent name the kernel refuses), and the same client carries on after.
A call's timeout covers the `kernel.ops` question asked before it.
"""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from aios import sdk
from tests.support.kernel import Kernel

pytestmark = pytest.mark.timeout(120)

#: a small frame limit, so the oversized request is small too
LIMIT = 1 << 20


@pytest.fixture(scope="module")
def k(module_kernel_factory) -> Kernel:
    return module_kernel_factory(kernel={"max_message_bytes": LIMIT}, builtins={"storage": {}})


# ----------------------------------------------------------------- arguments
@pytest.mark.parametrize("case", ["lone surrogate in a path", "seed beyond 64 bits", "an object argument",
                                  "lone surrogate in a tool name"])
def test_an_argument_the_kernel_cannot_take_is_invalid_argument_naming_it(k: Kernel, case: str) -> None:
    """Before: a raw UnicodeEncodeError, OverflowError or TypeError from inside the SDK."""
    with k.client("careful", timeout=20) as c:
        make, named, why = {
            "lone surrogate in a path": (lambda: c.storage.write("notes/\ud800.md", "x"), "'path'", "surrogate"),
            "seed beyond 64 bits": (lambda: c.chat("hi", seed=2 ** 64), "'seed'", "2**64-1"),
            "an object argument": (lambda: c.call("echo", "echo", text=object()), "'text'", "type object"),
            "lone surrogate in a tool name": (lambda: c.tools.call("calc\udcff"), "'target'", "surrogate"),
        }[case]
        with pytest.raises(sdk.InvalidArgument) as info:
            make()
        assert info.value.code == "INVALID_ARGUMENT" and not info.value.retryable
        assert f"argument {named}" in info.value.message and why in info.value.message
        assert c.call("echo", "echo", text="still served")["text"] == "still served"


def test_a_request_over_the_message_limit_names_the_limit_and_its_key(k: Kernel) -> None:
    """Before: the scheduler dropped the connection, and the write was answered as if the scheduler had
    restarted ("may or may not have taken effect", retryable)."""
    with k.client("bulky", timeout=20) as c:
        with pytest.raises(sdk.InvalidArgument) as info:
            c.storage.write("big.bin", b"\0" * (2 * LIMIT))
        err = info.value
        assert err.code == "TOO_LARGE" and not err.retryable
        assert f"at most {LIMIT} bytes" in err.message and "[kernel] max_message_bytes" in err.message
        assert c.storage.write("small.bin", b"\0" * 1000)["size"] == 1000  # the same client carries on
        with pytest.raises(sdk.NotFound):
            c.storage.read("big.bin")


@pytest.mark.parametrize("agent", ["*", "../alice", "kernel", "a\x00b", "al\u200bice"])
def test_a_client_for_an_agent_name_the_kernel_refuses_is_not_created(k: Kernel, agent: str) -> None:
    with pytest.raises(sdk.InvalidArgument) as info:
        sdk.connect(k.run_dir, agent=agent)
    assert info.value.message.startswith("client: ") and "agent name" in info.value.message
    with pytest.raises(sdk.InvalidArgument):
        sdk.connect_async(k.run_dir, agent=agent)


# ------------------------------------------------------------------ one deadline
class RecordingClient(sdk.Client):
    """The real client, noting the timeout of each call it makes (the kernel.ops fetch included)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.timeouts: list[tuple[str, str, float | None]] = []
        super().__init__(*args, **kwargs)

    def request(self, service: str, op: str, args: dict[str, Any] | None = None, *, timeout: float | None = None,
                **kw: Any) -> Any:
        self.timeouts.append((service, op, timeout))
        return super().request(service, op, args, timeout=timeout, **kw)


class RecordingAsyncClient(sdk.AsyncClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.timeouts: list[tuple[str, str, float | None]] = []
        super().__init__(*args, **kwargs)

    async def request(self, service: str, op: str, args: dict[str, Any] | None = None, *,
                      timeout: float | None = None, **kw: Any) -> Any:
        self.timeouts.append((service, op, timeout))
        return await super().request(service, op, args, timeout=timeout, **kw)


def _ops_fetch_within(timeouts: list[tuple[str, str, float | None]], call_timeout: float) -> None:
    assert timeouts[0] == ("echo", "sleep", call_timeout)
    fetches = [t for s, o, t in timeouts if (s, o) == ("kernel", "ops")]
    assert len(fetches) == 1, timeouts  # a fresh client asks once which ops are safe to repeat
    assert fetches[0] is not None and 0 < fetches[0] <= call_timeout, timeouts  # before: min(client timeout, 10)


def test_the_ops_fetch_before_a_call_gets_what_is_left_of_the_calls_timeout(k: Kernel) -> None:
    """Before: the kernel.ops fetch had a budget of its own (10 s), so a 5 s call could take 15."""
    c = RecordingClient(k.run_dir, agent="punctual", timeout=120.0)
    try:
        assert c.request("echo", "sleep", {"seconds": 0}, timeout=3.0).result["slept"] == 0
        _ops_fetch_within(c.timeouts, 3.0)
    finally:
        c.close()


def test_the_async_clients_ops_fetch_draws_on_the_calls_timeout_too(k: Kernel) -> None:
    async def run() -> list[tuple[str, str, float | None]]:
        c = RecordingAsyncClient(k.run_dir, agent="punctual-async", timeout=120.0)
        try:
            await c.request("echo", "sleep", {"seconds": 0}, timeout=3.0)
            return c.timeouts
        finally:
            await c.close()

    _ops_fetch_within(asyncio.run(run()), 3.0)
