"""Helpers shared by the `aios bench ...` commands.

- `temporary_kernel(config)`: a real kernel (supervisor, scheduler, managers)
  in a short temporary run directory under /tmp, started with `aios-start
  --detach` semantics and stopped with `aios stop` semantics afterwards.
- `run_closed_loop(make_caller, clients, calls, warmup)`: N forked client
  processes making back-to-back calls, started together behind a barrier;
  returns a `LoadResult` (per-call latencies, wall and CPU time).
- `summarize(latencies_ns)`: count, mean, p50, p90, p99, max in microseconds.
- `Progress`: one progress line on stderr (rewritten in place on a terminal).

Nothing here creates a ZeroMQ context, so benchmark code may fork worker
processes after using it.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from aios.rundir import RunDir


class TemporaryKernelError(RuntimeError):
    """The temporary kernel did not come up; the message carries the supervisor's reason and log tail."""



# ------------------------------------------------------------------ kernel
@contextlib.contextmanager
def temporary_kernel(config: str | Mapping[str, Any] | None = None, policy: str | None = None, *,
                     prefix: str = "aios-bench-", keep: bool = False) -> Iterator[RunDir]:
    """Start a kernel in a fresh temporary run directory; stop it and remove the directory on exit.

    `config` is TOML text, or a mapping (e.g. `{"llm": []}` for a kernel with no
    LLM core, or `{"llm": [{"name": "llm-0", "backend": "sim"}], "scheduler":
    {"time_slice_tokens": 16}}`); None means the built-in defaults. `policy`
    overrides `[scheduler] policy`. Yields the RunDir; connect with
    `aios.sdk.connect(run_dir)`. Raises TemporaryKernelError when the kernel does
    not become ready. `keep=True` leaves the directory (logs) behind.
    """
    from aios import kernel

    # Short path under /tmp: ipc socket paths must stay under ~107 bytes.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp" if Path("/tmp").is_dir() else None))
    run_dir = RunDir(path / "run")
    if isinstance(config, str):
        config_file = path / "config.toml"
        config_file.write_text(config)
        config = str(config_file)
    try:
        try:
            kernel.start(run_dir, config, policy=policy)
        except (kernel.KernelStartError, kernel.ConfigError) as exc:
            raise TemporaryKernelError(f"the temporary kernel in {run_dir.path} did not start: {exc}\n"
                                   f"{_log_tail(run_dir)}") from None
        yield run_dir
    finally:
        # Stop even if start failed half-way or was interrupted: the supervisor may have left children behind.
        kernel.stop(run_dir, timeout=15.0)
        if not keep:  # a failed start already put the log tail into its exception
            shutil.rmtree(path, ignore_errors=True)


def _log_tail(run_dir: RunDir, lines: int = 20) -> str:
    out = []
    for log in sorted(run_dir.log_dir.glob("*.log")) if run_dir.log_dir.exists() else []:
        text = log.read_text(errors="replace").splitlines()[-lines:]
        if text:
            out.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(out)


# ------------------------------------------------------------- statistics
def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (like numpy's default) of an already sorted sequence."""
    n = len(sorted_values)
    if n == 0:
        return float("nan")
    if n == 1:
        return float(sorted_values[0])
    pos = (n - 1) * p / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(sorted_values[lo]) * (1 - frac) + float(sorted_values[hi]) * frac


def summarize(latencies_ns: Sequence[int]) -> dict[str, float]:
    """count, mean/p50/p90/p99/max in microseconds."""
    values = sorted(latencies_ns)
    if not values:
        return {"count": 0, "mean_us": float("nan"), "p50_us": float("nan"), "p90_us": float("nan"),
                "p99_us": float("nan"), "max_us": float("nan")}
    return {
        "count": len(values),
        "mean_us": sum(values) / len(values) / 1000.0,
        "p50_us": percentile(values, 50) / 1000.0,
        "p90_us": percentile(values, 90) / 1000.0,
        "p99_us": percentile(values, 99) / 1000.0,
        "max_us": values[-1] / 1000.0,
    }


# ---------------------------------------------------------------- progress
class Progress:
    """A progress line on stderr: rewritten in place on a terminal, throttled lines otherwise."""

    def __init__(self, prefix: str = "[bench]", enabled: bool = True, every_s: float | None = None) -> None:
        self.prefix = prefix
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.every_s = every_s if every_s is not None else (0.25 if self.tty else 2.0)
        self._last = 0.0
        self._width = 0

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        line = f"{self.prefix} {text}"
        if self.tty:
            pad = max(self._width - len(line), 0)
            sys.stderr.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self, text: str | None = None) -> None:
        if not self.enabled:
            return
        if text is not None:
            self.update(text, force=True)
        if self.tty and self._width:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self._width = 0


