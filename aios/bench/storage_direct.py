"""Storage baselines: small writes, reads and searches done directly on SQLite, and the same
workload through the storage engine in process.

`run_direct(n_ops)` is the reference `aios bench storage` compares the kernel
against: one process, one plain `sqlite3` connection, the same journal mode
and synchronous setting as the storage manager, one commit per write. It does
the same logical work as a storage write: the file's current content in a
row, a kept version row (older ones pruned beyond `versions_kept`), and the
file's text in an FTS5 index; reads fetch a file's content by (agent, path);
searches are FTS5 MATCH queries ranked by bm25 with a snippet, filtered to one
agent. What it does not do (chunking, compression, quotas, path checks) is
the engine's extra work.

`run_engine(n_ops, threads=...)` runs the same operations through
`StorageEngine` (no kernel): with `threads > 1` the writes come from that many
threads at once, which is what group commit is for.

`measure_compression()` writes 100 appends to a growing text file and reports
raw bytes (all versions added up) against stored bytes.

    python -m aios.bench.storage_direct                 # direct vs engine, 1 and 16 threads
    python -m aios.bench.storage_direct --compression   # the 100-appends figure, chunk size sweep
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from aios.bench.common import summarize

WORDS = ("agent kernel scheduler memory storage process file version chunk search index query result error "
         "limit quota write read append delete rollback history compression ratio llm context tool access "
         "queue policy thread commit journal durable snapshot token model prompt answer plan step note").split()
SEARCH_WORDS = ("scheduler", "memory", "rollback", "quota", "snapshot", "journal", "policy", "token")


# ------------------------------------------------------------------ workload
def make_text(rng: random.Random, n_bytes: int) -> bytes:
    """Note-like UTF-8 text of about n_bytes: numbered lines of words."""
    out: list[str] = []
    size = 0
    while size < n_bytes:
        line = f"{rng.randrange(10**6):06d} " + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(4, 12))) + "\n"
        out.append(line)
        size += len(line)
    return "".join(out).encode()[:n_bytes]


class Workload:
    """The operations both sides run: writes cycle over agents x files, reads and searches pick at random."""

    def __init__(self, n_ops: int, *, payload_bytes: int = 200, agents: int = 4, files: int = 50,
                 seed: int = 1) -> None:
        self.n_ops = n_ops
        self.agents = [f"agent-{i}" for i in range(agents)]
        self.paths = [f"notes/{i:04d}.md" for i in range(files)]
        rng = random.Random(seed)
        self.payloads = [make_text(rng, payload_bytes) for _ in range(min(n_ops, 512))]
        self.rng = random.Random(seed + 1)

    def write(self, i: int) -> tuple[str, str, bytes]:
        return (self.agents[i % len(self.agents)], self.paths[(i // len(self.agents)) % len(self.paths)],
                self.payloads[i % len(self.payloads)])

    def written(self) -> list[tuple[str, str]]:
        """(agent, path) pairs the write phase created."""
        return sorted({self.write(i)[:2] for i in range(self.n_ops)})

    def read(self, i: int, written: list[tuple[str, str]]) -> tuple[str, str]:
        return written[self.rng.randrange(len(written))]

    def search(self, i: int) -> tuple[str, str]:
        return self.agents[i % len(self.agents)], self.rng.choice(SEARCH_WORDS)


def _summary(latencies_ns: list[int], wall_s: float) -> dict[str, Any]:
    s = summarize(latencies_ns)
    s["ops_per_s"] = round(len(latencies_ns) / wall_s, 1) if wall_s > 0 else float("nan")
    return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in s.items()}


def _timed(n: int, fn: Callable[[int], Any]) -> dict[str, Any]:
    lat: list[int] = []
    clock = time.perf_counter_ns
    start = clock()
    for i in range(n):
        t0 = clock()
        fn(i)
        lat.append(clock() - t0)
    return _summary(lat, (clock() - start) / 1e9)


# -------------------------------------------------------------------- direct
_DIRECT_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS files (id INTEGER PRIMARY KEY, agent TEXT NOT NULL, path TEXT NOT NULL, version INTEGER NOT NULL,
        data BLOB NOT NULL, modified_ns INTEGER NOT NULL, UNIQUE (agent, path))""",
    """CREATE TABLE IF NOT EXISTS versions (file_id INTEGER NOT NULL, version INTEGER NOT NULL, data BLOB NOT NULL,
        created_ns INTEGER NOT NULL, PRIMARY KEY (file_id, version)) WITHOUT ROWID""",
    "CREATE VIRTUAL TABLE IF NOT EXISTS files_fts USING fts5(agent UNINDEXED, path, body, tokenize = 'porter unicode61 remove_diacritics 2')",
)


