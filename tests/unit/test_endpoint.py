"""The endpoint description in the run directory (`aios.endpoint`): what the supervisor writes and
agents read instead of the kernel's configuration (no kernel, no sockets, no processes)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aios.config import Config, load_config
from aios.endpoint import Endpoint
from aios.rundir import RunDir


def test_the_endpoint_module_is_a_leaf() -> None:
    from tests.unit.test_config_composition import AIOS, _aios_imports
    assert _aios_imports(AIOS / "endpoint.py") == set()


def test_the_run_directory_describes_its_endpoint(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    cfg = load_config(None, {"kernel.high_water_mark": 500, "kernel.heartbeat_liveness": 4})
    rd.create(cfg)
    endpoint = rd.read_endpoint()
    assert endpoint == rd.endpoint(cfg)
    assert (endpoint.transport, endpoint.frontend, endpoint.backend) == (
        "ipc", rd.frontend_endpoint(cfg), rd.backend_endpoint(cfg))
    assert (endpoint.curve, endpoint.curve_server_key_file, endpoint.high_water_mark, endpoint.heartbeat_liveness,
            endpoint.max_message_bytes) == (False, None, 500, 4, cfg.kernel.max_message_bytes)

    tcp = load_config(None, {"kernel.transport": "tcp", "kernel.frontend_port": 7001, "kernel.backend_port": 7002})
    rd.create(tcp)
    remote = rd.read_endpoint()
    assert (remote.frontend, remote.curve, remote.curve_server_key_file) == ("tcp://127.0.0.1:7001", True,
                                                                            "curve.public")


def test_an_ipc_endpoint_in_a_directory_that_is_not_private_is_refused(tmp_path: Path) -> None:
    from aios.rundir import RunDirError
    rd = RunDir(tmp_path / "run")
    rd.create(Config())
    (rd.path / "ipc").chmod(0o755)
    with pytest.raises(RunDirError, match="not 0o700"):
        rd.read_endpoint()


def test_a_run_directory_without_an_endpoint_description_is_a_clear_error(tmp_path: Path) -> None:
    from aios import sdk
    rd = RunDir(tmp_path / "old")
    rd.create(Config())
    rd.endpoint_file.unlink()  # as a kernel started by an AIOS older than the file left it
    with pytest.raises(sdk.KernelUnavailable) as info:
        sdk.connect(rd, agent="late")
    assert "no endpoint description (endpoint.json)" in info.value.message and "restart it" in info.value.message


@pytest.mark.parametrize("fields, problem", [
    ({"transport": "ipc", "frontend": "ipc:///x/f.ipc", "backend": "ipc:///x/b.ipc"}, "curve needs the tcp transport"),
    ({"curve_server_key_file": "../elsewhere/curve.public"}, "in the run directory itself"),
    ({"frontend": "ipc:///x/frontend.ipc"}, "is not a tcp:// address"),
])
def test_an_inconsistent_endpoint_description_is_refused(fields: dict[str, Any], problem: str) -> None:
    good = {"transport": "tcp", "frontend": "tcp://h:1", "backend": "tcp://h:2", "curve": True,
            "curve_server_key_file": "curve.public", "high_water_mark": 100, "max_message_bytes": 1024,
            "heartbeat_interval_s": 1.0, "heartbeat_liveness": 3}
    Endpoint.model_validate(good)
    with pytest.raises(ValueError, match=problem):
        Endpoint.model_validate({**good, **fields})
