"""The python tool's sandbox, tested on the property itself rather than on the calls that set it up.

A snippet must not read a secret placed like the kernel's key (a 0600 file in a 0700
directory owned by the kernel's user, which is root here, so file modes alone would not
stop a root child), must not write outside its own directory (host /tmp, the run
directory, the repository, $HOME), and must not connect to a TCP listener the test opens
on 127.0.0.1. Both confinement strategies run here: "root" (what the kernel uses as
root) and "userns" (what it uses as a normal user), the latter forced while root.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import textwrap
import uuid
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from aios.managers.tools.runtime import ToolRuntime
from tests.support.paths import REPO

STRATEGIES = ["root", "userns"] if os.geteuid() == 0 else ["userns"]

pytestmark = pytest.mark.timeout(90)


def place_secret(parent: Path) -> tuple[Path, Path, bytes]:
    """A directory and file laid out like the run directory and its key."""
    run_dir = Path(tempfile.mkdtemp(prefix="aios-secret-", dir=parent))
    os.chmod(run_dir, 0o700)
    key = run_dir / "key"
    secret = os.urandom(16).hex().encode()
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, secret)
    os.close(fd)
    return run_dir, key, secret


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[tuple[Path, Path, bytes]]]:
    # one under /tmp (where test kernels put their run directory) and one outside it
    placed = [place_secret(tmp_path_factory.mktemp("run")), place_secret(Path("/var/tmp"))]
    try:
        yield placed
    finally:
        for run_dir, _, _ in placed:
            shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module", params=STRATEGIES)
def rt(request: pytest.FixtureRequest, secrets: list[tuple[Path, Path, bytes]]) -> Iterator[ToolRuntime]:
    runtime = ToolRuntime([], {"sandbox_strategy": request.param,
                               "hide_paths": [str(run_dir) for run_dir, _, _ in secrets]})
    try:
        yield runtime
    finally:
        runtime.close()


def run_snippet(rt: ToolRuntime, code: str, **extra: object) -> dict:
    result = rt.call("python", {"code": textwrap.dedent(code), **extra}, agent="sandbox-test")
    assert result["exit_code"] == 0, result
    return result


def test_isolation_is_complete_and_reported(rt: ToolRuntime) -> None:
    iso = rt.isolation
    assert iso.net and iso.fs and iso.pid and iso.drop, iso
    assert rt.isolation.summary(64).startswith("tool isolation: network namespace (no network)")
    assert "no network" in rt.describe("python").isolation
    result = run_snippet(rt, "print('hi')")
    assert result["sandbox"].startswith("no network, read-only filesystem with private /tmp, own pid namespace")


def test_snippet_cannot_read_a_secret_placed_like_the_key(rt: ToolRuntime,
                                                          secrets: list[tuple[Path, Path, bytes]]) -> None:
    manager_pid = os.getpid()
    paths = []
    for run_dir, key, _ in secrets:
        paths += [str(key), f"/proc/{manager_pid}/root{key}", f"/proc/1/root{key}"]
    code = f"""
        import json, os
        out = {{}}
        for path in {paths!r}:
            try:
                with open(path, "rb") as f:
                    out[path] = "READ " + f.read().decode(errors="replace")
            except OSError as exc:
                out[path] = "denied: " + (exc.strerror or type(exc).__name__)
        for d in {[str(r) for r, _, _ in secrets]!r}:
            try:
                out[d] = "LISTED " + ",".join(os.listdir(d))
            except OSError as exc:
                out[d] = "denied: " + (exc.strerror or type(exc).__name__)
        print(json.dumps(out))
    """
    result = run_snippet(rt, code)
    attempts = json.loads(result["stdout"])
    for _, _, secret in secrets:
        assert secret.decode() not in result["stdout"] + result["stderr"]
    for path, outcome in attempts.items():
        assert outcome.startswith("denied") or outcome == "LISTED ", (path, outcome)
    for _, key, secret in secrets:
        assert key.read_bytes() == secret  # still there on the host


def test_snippet_cannot_write_outside_its_directory(rt: ToolRuntime, secrets: list[tuple[Path, Path, bytes]]) -> None:
    tag = uuid.uuid4().hex
    targets = [f"/tmp/aios-escape-{tag}", f"/dev/shm/aios-escape-{tag}", f"/var/tmp/aios-escape-{tag}", str(REPO / f"aios-escape-{tag}"),
               str(Path.home() / f"aios-escape-{tag}"), f"/etc/aios-escape-{tag}"]
    targets += [str(run_dir / f"escape-{tag}") for run_dir, _, _ in secrets]
    targets += [str(key) for _, key, _ in secrets]  # overwrite the key itself
    code = f"""
        import json, os
        out = {{}}
        for path in {targets!r}:
            try:
                with open(path, "w") as f:
                    f.write("escaped")
                out[path] = "wrote (inside the sandbox's view only?)"
            except OSError as exc:
                out[path] = "denied: " + (exc.strerror or type(exc).__name__)
        with open("mine.txt", "w") as f:  # its own directory is writable
            f.write("ok")
        out["cwd"] = os.getcwd()
        out["own"] = open("mine.txt").read()
        print(json.dumps(out))
    """
    result = run_snippet(rt, code)
    out = json.loads(result["stdout"])
    assert out["own"] == "ok"
    for path in targets:
        if path.endswith("/key"):
            continue
        assert not os.path.exists(path), f"{path} was created on the host: {out[path]}"
    for _, key, secret in secrets:
        assert key.read_bytes() == secret
    for path in targets:
        if not path.startswith(("/tmp/", "/dev/shm/")):  # private to the sandbox inside
            assert out[path].startswith("denied"), (path, out[path])


def test_snippet_cannot_connect_to_a_listener_on_localhost(rt: ToolRuntime) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        code = f"""
            import socket
            for host in ("127.0.0.1", "localhost"):
                s = socket.socket()
                s.settimeout(3)
                try:
                    s.connect((host, {port}))
                    print(host, "CONNECTED")
                except OSError as exc:
                    print(host, "refused:", exc)
        """
        result = run_snippet(rt, code)
        assert "CONNECTED" not in result["stdout"]
        assert result["stdout"].count("refused") == 2
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever reached the listener
    finally:
        listener.close()


def test_snippet_timeout_and_memory_limit_give_clear_results(rt: ToolRuntime) -> None:
    spin = rt.call("python", {"code": "while True: pass", "timeout_s": 1}, agent="limits")
    assert spin["timed_out"] and "longer than 1 s" in spin["error"]
    hog = rt.call("python", {"code": "x = bytearray(4 * 1024 ** 3)"}, agent="limits")
    assert hog["exit_code"] == 1 and "MemoryError" in hog["stderr"] and "out of memory" in hog["error"]
    assert run_snippet(rt, "print(6 * 7)")["stdout"] == "42\n"


def test_snippet_output_stdin_and_exit_code(rt: ToolRuntime) -> None:
    result = rt.call("python", {"code": "import sys; data = sys.stdin.read(); print(data.upper()); "
                                        "print('oops', file=sys.stderr); sys.exit(5)", "stdin": "hello"},
                     agent="io")
    assert (result["exit_code"], result["stdout"], result["stderr"]) == (5, "HELLO\n", "oops\n")
    big = run_snippet(rt, "print('x' * 1_000_000)")
    assert big["stdout_truncated"] and len(big["stdout"]) == 64 * 1024


def processes_with(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line carries `marker`."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if marker in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p.pid)
    return found


def leave_behind(marker: str, hold_stdout: bool) -> str:
    """A snippet that starts processes meant to outlive it: one in its own session (as a daemon would),
    one that double-forks, and, with hold_stdout, one that keeps the snippet's stdout open."""
    sleeper = f'[sys.executable, "-c", "import os, time; os.fork(); time.sleep(300)", "{marker}"]'
    held = f"subprocess.Popen({sleeper})" if hold_stdout else ""
    return textwrap.dedent(f"""
        import subprocess, sys
        subprocess.Popen({sleeper}, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        {held}
        print("started")
    """)


