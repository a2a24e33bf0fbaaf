"""The tool worker: one subprocess that loads one tool and runs its calls.

Stdlib-only and started as `python -I worker.py serve <manager pid>`, so a
worker imports nothing from AIOS or its dependencies (measured: 18 MB of
address space and about 30 ms to start, see jail.py) and the tool manager's
own state never reaches it.

Wire protocol (also imported by the manager side: `read_frame`, `write_frame`):
each message is a 4-byte big-endian length followed by that many bytes of
UTF-8 JSON. JSON rather than msgpack because tool results are meant to be JSON
anyway (they go back to an LLM as OpenAI-style tool output), and the worker
then needs no third-party import.

    manager -> worker   {"tool": {name, dir, entry}, "jail": {...} | null, "work_dir": str,
                         "max_result_bytes": int}                      (once, first)
    worker  -> manager  {"ready": true, "isolation": {...}, "load_ms": float}
                        | {"ready": false, "error": {...}}             (once)
    manager -> worker   {"args": {...}, "settings": {...}, "timeout_s": float}
    worker  -> manager  {"ok": true, "result": ..., "ms": float} | {"ok": false, "error": {...}}
                        (+ "strays": true when the call left processes the worker could not end)
    ... more calls on a warm worker; EOF on stdin ends it.

A call's processes end with the call: before each reply the worker ends every
process the call left behind (proctree.end_call_processes: it is pid 1 of its
pid namespace, or a child subreaper), so no process of a call outlives its reply.

The frames travel on private copies of the original stdin/stdout (close-on-exec,
so a tool's own subprocesses never inherit them); fd 0 becomes /dev/null and
fd 1 is pointed at stderr, so a tool that prints cannot corrupt the protocol.
"""
from __future__ import annotations

import fcntl
import importlib.util
import inspect
import json
import os
import struct
import sys
import time
import traceback
from typing import Any

_HEADER = struct.Struct(">I")
#: frames from the manager (arguments, settings) are small; this only stops garbage
MAX_REQUEST_BYTES = 64 * 1024 * 1024


class FrameError(Exception):
    """The other side sent something that is not a frame, or went away mid-frame."""


def encode_frame(obj: Any) -> bytes:
    data = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    return _HEADER.pack(len(data)) + data


def decode_frame(data: bytes) -> Any:
    """The frame at the start of `data` (a whole output read at once, as the isolation probe's)."""
    (length,) = _HEADER.unpack_from(data)
    return json.loads(data[_HEADER.size:_HEADER.size + length])


def write_frame(fd: int, obj: Any) -> None:
    write_bytes(fd, encode_frame(obj))