def run_direct(n_ops: int = 2000, *, n_reads: int | None = None, n_searches: int | None = None,
               payload_bytes: int = 200, agents: int = 4, files: int = 50, synchronous: str = "NORMAL",
               journal_mode: str = "WAL", versions_kept: int = 32, path: str | Path | None = None,
               seed: int = 1, phases: tuple[str, ...] = ("write", "read", "search"), first: int = 0) -> dict[str, Any]:
    """Small writes (one commit each), reads and searches on plain SQLite in this process.

    Returns {phase: {"ops_per_s", "p50_us", "p99_us", ...}, "settings": {...}} for each of
    `phases`. A temporary database is used (and removed) unless `path` is given; a kept one can
    be continued by a later call: `first` is the index of the first write (the workload's
    writes n_ops.. follow on from writes 0..n_ops-1).
    """
    n_reads = n_ops if n_reads is None else n_reads
    n_searches = max(1, n_ops // 10) if n_searches is None else n_searches
    work = Workload(first + n_ops, payload_bytes=payload_bytes, agents=agents, files=files, seed=seed)
    tmp = None
    if path is None:
        tmp = Path(tempfile.mkdtemp(prefix="aios-direct-"))
        path = tmp / "direct.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(f"PRAGMA journal_mode = {journal_mode}")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        for sql in _DIRECT_SCHEMA:
            conn.execute(sql)

        def write(i: int) -> None:
            agent, fpath, data = work.write(i)
            now = time.time_ns()
            text = data.decode("utf-8")
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT id, version FROM files WHERE agent = ? AND path = ?", (agent, fpath)).fetchone()
            if row is None:
                file_id = conn.execute("INSERT INTO files(agent, path, version, data, modified_ns) VALUES (?, ?, 1, ?, ?)",
                                       (agent, fpath, data, now)).lastrowid
                version = 1
            else:
                file_id, version = row[0], row[1] + 1
                conn.execute("UPDATE files SET version = ?, data = ?, modified_ns = ? WHERE id = ?",
                             (version, data, now, file_id))
            conn.execute("INSERT INTO versions(file_id, version, data, created_ns) VALUES (?, ?, ?, ?)",
                         (file_id, version, data, now))
            conn.execute("DELETE FROM versions WHERE file_id = ? AND version <= ?", (file_id, version - versions_kept))
            conn.execute("DELETE FROM files_fts WHERE rowid = ?", (file_id,))
            conn.execute("INSERT INTO files_fts(rowid, agent, path, body) VALUES (?, ?, ?, ?)",
                         (file_id, agent, fpath, text))
            conn.execute("COMMIT")

        written = work.written()

        def read(i: int) -> None:
            agent, fpath = work.read(i, written)
            if conn.execute("SELECT data FROM files WHERE agent = ? AND path = ?", (agent, fpath)).fetchone() is None:
                raise RuntimeError(f"direct read: {agent}/{fpath} missing")

        def search(i: int) -> None:
            agent, word = work.search(i)
            conn.execute("SELECT path, bm25(files_fts, 0.0, 2.0, 1.0) AS r, snippet(files_fts, 2, '[', ']', '...', 16) "
                         "FROM files_fts WHERE files_fts MATCH ? AND agent = ? ORDER BY r LIMIT 10",
                         (f'{{path body}} : "{word}"', agent)).fetchall()

        run = {"write": lambda: _timed(n_ops, lambda i: write(first + i)), "read": lambda: _timed(n_reads, read),
               "search": lambda: _timed(n_searches, search)}
        result: dict[str, Any] = {phase: run[phase]() for phase in phases}
    finally:
        conn.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["settings"] = {"journal_mode": journal_mode, "synchronous": synchronous, "payload_bytes": payload_bytes,
                          "agents": agents, "files": files, "versions_kept": versions_kept,
                          "commit": "one per write", "sqlite": sqlite3.sqlite_version}
    return result


# -------------------------------------------------------------------- engine
def run_engine(n_ops: int = 2000, *, threads: int = 1, group_commit: bool = True, n_reads: int | None = None,
               n_searches: int | None = None, payload_bytes: int = 200, agents: int = 4, files: int = 50,
               synchronous: str = "NORMAL", versions_kept: int = 32, seed: int = 1) -> dict[str, Any]:
    """The run_direct workload through StorageEngine; writes (and reads) from `threads` threads at once."""
    from aios.managers.storage import MiB, StorageEngine

    n_reads = n_ops if n_reads is None else n_reads
    n_searches = max(1, n_ops // 10) if n_searches is None else n_searches
    work = Workload(n_ops, payload_bytes=payload_bytes, agents=agents, files=files, seed=seed)
    tmp = Path(tempfile.mkdtemp(prefix="aios-engine-"))
    engine = StorageEngine(tmp / "storage.sqlite3", versions_kept=versions_kept, max_file_bytes=16 * MiB,
                           max_agent_bytes=1024 * MiB, synchronous=synchronous, group_commit=group_commit)
    try:
        def write(i: int) -> None:
            agent, fpath, data = work.write(i)
            engine.write(agent, fpath, data)

        written = work.written()

        def read(i: int) -> None:
            agent, fpath = work.read(i, written)
            engine.read(agent, fpath)

        def search(i: int) -> None:
            agent, word = work.search(i)
            engine.search(agent, word)

        started = time.perf_counter()
        result = {"write": _threaded(n_ops, threads, write)}
        commits = engine.stats()["commits"]  # the writes' own transactions
        engine.flush_index()  # the writes' index changes are part of their cost (engine.py, "the index log")
        result["write"]["ops_per_s"] = round(n_ops / (time.perf_counter() - started), 1)
        result["read"] = _threaded(n_reads, threads, read)
        result["search"] = _timed(n_searches, search)
        result["write"]["writes_per_commit"] = round(n_ops / commits, 2) if commits else None
        result["integrity"] = engine.integrity_check()
    finally:
        engine.close()
        shutil.rmtree(tmp, ignore_errors=True)
    result["settings"] = {"threads": threads, "group_commit": group_commit, "synchronous": synchronous,
                          "payload_bytes": payload_bytes, "agents": agents, "files": files,
                          "versions_kept": versions_kept}
    return result


def _threaded(n: int, threads: int, fn: Callable[[int], Any]) -> dict[str, Any]:
    """Run fn(0..n-1) split over `threads` threads started together; pooled latencies, total wall time."""
    if threads <= 1:
        return _timed(n, fn)
    lats: list[list[int]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)

    def worker(t: int) -> None:
        clock = time.perf_counter_ns
        barrier.wait()
        try:
            for i in range(t, n, threads):
                t0 = clock()
                fn(i)
                lats[t].append(clock() - t0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    barrier.wait()
    start = time.perf_counter_ns()
    for th in pool:
        th.join()
    wall = (time.perf_counter_ns() - start) / 1e9
    if errors:
        raise errors[0]
    return _summary([x for lat in lats for x in lat], wall)


# --------------------------------------------------------------- compression
def measure_compression(appends: int = 100, append_bytes: int = 1000, *, chunker: Any = None,
                        versions_kept: int | None = None, seed: int = 7) -> dict[str, Any]:
    """Append `appends` times to one text file (keeping every version) and report raw vs stored bytes.

    raw_bytes: all versions' sizes added up (storing each whole); stored_bytes: chunk data +
    manifests as the engine counts them; database_growth: pages in use added to the SQLite file,
    which also holds table and index b-trees and the full-text index (with its copy of the text).
    """
    from aios.managers.storage import MiB, StorageEngine

    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="aios-compress-"))
    kept = appends if versions_kept is None else versions_kept
    engine = StorageEngine(tmp / "storage.sqlite3", versions_kept=kept, max_file_bytes=64 * MiB,
                           max_agent_bytes=1024 * MiB, chunker=chunker)
    try:
        base = _used_bytes(engine.path)
        t0 = time.perf_counter()
        for _ in range(appends):
            engine.write("bench", "log.txt", make_text(rng, append_bytes), append=True)
        elapsed = time.perf_counter() - t0
        stats = engine.stats("bench")
        growth = _used_bytes(engine.path) - base
        final = stats["current_bytes"]
        return {
            "appends": appends, "append_bytes": append_bytes, "versions_kept": kept,
            "chunker": repr(engine.chunker), "final_bytes": final, "raw_bytes": stats["raw_bytes"],
            "stored_bytes": stats["stored_bytes"], "index_bytes": stats["index_bytes"], "chunks": stats["chunks"],
            "raw_over_stored": round(stats["raw_bytes"] / stats["stored_bytes"], 1),
            "stored_over_final": round(stats["stored_bytes"] / final, 2),
            "database_growth_bytes": growth, "database_growth_over_final": round(growth / final, 2),
            "ms_per_append": round(elapsed / appends * 1000, 3),
        }
    finally:
        engine.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _used_bytes(path: Path) -> int:
    """Bytes of the database's pages in use (the free list, reusable, left out), WAL included."""
    conn = sqlite3.connect(path)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
        return pages * page_size
    finally:
        conn.close()


# ---------------------------------------------------------------------- main
def compare(n_ops: int = 2000, *, threads: int = 16, synchronous: str = "NORMAL", payload_bytes: int = 200,
            rounds: int = 3) -> dict[str, Any]:
    """Direct SQLite against the engine (1 thread; `threads` threads with and without group
    commit), in interleaved rounds so that load from elsewhere on a shared machine weighs on
    every side alike. Each figure is the median over the rounds."""
    configs: dict[str, Callable[[], dict[str, Any]]] = {
        "direct": lambda: run_direct(n_ops, synchronous=synchronous, payload_bytes=payload_bytes),
        "engine_1_thread": lambda: run_engine(n_ops, threads=1, synchronous=synchronous, payload_bytes=payload_bytes),
        f"engine_{threads}_threads_group_commit": lambda: run_engine(
            n_ops, threads=threads, synchronous=synchronous, payload_bytes=payload_bytes),
        f"engine_{threads}_threads_commit_per_write": lambda: run_engine(
            n_ops, threads=threads, group_commit=False, synchronous=synchronous, payload_bytes=payload_bytes),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            runs[name].append(configs[name]())
    out: dict[str, Any] = {"settings": {"ops": n_ops, "threads": threads, "synchronous": synchronous,
                                        "payload_bytes": payload_bytes, "rounds": rounds}}
    for name, results in runs.items():
        out[name] = {kind: {key: _median([res[kind][key] for res in results if res[kind].get(key) is not None])
                            for key in ("ops_per_s", "p50_us", "p99_us", "writes_per_commit")
                            if any(res[kind].get(key) is not None for res in results)}
                     for kind in ("write", "read", "search")}
    direct = out["direct"]["write"]["ops_per_s"]
    for name in names[1:]:
        out[name]["write"]["vs_direct"] = round(out[name]["write"]["ops_per_s"] / direct, 2)
    return out


def _median(values: list[float]) -> float:
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else round((values[n // 2 - 1] + values[n // 2]) / 2, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aios.bench.storage_direct", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=2000, help="writes (and reads) per measurement")
    parser.add_argument("--threads", type=int, default=16, help="writer threads for the engine's concurrent runs")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (figures are medians)")
    parser.add_argument("--synchronous", default="NORMAL", choices=["NORMAL", "FULL"])
    parser.add_argument("--payload", type=int, default=200, help="bytes per small write")
    parser.add_argument("--compression", action="store_true", help="measure 100 appends instead (chunk size sweep)")
    args = parser.parse_args(argv)
    if args.compression:
        from aios.managers.storage.chunks import Chunker

        rows = []
        for append_bytes in (200, 1000, 5000):
            for sizes in ((128, 512, 2048), (256, 1024, 4096), (512, 2048, 8192), (1024, 4096, 16384)):
                rows.append(measure_compression(100, append_bytes, chunker=Chunker(*sizes)))
                print(json.dumps(rows[-1]), file=sys.stderr)
        print(json.dumps(rows, indent=2))
        return 0
    print(json.dumps(compare(args.ops, threads=args.threads, synchronous=args.synchronous,
                             payload_bytes=args.payload, rounds=args.rounds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