# ------------------------------------------------------- closed-loop clients
class LoadResult:
    """What `run_closed_loop` measured: per-call latencies (ns) and the timed phase's wall time."""

    def __init__(self, clients: int, latencies_ns: list[int], wall_s: float, errors: list[str],
                 cpu_s: float = 0.0) -> None:
        self.clients = clients
        self.latencies_ns = latencies_ns
        self.wall_s = wall_s
        self.errors = errors
        self.cpu_s = cpu_s  # CPU time (all threads) the clients spent in the timed phase, summed

    @property
    def cpu_us_per_call(self) -> float:
        return self.cpu_s / self.calls * 1e6 if self.calls else float("nan")

    @property
    def calls(self) -> int:
        return len(self.latencies_ns)

    @property
    def throughput(self) -> float:
        return self.calls / self.wall_s if self.wall_s > 0 else 0.0

    @classmethod
    def merge(cls, results: "Sequence[LoadResult]") -> "LoadResult":
        """Pool several runs (e.g. interleaved rounds): all latencies, summed wall and CPU time."""
        return cls(max((r.clients for r in results), default=0),
                   [x for r in results for x in r.latencies_ns],
                   sum(r.wall_s for r in results),
                   [e for r in results for e in r.errors],
                   sum(r.cpu_s for r in results))

    def summary(self) -> dict[str, float]:
        out = summarize(self.latencies_ns)
        out["throughput"] = self.throughput
        out["wall_s"] = self.wall_s
        out["client_cpu_us_per_call"] = self.cpu_us_per_call
        return out


def run_closed_loop(make_caller: Any, clients: int, calls: int, warmup: int, *, label: str = "",
                    progress: Progress | None = None, timeout_s: float = 300.0) -> LoadResult:
    """Run `clients` processes, each making `warmup` untimed then `calls` timed back-to-back calls.

    `make_caller(index)` runs inside the child and returns `(call, close)`:
    `call()` makes one round trip, `close()` releases its resources. Children
    are forked (the function need not be picklable), so the calling process
    must not own a ZeroMQ context yet. All children start their timed phase
    together behind a barrier; the wall time runs from the first child's start
    to the last child's end.
    """
    import multiprocessing as mp
    import queue as queue_mod
    from array import array

    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(clients)
    results: Any = ctx.Queue()
    done = ctx.RawArray("q", clients)
    procs = [ctx.Process(target=_client_main, name=f"bench-client-{i}", daemon=True,
                         args=(i, make_caller, calls, warmup, barrier, results, done))
             for i in range(clients)]
    for p in procs:
        p.start()
    got: dict[int, tuple[int, int, int, bytes]] = {}
    errors: list[str] = []
    finished: set[int] = set()
    deadline = time.monotonic() + timeout_s
    total = clients * calls
    def take(item: tuple[str, int, Any]) -> None:
        kind, index, payload = item
        finished.add(index)
        if kind == "ok":
            got[index] = payload
        else:
            errors.append(f"client {index}: {payload}")
            barrier.abort()

    try:
        while len(finished) < clients:
            try:
                take(results.get(timeout=0.2))
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if i not in finished and p.exitcode is not None]
                if dead:
                    # a child flushes its result before it exits: read what is there, then judge
                    with contextlib.suppress(queue_mod.Empty):
                        while True:
                            take(results.get(timeout=0.05))
                    for i in dead:
                        if i not in finished:
                            finished.add(i)
                            errors.append(f"client {i} exited with code {procs[i].exitcode} without a result")
                            barrier.abort()
                if time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout_s:.0f}s")
                    barrier.abort()
                    break
            if progress is not None:
                progress.update(f"{label}: {sum(done)}/{total} calls")
    finally:
        # normally all have reported and are exiting; after an error or Ctrl-C give them 5 s in all
        stop_by = time.monotonic() + 5.0
        for p in procs:
            p.join(timeout=max(0.0, stop_by - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
    latencies: list[int] = []
    starts, ends = [], []
    cpu_ns = 0
    for t0, t1, cpu, raw in got.values():
        cpu_ns += cpu
        lat = array("q")
        lat.frombytes(raw)
        latencies.extend(lat)
        starts.append(t0)
        ends.append(t1)
    wall_s = (max(ends) - min(starts)) / 1e9 if got else 0.0
    if progress is not None:
        progress.update(f"{label}: {len(latencies)}/{total} calls", force=True)
    return LoadResult(clients, latencies, wall_s, errors, cpu_ns / 1e9)


def _client_main(index: int, make_caller: Any, calls: int, warmup: int, barrier: Any, results: Any,
                 done: Any) -> None:
    import threading
    from array import array
    from time import monotonic_ns, perf_counter_ns, process_time_ns

    close = None
    try:
        call, close = make_caller(index)
        for _ in range(warmup):
            call()
        barrier.wait(timeout=120)
        lat = array("q", bytes(8 * calls))
        t_start = monotonic_ns()
        c_start = process_time_ns()
        for i in range(calls):
            t0 = perf_counter_ns()
            call()
            lat[i] = perf_counter_ns() - t0
            if not i & 31:
                done[index] = i
        t_end = monotonic_ns()
        c_end = process_time_ns()
        done[index] = calls
        results.put(("ok", index, (t_start, t_end, c_end - c_start, lat.tobytes())))
    except threading.BrokenBarrierError:
        results.put(("err", index, "another client failed; stopped"))
    except BaseException as exc:  # report anything, including KeyboardInterrupt, to the parent
        try:
            barrier.abort()
        except Exception:
            pass
        results.put(("err", index, f"{type(exc).__name__}: {exc}"))
    finally:
        if close is not None:
            try:
                close()
            except Exception:
                pass
        results.close()
        results.join_thread()