def write_bytes(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, max_bytes: int = MAX_REQUEST_BYTES) -> Any:
    """Blocking read of one frame (the worker side). EOFError at a clean end of stream."""
    (length,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    if length > max_bytes:
        raise FrameError(f"frame of {length} bytes exceeds the limit of {max_bytes}")
    try:
        return json.loads(_read_exact(fd, length))
    except EOFError:
        raise FrameError("stream ended inside a frame") from None
    except ValueError as exc:
        raise FrameError(f"frame is not JSON: {exc}") from None


class ToolContext:
    """What a tool's `run(args, ctx)` may use. Tools that take one parameter get none."""

    def __init__(self, name: str, tool_dir: str, work_dir: str, isolation: dict[str, Any]) -> None:
        self.name = name
        self.tool_dir = tool_dir
        self.work_dir = work_dir
        self.isolation = isolation
        self.settings: dict[str, Any] = {}
        self.deadline: float | None = None

    def remaining(self) -> float | None:
        """Seconds left before the manager kills this call (None: no limit)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


def load_entry(name: str, tool_dir: str, entry: str) -> Any:
    """Import `<tool_dir>/<module>.py` and return its `function` (entry is 'module:function')."""
    module_name, _, func_name = entry.partition(":")
    path = os.path.join(tool_dir, *module_name.split(".")) + ".py"
    if tool_dir not in sys.path:
        sys.path.insert(0, tool_dir)  # so a tool can import its own helper modules
    spec = importlib.util.spec_from_file_location(f"aios_tool_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    func = getattr(module, func_name or "run", None)
    if not callable(func):
        raise ImportError(f"{path} has no function {func_name or 'run'!r}")
    return func


def takes_context(func: Any) -> bool:
    try:
        params = [p for p in inspect.signature(func).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2


def describe_exception(exc: BaseException) -> dict[str, Any]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    err: dict[str, Any] = {
        "kind": "memory" if isinstance(exc, MemoryError) else "raised",
        "type": type(exc).__name__,
        "message": str(exc)[:2000],
        "traceback": tb[-3000:],
    }
    code = getattr(exc, "aios_code", None)
    if isinstance(code, str):
        err["code"] = code
    return err


def cpu_seconds() -> float:
    """CPU time this worker (and its waited-for children) used so far: the manager retires a warm
    worker well before its RLIMIT_CPU, which counts the whole life of the process."""
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def encode_result(result: Any, ms: float, max_bytes: int) -> bytes:
    try:
        frame = encode_frame({"ok": True, "result": result, "ms": ms, "cpu_s": cpu_seconds()})
    except (TypeError, ValueError) as exc:
        return encode_frame({"ok": False, "error": {
            "kind": "bad_result", "type": type(exc).__name__,
            "message": f"the tool returned something that is not JSON data: {exc}"}})
    if len(frame) > max_bytes:
        return encode_frame({"ok": False, "error": {
            "kind": "too_large", "type": "ResultTooLarge", "size": len(frame),
            "message": f"result of {len(frame)} bytes exceeds the limit of {max_bytes} bytes"}})
    return frame


def _private_fds() -> tuple[int, int]:
    """Move the protocol to private close-on-exec fds; fd 0 <- /dev/null, fd 1 -> stderr."""
    fd_in = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 10)
    fd_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 10)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return fd_in, fd_out


def _load_sibling(name: str) -> Any:
    """A stdlib-only module of this folder (jail.py, proctree.py), loaded by path: no AIOS import."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_aios_tool_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_jail() -> Any:
    return _load_sibling("jail")


def _with_strays(frame: bytes) -> bytes:
    """Flag a reply: the call left processes this worker cannot see, for the manager to end."""
    reply = json.loads(frame[_HEADER.size:])
    reply["strays"] = True
    return encode_frame(reply)


def _confine(jail: Any, spec: dict[str, Any], manager_pid: int) -> dict[str, Any]:
    jail.set_parent_death_signal(9)
    if manager_pid and os.getppid() != manager_pid:
        os._exit(70)  # the manager died before the death signal was armed
    if spec.get("jail"):
        return jail.enter(spec["jail"])
    return {"net": False, "fs": False, "pid": False, "user": "unchanged", "rlimits": jail.apply_rlimits(spec.get("rlimits") or {})}


def serve(manager_pid: int) -> int:
    fd_in, fd_out = _private_fds()
    try:
        spec = read_frame(fd_in)
    except (EOFError, FrameError):
        return 2
    jail = _load_jail()
    try:
        isolation = _confine(jail, spec, manager_pid)
    except jail.JailError as exc:
        write_frame(fd_out, {"ready": False, "error": {"kind": "jail", "type": "JailError", "step": exc.step,
                                                       "message": str(exc)}})
        return 3
    tree = _load_sibling("proctree")
    tree.become_subreaper()
    tool = spec["tool"]
    work_dir = "/tmp" if isolation.get("fs") else spec.get("work_dir") or os.getcwd()
    os.chdir(work_dir)
    os.environ.update({"HOME": work_dir, "TMPDIR": work_dir})
    max_result = int(spec.get("max_result_bytes", 1 << 20))
    t0 = time.perf_counter()
    try:
        func = load_entry(tool["name"], tool["dir"], tool["entry"])
    except BaseException as exc:  # noqa: BLE001 - a broken tool is reported, whatever it raised
        err = describe_exception(exc)
        err["kind"] = "memory" if err["kind"] == "memory" else "load"
        write_frame(fd_out, {"ready": False, "error": err})
        return 4
    ctx = ToolContext(tool["name"], tool["dir"], work_dir, isolation)
    with_ctx = takes_context(func)
    write_frame(fd_out, {"ready": True, "isolation": isolation, "load_ms": (time.perf_counter() - t0) * 1000})
    while True:
        try:
            call = read_frame(fd_in)
        except EOFError:
            return 0
        except FrameError as exc:
            write_frame(fd_out, {"ok": False, "error": {"kind": "protocol", "type": "FrameError", "message": str(exc)}})
            return 5
        ctx.settings = call.get("settings") or {}
        timeout = call.get("timeout_s")
        ctx.deadline = time.monotonic() + timeout if timeout else None
        t0 = time.perf_counter()
        try:
            result = func(call.get("args") or {}, ctx) if with_ctx else func(call.get("args") or {})
            frame = encode_result(result, (time.perf_counter() - t0) * 1000, max_result)
        except MemoryError as exc:
            result = None  # release what we can before building the reply
            frame = encode_frame({"ok": False, "error": describe_exception(exc)})
        except BaseException as exc:  # noqa: BLE001 - SystemExit from a tool is an error too
            frame = encode_frame({"ok": False, "error": describe_exception(exc), "cpu_s": cpu_seconds()})
        if tree.end_call_processes() == "unreachable":
            frame = _with_strays(frame)
        write_bytes(fd_out, frame)


def probe() -> int:
    """Try a jail spec (read as one frame) and report what held: used at start to detect isolation."""
    fd_in, fd_out = _private_fds()
    spec = read_frame(fd_in)
    jail = _load_jail()
    try:
        report = jail.enter(spec)
    except jail.JailError as exc:
        write_frame(fd_out, {"ok": False, "step": exc.step, "message": str(exc)})
        return 0
    # check the properties themselves, not just that the calls returned
    checks: dict[str, Any] = {}
    if report.get("net"):
        import socket
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", 9))
            checks["loopback_reachable"] = True
        except OSError:
            checks["loopback_reachable"] = False
        finally:
            s.close()
    if report.get("fs"):
        try:
            with open("/tmp/.probe", "w") as f:
                f.write("x")
            checks["scratch_writable"] = True
        except OSError:
            checks["scratch_writable"] = False
    report["checks"] = checks
    write_frame(fd_out, {"ok": True, "report": report, "uid": os.getuid()})
    return 0


def exec_confined(spec_json: str, argv: list[str]) -> int:
    """Confine this process as `spec_json` says, then exec `argv` (used for MCP servers)."""
    spec = json.loads(spec_json)
    jail = _load_jail()
    jail.set_parent_death_signal(9)
    manager_pid = int(spec.get("manager_pid") or 0)
    if manager_pid and os.getppid() != manager_pid:
        return 70
    try:
        if spec.get("jail"):
            jail.enter(spec["jail"])
        else:
            jail.apply_rlimits(spec.get("rlimits") or {})
    except jail.JailError as exc:
        print(f"aios: cannot confine the MCP server: {exc}", file=sys.stderr)
        return 3
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"aios: cannot start {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127


def main(argv: list[str]) -> int:
    mode = argv[1] if len(argv) > 1 else "serve"
    if mode == "serve":
        return serve(int(argv[2]) if len(argv) > 2 else 0)
    if mode == "probe":
        return probe()
    if mode == "exec":
        sep = argv.index("--")
        return exec_confined(argv[2], argv[sep + 1:])
    print(f"usage: worker.py serve|probe|exec; got {mode!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
