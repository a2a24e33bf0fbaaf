"""Fixtures of the system layer: real kernels, started and checked for leftovers at teardown.

The helpers behind them (`Kernel`, `KernelFactory`, `wait_until`, ...) live in
tests/support/, so test modules import them from there, never from a conftest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.support.gates import Gates
from tests.support.kernel import KernelFactory


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[KernelFactory]:
    """Factory: `k = kernel(capacity=2, managers=[...], supervisor={...})` starts a kernel."""
    factory = KernelFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def module_kernel_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelFactory]:
    """A factory whose kernels live for a whole test module (for tests that share one kernel)."""
    factory = KernelFactory(tmp_path_factory.mktemp("kernels"))
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (".../v1") of a real llama_cpp.server on the default model, one per test module."""
    from tests.support.llama_server import llama_server as running
    with running(tmp_path_factory.mktemp("llama_server")) as base:
        yield base


@pytest.fixture
def gates() -> Iterator[Gates]:
    """Gates that hold a handler until the test opens them (tests/support/gates.py). Ask for it after
    `kernel`: it is then torn down first, and removing its folder releases every handler still held."""
    g = Gates()
    try:
        yield g
    finally:
        g.close()
