"""The run directory: everything one kernel keeps on disk.

    <run dir>/            mode 0700
        key               HMAC key, mode 0600
        config.json       the resolved configuration every process reads
        supervisor.pid    pid of the supervisor
        processes.json    the supervisor's process table (name, pid, state, restarts)
        logs/             one log file per process
        ipc/              ipc endpoints (or a short /tmp directory, see below)
        snapshots/        spilled LLM contexts
        storage.db        SQLite database

Unix socket paths are limited to about 107 bytes. When the run directory is
too deep for that, the ipc endpoints move to a short private directory under
/tmp named after a hash of the run directory, so the mapping stays stable.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import zmq

from aios.config import Config, config_from_json, config_to_json
from aios.protocol import new_key

IPC_PATH_LIMIT = 100


class RunDirError(Exception):
    """A run directory that cannot be used; the message says why in one line."""


def default_run_dir() -> Path:
    env = os.environ.get("AIOS_RUN_DIR")
    if env:
        return Path(env).expanduser()
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.access(runtime, os.W_OK):
        return Path(runtime) / "aios"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "aios" / "run"


class RunDir:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path).expanduser().absolute() if path else default_run_dir().absolute()

    # --- well-known files -------------------------------------------------
    @property
    def key_file(self) -> Path:
        return self.path / "key"

    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def pid_file(self) -> Path:
        return self.path / "supervisor.pid"

    @property
    def state_file(self) -> Path:
        return self.path / "processes.json"

    @property
    def log_dir(self) -> Path:
        return self.path / "logs"

    @property
    def snapshot_dir(self) -> Path:
        return self.path / "snapshots"

    @property
    def ipc_dir(self) -> Path:
        local = self.path / "ipc"
        if len(str(local / "frontend.ipc")) <= IPC_PATH_LIMIT:
            return local
        digest = hashlib.sha256(str(self.path).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"aios-{digest}"

    # --- lifecycle ----------------------------------------------------------
    def prepare_dir(self) -> None:
        """Create the run directory and its logs folder (mode 0700), or say in one line why not."""
        for d in (self.path, self.log_dir):
            self._private_dir(d)

    def _private_dir(self, d: Path) -> None:
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(d, 0o700)
        except (FileExistsError, NotADirectoryError):
            raise RunDirError(f"cannot use run directory {self.path}: {d} exists and is not a directory") from None
        except PermissionError:
            raise RunDirError(f"cannot use run directory {self.path}: permission denied on {d}") from None
        except OSError as exc:
            raise RunDirError(f"cannot use run directory {self.path}: {exc.strerror or exc}") from None

    def create(self, config: Config) -> None:
        """Create the directory tree with private modes, a fresh key and the config."""
        for d in (self.path, self.log_dir, self.ipc_dir, self.snapshot_dir):
            self._private_dir(d)
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, new_key())
        finally:
            os.close(fd)
        os.chmod(self.key_file, 0o600)
        if self.uses_curve(config):
            public, secret = zmq.curve_keypair()
            fd = os.open(self.curve_secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, secret)
            finally:
                os.close(fd)
            write_atomic(self.curve_public_file, public.decode())
        write_atomic(self.config_file, config_to_json(config))

    def exists(self) -> bool:
        return self.key_file.exists() and self.config_file.exists()

    def load_key(self) -> bytes:
        try:
            return self.key_file.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no AIOS kernel key in {self.path} (is a kernel running there? start one with bin/aios-start)"
            ) from None

    def load_config(self) -> Config:
        return config_from_json(self.config_file.read_text())

    # --- endpoints ----------------------------------------------------------
    def frontend_endpoint(self, config: Config, bind: bool = False) -> str:
        k = config.kernel
        if k.transport == "tcp":
            return f"tcp://{'*' if bind and k.host in ('0.0.0.0', '*') else k.host}:{k.frontend_port}"
        return f"ipc://{self.ipc_dir / 'frontend.ipc'}"

    def backend_endpoint(self, config: Config, bind: bool = False) -> str:
        k = config.kernel
        if k.transport == "tcp":
            return f"tcp://{'*' if bind and k.host in ('0.0.0.0', '*') else k.host}:{k.backend_port}"
        return f"ipc://{self.ipc_dir / 'backend.ipc'}"

    # --- CurveZMQ on tcp ---------------------------------------------------
    # Over tcp the scheduler's sockets are CURVE servers, so traffic between
    # machines is encrypted; every peer learns the server's public key from
    # the run directory (copy `curve.public` and `key` to a remote agent).
    # Authentication stays with the HMAC signature on every frame.
    @property
    def curve_secret_file(self) -> Path:
        return self.path / "curve.secret"

    @property
    def curve_public_file(self) -> Path:
        return self.path / "curve.public"

    @staticmethod
    def uses_curve(config: Config) -> bool:
        return config.kernel.transport == "tcp" and config.kernel.curve

    def secure_server(self, sock: zmq.Socket, config: Config, role: str = "frontend") -> None:
        if self.uses_curve(config):
            sock.curve_secretkey = self.curve_secret_file.read_bytes()
            sock.curve_server = True

    def secure_client(self, sock: zmq.Socket, config: Config, role: str = "agent") -> None:
        if self.uses_curve(config):
            public, secret = zmq.curve_keypair()
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            sock.curve_serverkey = self.curve_public_file.read_bytes().strip()

    def ipc_files(self) -> list[Path]:
        d = self.ipc_dir
        return sorted(d.glob("*.ipc")) if d.exists() else []

    # --- supervisor state ---------------------------------------------------
    def read_pid(self) -> int | None:
        """The pid the supervisor wrote, as written (it may be stale: see `supervisor_pid`)."""
        record = self._pid_record()
        return record[0] if record else None

    def _pid_record(self) -> tuple[int, float | None] | None:
        try:
            text = self.pid_file.read_text().strip()
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return None
        if isinstance(data, int):
            return data, None
        if isinstance(data, dict) and isinstance(data.get("pid"), int):
            created = data.get("create_time")
            return data["pid"], float(created) if isinstance(created, (int, float)) else None
        return None

    def write_pid(self) -> None:
        """Record this process as the run directory's supervisor, with its start time: a pid alone
        can be reused by an unrelated process after a crash, and `aios stop` must never signal that."""
        import psutil
        me = psutil.Process()
        write_atomic(self.pid_file, json.dumps({"pid": me.pid, "create_time": me.create_time()}) + "\n")

    def supervisor_pid(self) -> int | None:
        """The live supervisor of this run directory, or None (no pid file, dead, or the pid now
        belongs to another process: its start time differs from the one recorded)."""
        import psutil
        record = self._pid_record()
        if record is None:
            return None
        pid, created = record
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            if created is not None and abs(proc.create_time() - created) > 0.01:
                return None
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return pid

    def read_plan(self) -> dict[str, str]:
        """Configured manager processes and their services, as the supervisor wrote them."""
        state = self.read_state() or {}
        return {p["name"]: p["service"] for p in state.get("processes", [])
                if isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("service"), str)}

    def read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None


def write_atomic(path: Path, text: str) -> None:
    """Write via rename so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
