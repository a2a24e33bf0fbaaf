"""What confinement tool workers get: detected once at start, then planned per tool.

The tool manager runs a probe worker (worker.py) that tries the strongest
confinement first and checks the properties themselves (loopback unreachable,
scratch writable), stepping down until one holds, and says so in one log line
(`Isolation.summary`).  `JailPlanner` turns the result into the jail spec each
worker applies to itself (jail.py): namespaces, masked paths, rlimits.
"""
from __future__ import annotations

import os
import signal
import site
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aios.managers.tools import worker as wire
from aios.managers.tools.registry import RegisteredTool

WORKER_SCRIPT = Path(wire.__file__).resolve()
WORKER_DIR = WORKER_SCRIPT.parent


@dataclass
class Isolation:
    """What confinement this machine gives tool workers (detected once at start)."""

    mode: Literal["auto", "require", "off"]
    strategy: Literal["root", "userns", "none"]
    net: bool = False
    fs: bool = False
    pid: bool = False
    drop: bool = False
    user: str = "unchanged"
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.net and self.fs and self.pid and self.drop

    def summary(self, scratch_mb: int) -> str:
        if self.mode == "off":
            return "tool isolation OFF (config sandbox = 'off'): workers run with rlimits only, with the " \
                   "kernel's network, files and privileges"
        parts = ["network namespace (no network)" if self.net else "NO network namespace: tools can reach the network",
                 f"read-only filesystem, private {scratch_mb} MB /tmp, run directory and home hidden" if self.fs
                 else "NO mount namespace: tools see and can write the kernel's files",
                 "pid namespace" if self.pid else "no pid namespace",
                 f"runs as {self.user}" if self.drop else "privileges NOT dropped",
                 "rlimits AS/CPU/NPROC/FSIZE"]
        head = "tool isolation: " if self.complete else "tool isolation REDUCED: "
        tail = f" ({'; '.join(self.problems)})" if self.problems else ""
        return head + ", ".join(parts) + tail

    def for_tool(self, spec: RegisteredTool) -> str:
        if spec.kind == "builtin":
            return "none: runs inside the tool manager (allowed for shipped tools only)"
        if spec.kind == "mcp":
            jailed = not spec.network and self.mode != "off" and (self.net or self.fs)
            memory = f", memory {spec.memory_mb} MB" if spec.memory_mb else ""
            where = "in the tool sandbox" if jailed else "with the kernel user's rights"
            return f"MCP server process {where}{memory}, timeout {spec.timeout_s:g} s"
        if self.mode == "off":
            return f"rlimits only (sandbox = 'off'), memory {spec.memory_mb} MB, timeout {spec.timeout_s:g} s"
        bits = []
        if spec.network:
            bits.append("host network (manifest network = true)")
        elif self.net:
            bits.append("no network")
        bits.append("read-only fs + private /tmp" if self.fs else "host filesystem")
        if self.pid:
            bits.append("pid namespace")
        if self.drop:
            bits.append(self.user)
        bits.append(f"memory {spec.memory_mb} MB, timeout {spec.timeout_s:g} s")
        return ", ".join(bits)


def keep_paths(extra: list[Path] = ()) -> list[str]:
    """Directories a confined worker must still see: the Python installation and our code."""
    paths = {sys.base_prefix, sys.prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
             str(WORKER_DIR)}
    for p in site.getsitepackages() + [p for p in sys.path if p and p.endswith("-packages")]:
        paths.add(p)
    paths.update(str(p) for p in extra)
    return sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)})


def untraversable_ancestors(paths: list[str]) -> list[str]:
    """The outermost directory on each path that 'other' users (nobody) cannot enter."""
    found = set()
    for p in paths:
        parts = Path(p).parts
        for i in range(2, len(parts) + 1):
            ancestor = str(Path(*parts[:i]))
            try:
                if not os.stat(ancestor).st_mode & 0o001:
                    found.add(ancestor)
                    break
            except OSError:
                break
    return sorted(found)


