"""Confine a tool worker process: namespaces, a read-only view of the machine, rlimits.

This module is stdlib-only on purpose: the worker (worker.py) loads it by file
path before anything else, inside a fresh single-threaded interpreter, so no
lock held by another thread can be inherited across the fork it may do, and no
`preexec_fn` runs in the (multi-threaded) tool manager.

What `enter(spec)` does, each step only when the spec asks for it:

1. unshare(2): a network namespace (only a downed loopback: no route anywhere,
   not even to 127.0.0.1), a mount namespace, a pid namespace; as a normal user
   first a user namespace (uid 0 inside maps to the caller's uid outside), since
   the others need CAP_SYS_ADMIN.
2. Filesystem (mount namespace): propagation private; each "mask" directory
   (the run directory with the kernel key, the kernel user's home, directories
   the sandbox user cannot traverse) is covered by an empty tmpfs; the paths the
   worker needs to run (the Python installation, the tool's folder) are put back
   inside the masks as clones taken before masking; then every mount becomes
   read-only and nosuid (mount_setattr(AT_RECURSIVE), Linux >= 5.12); finally a
   private size-limited tmpfs is mounted on /tmp as the only writable place and
   the working directory (plus a small private /dev/shm for POSIX semaphores).
   open_tree/move_mount/mount_setattr are called by number (428/429/442, the
   same on x86_64 and aarch64).
3. Pid namespace: the process forks; the child is pid 1 of the namespace (when
   it dies the kernel kills everything the tool left behind, even processes that
   escaped the process group), the parent only waits and exits with the child's
   status. A fresh /proc shows only the namespace's processes, so
   /proc/<manager pid>/root cannot be used to walk around the masks.
4. Privileges: as root, setuid/setgid to nobody (65534); in a user namespace, the
   capability bounding set, effective/permitted/inheritable sets are cleared and
   the securebits locked so exec never grants capabilities back. Always
   no_new_privs and not dumpable.
5. rlimits: RLIMIT_AS (memory), RLIMIT_CPU (seconds of CPU, a backstop to the
   wall-clock timeout the manager enforces), RLIMIT_NPROC, RLIMIT_FSIZE.

Measured on the development machine (2 cores, Linux 6.18, root): RLIMIT_AS of
13 MB is enough for `python -I -c pass`, 18 MB for the worker's imports, 26 MB
with socket/ssl/urllib, 138 MB for `import numpy`.
"""
from __future__ import annotations

import ctypes
import os
import resource
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000

MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442
OPEN_TREE_CLONE = 1
AT_RECURSIVE = 0x8000
AT_FDCWD = -100
MOVE_MOUNT_F_EMPTY_PATH = 4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
# SECBIT_NOROOT | _LOCKED | SECBIT_NO_SETUID_FIXUP | _LOCKED | SECBIT_KEEP_CAPS_LOCKED
SECUREBITS_LOCKED_DOWN = 0x01 | 0x02 | 0x04 | 0x08 | 0x20
LINUX_CAPABILITY_VERSION_3 = 0x20080522

NOBODY = 65534

_libc: Any = None


