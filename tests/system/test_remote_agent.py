"""An agent reaches the kernel with the run directory's endpoint description (`endpoint.json`),
not the kernel's configuration."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from aios import sdk
from tests.support.network import free_port

pytestmark = pytest.mark.timeout(120)


def test_an_agent_needs_only_the_endpoint_description_and_the_keys(kernel, tmp_path: Path) -> None:
    """A remote agent's copy of the run directory: the signing key, the server's CURVE key and
    endpoint.json, no config.json. It connects over tcp with CURVE and calls the kernel."""
    k = kernel(kernel={"transport": "tcp", "host": "127.0.0.1", "frontend_port": free_port(),
                       "backend_port": free_port(), "high_water_mark": 1000})
    endpoint = k.run_dir.read_endpoint()
    assert (endpoint.transport, endpoint.curve, endpoint.high_water_mark) == ("tcp", True, 1000)
    remote = tmp_path / "remote"
    remote.mkdir(mode=0o700)
    for name in ("key", "curve.public", "endpoint.json"):
        shutil.copy2(k.run_dir.path / name, remote / name)
    assert not (remote / "config.json").exists()
    with sdk.connect(remote, agent="far-away", timeout=20) as c:
        assert c.call("echo", "echo", text="from afar")["text"] == "from afar"
