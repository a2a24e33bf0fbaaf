"""How to reach a running kernel: the small description the supervisor writes to the run directory.

An agent (the SDK) or a manager needs only this from the configuration: where
the scheduler's two sockets are, over which transport, whether CURVE is on,
and the socket limits and heartbeat rhythm every peer must share. The
supervisor writes it as `endpoint.json` when it prepares the run directory
(`RunDir.create`), and a client reads it with `RunDir.read_endpoint()`
instead of parsing the whole kernel configuration; `aios.sockets` builds
sockets from it. A leaf module: pydantic and the standard library only.

    {"transport": "ipc", "frontend": "ipc:///run/user/1000/aios/ipc/frontend.ipc",
     "backend": "ipc:///run/user/1000/aios/ipc/backend.ipc", "curve": false,
     "curve_server_key_file": null, "high_water_mark": 100000, "max_message_bytes": 16777216,
     "heartbeat_interval_s": 1.0, "heartbeat_liveness": 3}

Addresses are the ones to connect to (the scheduler binds its own). The
CURVE key file is named relative to the run directory, so a run directory's
files copied to another machine still describe the kernel.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["ENDPOINT_FILE", "Endpoint"]

#: the file in the run directory that holds the endpoint description
ENDPOINT_FILE = "endpoint.json"


class Endpoint(BaseModel):
    """Where and how to connect to one kernel's scheduler."""

    # Unknown keys are ignored: an SDK older than the kernel still connects.
    model_config = ConfigDict(extra="ignore", frozen=True)

    transport: Literal["ipc", "tcp"]
    frontend: str = Field(description="agents' address (a DEALER connects here)")
    backend: str = Field(description="managers' address")
    curve: bool = Field(description="the scheduler's sockets are CURVE servers (tcp only)")
    curve_server_key_file: str | None = Field(default=None,
                                              description="the server's public key, relative to the run directory")
    high_water_mark: int = Field(ge=1)
    max_message_bytes: int = Field(ge=1)
    heartbeat_interval_s: float = Field(gt=0)
    heartbeat_liveness: int = Field(ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> "Endpoint":
        for address in (self.frontend, self.backend):
            if not address.startswith(f"{self.transport}://"):
                raise ValueError(f"address {address!r} is not a {self.transport}:// address")
        if self.curve and (self.transport != "tcp" or not self.curve_server_key_file):
            raise ValueError("curve needs the tcp transport and the server's key file")
        if self.curve_server_key_file is not None and ("/" in self.curve_server_key_file
                                                       or self.curve_server_key_file in ("", ".", "..")):
            raise ValueError("curve_server_key_file must name a file in the run directory itself")
        return self