class JailPlanner:
    """Builds the jail spec (worker.py/jail.py) for a tool from the detected isolation and options."""

    def __init__(self, isolation: Isolation, hide_paths: list[str], scratch_mb: int, nproc: int) -> None:
        self.isolation = isolation
        self.hide_paths = [os.path.realpath(p) for p in hide_paths]
        self.scratch_mb = scratch_mb
        self.nproc = nproc

    def masks(self, keep: list[str]) -> list[str]:
        masks = set(self.hide_paths)
        home = os.path.realpath(os.path.expanduser("~"))
        if home != "/":
            masks.add(home)
        if self.isolation.strategy == "root" and self.isolation.drop:
            masks.update(untraversable_ancestors(keep))
        return sorted(masks)

    def spec(self, tool: RegisteredTool | None, cpu_s: int, memory_mb: int | None,
             network: bool = False) -> dict[str, Any] | None:
        iso = self.isolation
        if iso.mode == "off" or iso.strategy == "none" or not (iso.net or iso.fs or iso.pid):
            return None
        keep = keep_paths([tool.folder] if tool is not None and tool.folder else [])
        return {
            "strategy": iso.strategy, "net": iso.net and not network, "fs": iso.fs, "pid": iso.pid,
            "drop": iso.drop, "masks": self.masks(keep) if iso.fs else [], "keep": keep,
            "scratch_mb": self.scratch_mb, "memory_mb": memory_mb, "cpu_s": cpu_s,
            "nproc": self.nproc, "fsize_mb": self.scratch_mb,
        }


def _run_probe(spec: dict[str, Any], timeout: float = 20.0) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, "-I", str(WORKER_SCRIPT), "probe"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, env=worker_env())
    try:
        out, err = proc.communicate(wire.encode_frame(spec), timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        proc.communicate()
        return {"ok": False, "step": "probe", "message": f"probe did not answer within {timeout:g} s"}
    if len(out) < 4:
        return {"ok": False, "step": "probe", "message": f"probe exited {proc.returncode}: {err.decode(errors='replace')[-300:]}"}
    return wire.decode_frame(out)


def detect_isolation(mode: Literal["auto", "require", "off"], hide_paths: list[str], scratch_mb: int,
                     nproc: int, strategy: Literal["auto", "root", "userns"] = "auto") -> Isolation:
    """Try the strongest confinement first and step down; each try is a real worker that checks itself.

    strategy: "root" (namespaces, then setuid nobody) when the kernel runs as root, else
    "userns" (a user namespace, then every capability dropped); "auto" picks by euid.
    """
    if mode == "off":
        return Isolation(mode=mode, strategy="none")
    if not sys.platform.startswith("linux"):
        return Isolation(mode=mode, strategy="none", problems=["not Linux: rlimits only"])
    if strategy == "auto":
        strategy = "root" if os.geteuid() == 0 else "userns"
    elif strategy == "root" and os.geteuid() != 0:
        return Isolation(mode=mode, strategy="none", problems=["sandbox_strategy 'root' needs the kernel to run as root"])
    problems: list[str] = []
    for net, fs, pid, drop in ((True, True, True, True), (True, True, False, True), (True, False, False, False)):
        iso = Isolation(mode=mode, strategy=strategy, net=net, fs=fs, pid=pid, drop=drop)
        planner = JailPlanner(iso, hide_paths, scratch_mb, nproc)
        spec = planner.spec(None, cpu_s=10, memory_mb=None)
        assert spec is not None
        reply = _run_probe(spec)
        if not reply.get("ok"):
            problems.append(f"{'+'.join(k for k, v in (('net', net), ('fs', fs), ('pid', pid)) if v)} failed at "
                            f"{reply.get('step')}: {reply.get('message')}")
            continue
        report, checks = reply["report"], reply["report"].get("checks", {})
        if net and checks.get("loopback_reachable"):
            problems.append("network namespace did not cut 127.0.0.1")
            continue
        if fs and not checks.get("scratch_writable"):
            problems.append("private /tmp was not writable")
            continue
        iso.user = report.get("user", "unchanged")
        iso.problems = problems if not iso.complete else []
        return iso
    return Isolation(mode=mode, strategy="none", problems=problems)


def worker_env() -> dict[str, str]:
    """A small, fixed environment: nothing of the kernel's (keys, tokens, proxies) leaks to tools."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL to a worker's whole process group (it runs in its own session); gone already is fine."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
