"""The run directory: everything one kernel keeps on disk.

    <run dir>/            mode 0700
        key               HMAC key, mode 0600
        config.json       the resolved configuration every kernel process reads
        endpoint.json     how to reach the scheduler (`aios.endpoint`): what agents read
        supervisor.pid    pid of the supervisor
        processes.json    the supervisor's process table (name, pid, state, restarts)
        logs/             one log file per process
        ipc/              ipc endpoints (or a short /tmp directory, see below)
        snapshots/        spilled LLM contexts
        storage.db        SQLite database

Unix socket paths are limited to about 107 bytes. When the run directory is
too deep for that, the ipc endpoints move to a private directory with a
random name under the temporary directory, recorded in `ipc-dir` (see
`RunDir.ipc_dir`).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import zmq

from pydantic import ValidationError

from aios.config import Config, config_from_json, config_to_json
from aios.endpoint import ENDPOINT_FILE, Endpoint
from aios.protocol import KEY_BYTES, new_key

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
    def endpoint_file(self) -> Path:
        return self.path / ENDPOINT_FILE

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
    def ipc_pointer_file(self) -> Path:
        return self.path / "ipc-dir"

    @property
    def ipc_dir(self) -> Path:
        """Where the ipc endpoints live: `<run dir>/ipc`, or, when that path is too long for a
        socket address, a private directory under the temporary directory.

        That directory's name is random (made by `mkdtemp`) and recorded in `ipc-dir` inside the
        0700 run directory; every process checks it is a real directory owned by this user with
        mode 0700 before using it. (A name derived from a hash of the run directory, as before,
        could be created first by another local user, who would then receive agents' traffic.)
        """
        local = self.path / "ipc"
        if len(str(local / "frontend.ipc")) <= IPC_PATH_LIMIT:
            return local
        try:
            recorded = Path(self.ipc_pointer_file.read_text().strip())
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            raise RunDirError(f"no ipc directory recorded for {self.path} (is a kernel running there?)") from None
        verify_private_dir(recorded)
        return recorded

    def _make_external_ipc_dir(self) -> Path:
        d = Path(tempfile.mkdtemp(prefix="aios-ipc-"))  # random name, mode 0700, created by us
        write_atomic(self.ipc_pointer_file, str(d))
        return d

    def remove_external_ipc_dir(self) -> None:
        """After a stop: remove the private ipc directory (only if it is verifiably ours)."""
        try:
            recorded = Path(self.ipc_pointer_file.read_text().strip())
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        try:
            verify_private_dir(recorded)
        except RunDirError:
            return
        shutil.rmtree(recorded, ignore_errors=True)
        self.ipc_pointer_file.unlink(missing_ok=True)

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
        for d in (self.path, self.log_dir, self.snapshot_dir):
            self._private_dir(d)
        local = self.path / "ipc"
        if len(str(local / "frontend.ipc")) <= IPC_PATH_LIMIT:
            self._private_dir(local)
        else:
            self.remove_external_ipc_dir()
            self._make_external_ipc_dir()
        # The signing key survives restarts of the kernel in the same run directory, so agents that
        # were connected carry on after `aios stop` + `aios start` (a new key would make every frame
        # of theirs a bad signature). It is replaced only when it is missing or not private.
        if not self._private_file_ok(self.key_file, KEY_BYTES):
            _write_private(self.key_file, new_key())
        if self.uses_curve(config):
            # The scheduler's server key pair, and the key pair managers authenticate with: the
            # backend admits only that client key (ZAP), so a peer without it cannot even connect.
            for secret_file, public_file in ((self.curve_secret_file, self.curve_public_file),
                                             (self.manager_secret_file, self.manager_public_file)):
                if not (self._private_file_ok(secret_file, 40) and public_file.exists()):
                    public, secret = zmq.curve_keypair()
                    _write_private(secret_file, secret)
                    write_atomic(public_file, public.decode())
        write_atomic(self.config_file, config_to_json(config))
        write_atomic(self.endpoint_file, self.endpoint(config).model_dump_json(indent=2) + "\n")

    @staticmethod
    def _private_file_ok(path: Path, size: int) -> bool:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        return (stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o600
                and st.st_size == size)

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
        try:
            return config_from_json(self.config_file.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no kernel configuration in {self.path} (is a kernel running there?)") from None

    # --- endpoints ----------------------------------------------------------
    def endpoint(self, config: Config) -> Endpoint:
        """The description of how to reach this kernel (what `create` writes to `endpoint.json`)."""
        k = config.kernel
        curve = self.uses_curve(config)
        return Endpoint(transport=k.transport, frontend=self.frontend_endpoint(config),
                        backend=self.backend_endpoint(config), curve=curve,
                        curve_server_key_file=self.curve_public_file.name if curve else None,
                        high_water_mark=k.high_water_mark, max_message_bytes=k.max_message_bytes,
                        heartbeat_interval_s=k.heartbeat_interval_s, heartbeat_liveness=k.heartbeat_liveness)

    def read_endpoint(self) -> Endpoint:
        """The endpoint description the supervisor wrote. An ipc address's directory is checked
        (a real directory of ours, mode 0700: see `ipc_dir`) before anyone connects to it.

        Raises FileNotFoundError when there is none (no kernel was started here, or one by an
        AIOS older than the file: restart it), RunDirError when it cannot be used."""
        try:
            text = self.endpoint_file.read_text()
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(f"no endpoint description ({ENDPOINT_FILE}) in {self.path}: no kernel was "
                                    f"started there, or one by an older AIOS (restart it)") from None
        except PermissionError:
            raise RunDirError(f"cannot read {self.endpoint_file} (permission denied)") from None
        try:
            endpoint = Endpoint.model_validate_json(text)
        except ValidationError as exc:
            raise RunDirError(f"{self.endpoint_file} is not a valid endpoint description "
                              f"({exc.errors()[0].get('msg', 'invalid')}); restart the kernel") from None
        if endpoint.transport == "ipc":
            for address in (endpoint.frontend, endpoint.backend):
                verify_private_dir(Path(address[len("ipc://"):]).parent)
        return endpoint

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

    @property
    def manager_secret_file(self) -> Path:
        return self.path / "curve-manager.secret"

    @property
    def manager_public_file(self) -> Path:
        return self.path / "curve-manager.public"

    @staticmethod
    def uses_curve(config: Config | Endpoint) -> bool:
        if isinstance(config, Endpoint):
            return config.curve
        return config.kernel.transport == "tcp" and config.kernel.curve

    def secure_server(self, sock: zmq.Socket, config: Config | Endpoint, role: str = "frontend") -> None:
        """A scheduler socket: a CURVE server whose ZAP domain is its role (see `Broker`)."""
        if self.uses_curve(config):
            sock.curve_secretkey = self.curve_secret_file.read_bytes()
            sock.curve_server = True
            sock.zap_domain = role.encode()

    def secure_client(self, sock: zmq.Socket, config: Config | Endpoint, role: str = "agent") -> None:
        """An agent gets a fresh key pair per socket (any agent key is accepted; the HMAC signature
        authenticates it); a manager uses the kernel's manager key pair, the only key the backend admits."""
        if self.uses_curve(config):
            if role == "manager":
                public = self.manager_public_file.read_bytes().strip()
                secret = self.manager_secret_file.read_bytes()
            else:
                public, secret = zmq.curve_keypair()
            server_key = self.curve_public_file
            if isinstance(config, Endpoint) and config.curve_server_key_file:
                server_key = self.path / config.curve_server_key_file
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            sock.curve_serverkey = server_key.read_bytes().strip()

    def ipc_files(self) -> list[Path]:
        try:
            d = self.ipc_dir
        except RunDirError:
            return []
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
            if created is None and "aios" not in " ".join(proc.cmdline()):
                return None  # an old-style pid file: at least the process must be an AIOS one
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
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):  # missing, unreadable, a file where the directory should be, torn
            return None
        return data if isinstance(data, dict) else None


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret with mode 0600 from the start (never readable by others, even briefly)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def verify_private_dir(d: Path) -> None:
    """Refuse a directory that is not a real directory owned by this user with mode 0700."""
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        raise RunDirError(f"ipc directory {d} does not exist (is a kernel running?)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"refusing to use ipc directory {d}: it is not a directory (a link?)")
    if st.st_uid != os.getuid():
        raise RunDirError(f"refusing to use ipc directory {d}: it belongs to uid {st.st_uid}, not to us")
    if stat.S_IMODE(st.st_mode) != 0o700:
        raise RunDirError(f"refusing to use ipc directory {d}: its mode is {oct(stat.S_IMODE(st.st_mode))}, not 0o700")


def write_atomic(path: Path, text: str) -> None:
    """Write via rename so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