@pytest.mark.parametrize("hold_stdout", [False, True])
def test_no_process_of_a_call_is_left_once_the_reply_has_arrived(rt: ToolRuntime, hold_stdout: bool) -> None:
    """Issue 17: a background child holding stdout made an exiting snippet report timed_out after 10 s,
    and one writing to /dev/null outlived the call by up to 27 s."""
    marker = f"aios-orphan-{uuid.uuid4().hex}"
    result = rt.call("python", {"code": leave_behind(marker, hold_stdout), "timeout_s": 20}, agent="orphans")
    assert processes_with(marker) == []  # at once: the reply came after the call's processes ended
    assert (result["exit_code"], result["stdout"], result["timed_out"]) == (0, "started\n", False), result
    assert "error" not in result


def test_without_a_pid_namespace_the_manager_ends_what_the_worker_cannot_see() -> None:
    """Where the sandbox has a mount namespace (so /proc is hidden) but no pid namespace, the worker cannot
    find the call's processes; the manager ends its tree from outside, before the reply."""
    with ToolRuntime([], {}) as runtime:
        runtime.isolation.pid = False  # the isolation this machine would give without pid namespaces
        marker = f"aios-orphan-{uuid.uuid4().hex}"
        result = runtime.call("python", {"code": leave_behind(marker, True)}, agent="nopid")
        assert processes_with(marker) == []
        assert result["sandbox"].startswith("no network, read-only filesystem with private /tmp, shared pid")
        assert (result["exit_code"], result["timed_out"]) == (0, False)


def test_sandbox_off_is_reported_as_reduced() -> None:
    with ToolRuntime([], {"sandbox": "off"}) as runtime:
        assert "OFF" in runtime.isolation.summary(64)
        result = runtime.call("python", {"code": "print(1)"}, agent="off")
        assert result["stdout"] == "1\n" and result["sandbox"].startswith("REDUCED")
        marker = f"aios-orphan-{uuid.uuid4().hex}"  # rlimits only: the worker, a subreaper, ends them itself
        assert runtime.call("python", {"code": leave_behind(marker, True)}, agent="off")["timed_out"] is False
        assert processes_with(marker) == []