class JailError(Exception):
    """A confinement step failed; `step` names it (for the startup report)."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


def libc() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, step: str, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise JailError(step, f"{what}: {os.strerror(err)} (errno {err})")
    return result


def _b(s: str | None) -> bytes | None:
    return s.encode() if s is not None else None


def _mount(step: str, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(libc().mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)),
           step, f"mount {fstype or source or ''} on {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _mount_setattr(path: str, recursive: bool, attr_set: int = 0, attr_clr: int = 0) -> None:
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    _check(libc().syscall(SYS_MOUNT_SETATTR, AT_FDCWD, _b(path), ctypes.c_uint(AT_RECURSIVE if recursive else 0),
                          ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
           "read-only filesystem", f"mount_setattr {path}")


def _open_tree(path: str) -> int:
    return _check(libc().syscall(SYS_OPEN_TREE, AT_FDCWD, _b(path), ctypes.c_uint(OPEN_TREE_CLONE | AT_RECURSIVE)),
                  "filesystem", f"open_tree {path}")


def _move_mount(fd: int, target: str) -> None:
    _check(libc().syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, _b(target), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)),
           "filesystem", f"move_mount onto {target}")


def _prctl(option: int, arg: int, step: str) -> None:
    _check(libc().prctl(option, ctypes.c_ulong(arg), 0, 0, 0), step, f"prctl({option})")


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def set_parent_death_signal(sig: int = 9) -> None:
    libc().prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


# ----------------------------------------------------------------- the steps
def _unshare(spec: dict[str, Any]) -> None:
    flags = 0
    if spec.get("net"):
        flags |= CLONE_NEWNET
    if spec.get("fs"):
        flags |= CLONE_NEWNS
    if spec.get("pid"):
        flags |= CLONE_NEWPID
    if not flags:
        return
    userns = spec.get("strategy") == "userns"
    uid, gid = os.getuid(), os.getgid()
    if userns:
        flags |= CLONE_NEWUSER
    _check(libc().unshare(flags), "namespaces", f"unshare(0x{flags:x})")
    if userns:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            try:
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
            except OSError as exc:
                raise JailError("namespaces", f"writing /proc/self/{name}: {exc.strerror}") from None


def _filesystem(spec: dict[str, Any], sandbox_uid: int, sandbox_gid: int) -> None:
    masks = sorted({os.path.abspath(m) for m in spec.get("masks", []) if os.path.lexists(m)}, key=len)
    # only the outermost of nested masks matters
    outer: list[str] = []
    for m in masks:
        if not any(_inside(m, o) for o in outer):
            outer.append(m)
    keeps = sorted({os.path.abspath(k) for k in spec.get("keep", []) if os.path.isdir(k)}, key=len)
    keep_outer: list[str] = []
    for k in keeps:
        if not any(_inside(k, o) for o in keep_outer):
            keep_outer.append(k)
    _mount("filesystem", None, "/", None, MS_REC | MS_PRIVATE)
    # clones of what must stay visible, taken before anything is covered
    in_masks = [(k, _open_tree(k)) for k in keep_outer if any(_inside(k, m) for m in outer) and not _inside(k, "/tmp")]
    in_tmp = [(k, _open_tree(k)) for k in keep_outer if _inside(k, "/tmp")]
    for m in outer:
        if _inside(m, "/tmp"):
            continue  # /tmp becomes a fresh tmpfs below: everything under it is gone anyway
        if os.path.isdir(m):
            _mount("filesystem", "tmpfs", m, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        else:
            _mount("filesystem", "/dev/null", m, None, MS_BIND)
    for k, fd in in_masks:
        os.makedirs(k, exist_ok=True)
        _move_mount(fd, k)
        os.close(fd)
    _mount_setattr("/", True, attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    scratch_mb = int(spec.get("scratch_mb", 64))
    _mount("filesystem", "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={scratch_mb}m,mode=0700,uid={sandbox_uid},gid={sandbox_gid}")
    if os.path.isdir("/dev/shm"):  # POSIX semaphores/shared memory (multiprocessing) need it writable
        _mount("filesystem", "tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={min(scratch_mb, 16)}m,mode=0700,uid={sandbox_uid},gid={sandbox_gid}")
    for k, fd in in_tmp:
        os.makedirs(k, exist_ok=True)
        _move_mount(fd, k)
        os.close(fd)
        _mount_setattr(k, True, attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    # a mask inside a kept tree was uncovered again by the clone: cover it once more
    for m in masks:
        if any(_inside(m, k) and m != k for k, _ in in_masks + in_tmp) and os.path.lexists(m):
            if os.path.isdir(m):
                _mount("filesystem", "tmpfs", m, "tmpfs", MS_NOSUID | MS_NODEV | 1, "size=4k,mode=0755")
            else:
                _mount("filesystem", "/dev/null", m, None, MS_BIND)


def _fork_into_pid_namespace() -> None:
    """Become pid 1 of the new pid namespace; the original process waits and mirrors the exit."""
    pid = os.fork()
    if pid == 0:
        set_parent_death_signal(9)
        return
    # the waiting parent keeps nothing open: the manager sees EOF when the child ends
    for fd in range(0, 1024):
        if fd != 2:
            try:
                os.close(fd)
            except OSError:
                pass
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        import signal
        signal.signal(sig, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _mount_proc(new_pid_namespace: bool) -> str:
    """Without a pid namespace a new procfs would show every process: hide /proc instead."""
    try:
        if not new_pid_namespace:
            raise JailError("proc", "no pid namespace")
        _mount("proc", "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        return "private /proc"
    except JailError:
        _mount("proc", "tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | 1, "size=4k,mode=0555")
        return "/proc hidden"


def _drop_capabilities() -> None:
    for cap in range(64):
        libc().prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the last cap: ignored
    _prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_DOWN, "privileges")

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header, data = Header(LINUX_CAPABILITY_VERSION_3, 0), (Data * 2)()
    _check(libc().capset(ctypes.byref(header), data), "privileges", "capset(all zero)")


def apply_rlimits(spec: dict[str, Any]) -> list[str]:
    applied = []
    mb = spec.get("memory_mb")
    if mb:
        resource.setrlimit(resource.RLIMIT_AS, (int(mb) << 20, int(mb) << 20))
        applied.append(f"AS={int(mb)}MB")
    cpu = spec.get("cpu_s")
    if cpu:
        resource.setrlimit(resource.RLIMIT_CPU, (int(cpu), int(cpu) + 1))
        applied.append(f"CPU={int(cpu)}s")
    nproc = spec.get("nproc")
    if nproc:
        resource.setrlimit(resource.RLIMIT_NPROC, (int(nproc), int(nproc)))
        applied.append(f"NPROC={int(nproc)}")
    fsize = spec.get("fsize_mb")
    if fsize:
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(fsize) << 20, int(fsize) << 20))
        applied.append(f"FSIZE={int(fsize)}MB")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return applied


def enter(spec: dict[str, Any]) -> dict[str, Any]:
    """Apply `spec` to this process (see the module docstring); return what is in force.

    spec keys: strategy ("root" | "userns"), net, fs, pid, drop (bools), masks, keep
    (lists of paths), scratch_mb, memory_mb, cpu_s, nproc, fsize_mb. Raises JailError
    naming the step that failed; the caller must then refuse to run the tool.
    """
    report: dict[str, Any] = {"net": False, "fs": False, "pid": False, "user": "unchanged"}
    strategy = spec.get("strategy", "root")
    drop = bool(spec.get("drop"))
    if strategy == "root" and drop:
        sandbox_uid = sandbox_gid = NOBODY
    elif strategy == "userns":
        sandbox_uid = sandbox_gid = 0  # inside the user namespace
    else:
        sandbox_uid, sandbox_gid = os.getuid(), os.getgid()
    _unshare(spec)
    report["net"] = bool(spec.get("net"))
    if spec.get("fs"):
        _filesystem(spec, sandbox_uid, sandbox_gid)
        report["fs"] = True
    if spec.get("pid"):
        _fork_into_pid_namespace()
        report["pid"] = True
    if spec.get("fs"):
        report["proc"] = _mount_proc(new_pid_namespace=bool(spec.get("pid")))
    if drop:
        if strategy == "root":
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            except OSError as exc:
                raise JailError("privileges", f"setuid(nobody): {exc.strerror}") from None
            report["user"] = "uid nobody"
        else:
            _drop_capabilities()
            report["user"] = "uid 0 of a user namespace, no capabilities"
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "privileges")
    libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    report["rlimits"] = apply_rlimits(spec)
    return report
