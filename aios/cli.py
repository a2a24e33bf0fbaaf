"""Command line: `aios-start` and `aios {start,stop,status,logs,config,bench,demo}`.

Every command reports a problem in one line (a bad configuration, an
unusable run directory, no kernel running), never with a traceback. Starting,
stopping and inspecting a kernel is `aios.kernel`'s job; this module only
parses arguments and prints.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any


from aios import kernel
from aios.config import ConfigError, closest
from aios.rundir import RunDir, RunDirError

RUN_DIR_HELP = "kernel run directory (default: $AIOS_RUN_DIR, else $XDG_RUNTIME_DIR/aios, else ~/.cache/aios/run)"


class CommandParser(argparse.ArgumentParser):
    """An argument parser that refuses the arguments it does not know itself, naming the option a
    misspelled one most likely meant. Plain argparse hands a subcommand's unknown arguments up to
    the top-level parser, which answers `aios status --jsn` with its own usage (`aios [-h]
    [--version] COMMAND ...`), no help at all; here the subcommand answers, with its usage and
    "unrecognized arguments: --jsn (did you mean --json?)". Subparsers inherit the class."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(self.unrecognized(extras))
        return parsed, extras

    def unrecognized(self, extras: list[str]) -> str:
        """"unrecognized argument: --jsn; did you mean --json?" (with several: "... --json for --jsn")."""
        options = [o for o in self._option_string_actions if o.startswith("--")]
        guesses = {}
        for arg in extras:
            option = arg.split("=", 1)[0]
            guess = closest(option, options) if option.startswith("--") else None
            if guess:
                guesses[option] = guess
        msg = f"unrecognized argument{'s' if len(extras) > 1 else ''}: {' '.join(extras)}"
        if len(extras) == 1 and guesses:
            return f"{msg}; did you mean {next(iter(guesses.values()))}?"
        if guesses:
            return f"{msg}; did you mean " + ", ".join(f"{g} for {o}" for o, g in guesses.items()) + "?"
        return msg


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as pkg_version
    try:
        return pkg_version("aios")
    except PackageNotFoundError:
        return "unknown"


def _run_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default=None, help=RUN_DIR_HELP)


# ------------------------------------------------------------------ aios-start
def _start_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML configuration file (default: built-in defaults; check one with "
                                    "`aios config check FILE`)")
    _run_dir_arg(p)
    p.add_argument("--detach", action="store_true",
                   help="run in the background; exit 0 once every process is READY, non-zero with the reason if not")
    p.add_argument("--policy", help="override [scheduler] policy (fifo, rr, las)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


START_DESCRIPTION = (
    "Start the AIOS kernel: a supervisor that runs the scheduler and every manager the configuration names "
    "(by default one llama.cpp core with Gemma 3 270M), restarts them when they crash, and stops them all on "
    "Ctrl-C, SIGTERM or `aios stop`. In the foreground it prints progress lines; each process logs to "
    "RUN_DIR/logs/ (see `aios logs`).")


def start_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="aios-start", description=START_DESCRIPTION)
    _start_args(p)
    return p


def start_main(argv: list[str] | None = None) -> int:
    return _start(start_parser().parse_args(argv), prog="aios-start")


def _start(args: argparse.Namespace, prog: str) -> int:
    run_dir = RunDir(args.run_dir)
    say = (lambda line: None) if args.quiet else (lambda line: print(f"[aios-start] {line}", flush=True))
    try:
        if args.detach:
            verdict = kernel.start(run_dir, args.config, policy=args.policy, progress=say)
            for warning in verdict.warnings:
                print(f"{prog}: warning: {warning}", file=sys.stderr)
            say(f"kernel ready in {run_dir.path}; stop it with: aios stop --run-dir {run_dir.path}")
            return 0
        config = kernel.load(args.config, args.policy)
        run_dir.prepare_dir()
    except (ConfigError, RunDirError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except kernel.KernelStartError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    from aios.log import setup_logging
    from aios.supervisor import run_supervisor
    # the foreground shows progress lines; the supervisor's own log goes to its file like every process's
    setup_logging("supervisor", path=run_dir.log_dir / "supervisor.log")
    return run_supervisor(run_dir, config, quiet=args.quiet)


# ------------------------------------------------------------------ aios status
def status_main(args: argparse.Namespace) -> int:
    run_dir = RunDir(args.run_dir)
    human = not args.json
    st = kernel.status(run_dir, verbose=args.verbose or human, details=args.verbose)
    if args.json:
        out = {k: st[k] for k in ("running", "run_dir", "supervisor_pid")}
        if st.get("message"):
            out["message"] = st["message"]
        out["processes"] = [{k: p.get(k) for k in ("name", "pid", "state", "restarts", "message")}
                            for p in st["processes"]]
        if args.verbose:
            out["kernel"] = st.get("kernel")
            out["details"] = st.get("details", {})
        print(json.dumps(out, indent=2))
        return 0 if st["running"] else 1
    if not st["running"]:
        print(f"no kernel running in {run_dir.path}" + (f": {st['message']}" if st.get("message") else ""))
        return 1
    from aios.status_view import header_line
    if st.get("message"):
        print(f"warning: {st['message']}")
    k = st.get("kernel") or {}
    print(header_line(st))
    managers = {m["name"]: m for m in k.get("managers", [])}
    print(f"{'NAME':<14}{'SERVICE':<10}{'PID':>8}  {'STATE':<10}{'RESTARTS':>9}  {'BUSY':>6}  DETAIL")
    for p in st["processes"]:
        m = managers.get(p["name"], {})
        busy = f"{m['busy']}/{m['capacity']}" if m else "-"
        detail = p.get("message") or ""
        if m:
            bits = []
            if m.get("targets"):
                bits.append("serves " + ", ".join(m["targets"][:4]) + (" ..." if len(m["targets"]) > 4 else ""))
            if m.get("health") == "degraded":
                bits.append(f"DEGRADED: {m.get('detail')}")
            detail = "; ".join(bits + ([detail] if detail else []))
        print(f"{p['name']:<14}{p.get('service', ''):<10}{p.get('pid') or '-':>8}  {p['state']:<10}"
              f"{p['restarts']:>9}  {busy:>6}  {detail}")
    services = k.get("services", {})
    if services:
        print()
        print(f"{'SERVICE':<10}{'QUEUED':>7}{'DONE':>8}{'ERRORS':>8}{'PREEMPT':>9}{'REQUEUED':>9}"
              f"{'WAIT MEAN':>11}{'TURNAROUND':>12}")
        for s, c in services.items():
            print(f"{s:<10}{k.get('queues', {}).get(s, 0):>7}{c['completed']:>8}{c['errors']:>8}"
                  f"{c['preemptions']:>9}{c['requeued']:>9}{c['wait_mean_s']:>10.3f}s{c['turnaround_mean_s']:>11.3f}s")
    elif not k:
        print("(the scheduler did not answer; see `aios logs scheduler`)")
    if st.get("details"):
        from aios.status_view import detail_lines
        print()
        order = [p["name"] for p in st["processes"]]
        details = dict(sorted(st["details"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))
        for line in detail_lines(details):
            print(line)
    return 0


# -------------------------------------------------------------------- aios stop
def stop_main(args: argparse.Namespace) -> int:
    run_dir = RunDir(args.run_dir)
    if not kernel.stop(run_dir, args.timeout):
        print(f"no kernel running in {run_dir.path}")
        return 0
    print(f"stopped the kernel in {run_dir.path}")
    return 0


# -------------------------------------------------------------------- aios logs
def logs_main(args: argparse.Namespace) -> int:
    run_dir = RunDir(args.run_dir)
    log_dir = run_dir.log_dir
    if not log_dir.is_dir():
        print(f"aios logs: no logs in {run_dir.path} (has a kernel run there?)", file=sys.stderr)
        return 1
    files = sorted(log_dir.glob("*.log"))
    if args.name:
        path = log_dir / f"{args.name}.log"
        if not path.exists():
            names = ", ".join(f.stem for f in files) or "none"
            print(f"aios logs: no log named {args.name!r} in {log_dir}; logs: {names}", file=sys.stderr)
            return 1
        files = [path]
    positions: dict[Path, int] = {}
    for f in files:
        lines = f.read_text(errors="replace").splitlines()
        shown = lines[-args.lines:] if args.lines else lines
        prefix = f"[{f.stem}] " if len(files) > 1 else ""
        for line in shown:
            print(prefix + line)
        positions[f] = f.stat().st_size
    if not args.follow:
        return 0
    try:
        while True:
            time.sleep(0.25)
            for f in sorted(log_dir.glob("*.log")) if not args.name else files:
                size = f.stat().st_size if f.exists() else 0
                pos = positions.get(f, 0)
                if size < pos:
                    pos = 0  # truncated or replaced
                if size > pos:
                    with open(f, "rb") as fh:
                        fh.seek(pos)
                        chunk = fh.read(size - pos).decode(errors="replace")
                    prefix = f"[{f.stem}] " if not args.name else ""
                    for line in chunk.splitlines():
                        print(prefix + line, flush=True)
                    positions[f] = size
    except KeyboardInterrupt:
        return 0


# ------------------------------------------------------------------ aios config
def config_check_main(args: argparse.Namespace) -> int:
    try:
        cfg = kernel.load(args.file)
    except ConfigError as exc:
        print(f"aios config check: {exc}", file=sys.stderr)
        return 2
    from aios.managers.runner import resolve_managers
    procs = ", ".join(f"{r.name} ({r.service})" for r in resolve_managers(cfg))
    print(f"{args.file}: ok; policy {cfg.scheduler.policy}, transport {cfg.kernel.transport}; "
          f"processes: scheduler, {procs or 'no managers'}")
    return 0


# ------------------------------------------------------------------- aios files
def _agent_call(args: argparse.Namespace, fn: Any, show: Any) -> int:
    """Run `fn(client)` as `--agent` against the kernel; print its result with `show` (or as JSON)."""
    from aios import sdk
    try:
        with sdk.connect(args.run_dir, agent=args.agent, timeout=args.timeout) as client:
            result = fn(client)
    except sdk.AIOSError as exc:
        print(f"aios {args.command}: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, default=_json_default))
    else:
        show(result)
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": __import__("base64").b64encode(value).decode()}
    raise TypeError(f"{type(value).__name__} is not JSON")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def files_main(args: argparse.Namespace) -> int:
    a = args.files_command
    if a == "ls":
        def show(files: list[dict[str, Any]]) -> None:
            for f in files:
                kind = "/" if f["kind"] == "dir" else ""
                print(f"{f['size']:>10}  v{f['version']:<5}{_when(f['modified'])}  {f['path']}{kind}"
                      + ("  (deleted)" if f.get("deleted") else ""))
            if not files:
                print(f"(no files for agent {args.agent}" + (f" under {args.prefix!r})" if args.prefix else ")"))
        return _agent_call(args, lambda c: c.storage.list(args.prefix or "", recursive=not args.top,
                                                          include_deleted=args.deleted), show)
    if a == "cat":
        def show_bytes(data: bytes) -> None:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        return _agent_call(args, lambda c: c.storage.read(args.path, version=args.version), show_bytes)
    if a == "history":
        def show_history(versions: list[dict[str, Any]]) -> None:
            for v in versions:
                note = f" (restored v{v['source']})" if v.get("source") else ""
                print(f"v{v['version']:<5}{v['op']:<9}{v['size']:>10}  {_when(v['created'])}"
                      f"{'  <- current' if v.get('current') else ''}{note}")
        return _agent_call(args, lambda c: c.storage.history(args.path), show_history)
    if a == "rollback":
        return _agent_call(args, lambda c: c.storage.rollback(args.path, args.version),
                           lambda f: print(f"{f['path']}: v{args.version} restored as v{f['version']} ({f['size']} bytes)"))
    if a == "search":
        def show_hits(hits: list[dict[str, Any]]) -> None:
            # significant digits, not decimals: bm25 scores of a small index are tiny (SQLite floors
            # the weight of a word most files hold at 1e-6), and `.3f` printed every one as 0.000
            for h in hits:
                print(f"{h['score']:10.4g}  {h['path']} (v{h['version']}): {h['snippet']}")
            if not hits:
                print("(no match)")
        return _agent_call(args, lambda c: c.storage.search(args.query, limit=args.limit), show_hits)
    raise ValueError(a)


def memory_main(args: argparse.Namespace) -> int:
    a = args.memory_command
    if a == "ls":
        def show(page: dict[str, Any]) -> None:
            for e in page["entries"]:
                meta = json.dumps(e["metadata"]) if e["metadata"] else ""
                print(f"{e['id']}  {_when(e['created'])}  {e['size']:>8}  {meta}")
            print(f"({len(page['entries'])} of {page['total']} entries of agent {args.agent})")
        return _agent_call(args, lambda c: c.memory.list(offset=args.offset, limit=args.limit), show)
    if a == "show":
        def show_one(e: dict[str, Any]) -> None:
            print(f"id: {e['id']}\ncreated: {_when(e['created'])}  updated: {_when(e['updated'])}")
            if e["metadata"]:
                print(f"metadata: {json.dumps(e['metadata'])}")
            print(e["content"])
        return _agent_call(args, lambda c: c.memory.get(args.id), show_one)
    if a == "search":
        def show_hits(hits: list[dict[str, Any]]) -> None:
            for h in hits:
                text = h["content"].replace("\n", " ")
                print(f"{h['score']:10.4g} [{h['ranking']}, {h['source']}] {h['id']}: {text[:100]}")
            if not hits:
                print("(no match)")
        return _agent_call(args, lambda c: c.memory.search(args.query, limit=args.limit), show_hits)
    raise ValueError(a)


def _agent_args(p: argparse.ArgumentParser, agent_required: bool = True) -> None:
    _run_dir_arg(p)
    p.add_argument("--agent", required=agent_required, default="aios-cli",
                   help="whose data: the agent name its calls carry")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=30.0, help=argparse.SUPPRESS)


# ------------------------------------------------------------------- aios tools
def tools_main(args: argparse.Namespace) -> int:
    if args.name:
        def show_one(info: dict[str, Any]) -> None:
            print(f"{info['name']} ({info['kind']}, {info['source']}): {info['description']}")
            print(f"  limit {info['limit']} at once, timeout {info['timeout_s']:g}s, memory "
                  f"{info['memory_mb'] or '-'} MB, {'safe' if info['idempotent'] else 'not safe'} to repeat, "
                  f"network {'on' if info['network'] else 'off'}")
            print(f"  isolation: {info['isolation']}")
            if not info["enabled"]:
                print(f"  OFF: {info['disabled_reason']}")
            print("  arguments (JSON schema):")
            print("    " + json.dumps(info["parameters"], indent=2).replace("\n", "\n    "))
        return _agent_call(args, lambda c: c.tools.describe(args.name), show_one)

    def show_all(data: dict[str, Any]) -> None:
        print(f"isolation: {data['status']['isolation']}")
        print(f"{'TOOL':<24}{'LIMIT':>6}{'TIMEOUT':>9}{'REPEAT':>8}  DESCRIPTION")
        for t in data["tools"]:
            desc = t["description"] if t["enabled"] else f"OFF: {t['disabled_reason']}"
            print(f"{t['name']:<24}{t['limit']:>6}{t['timeout_s']:>8g}s{'yes' if t['idempotent'] else 'no':>8}  "
                  f"{desc[:90]}")
        for p in data["status"]["problems"]:
            print(f"not loaded: {p['path']}: {p['reason']}")
    return _agent_call(args, lambda c: {"tools": c.tools.list(), "status": c.call("tools", "status")}, show_all)


# ------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="aios", description="Run, control and measure an AIOS kernel.")
    parser.add_argument("--version", action="version", version=f"aios {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("start", help="start the kernel (the same as aios-start)", description=START_DESCRIPTION)
    _start_args(p)
    p.set_defaults(func=lambda a: _start(a, prog="aios start"))
    p = sub.add_parser("status", help="show the kernel's processes, services and queues")
    _run_dir_arg(p)
    p.add_argument("--json", action="store_true",
                   help='print {"running", "processes": [{name, pid, state, restarts, message}]}')
    p.add_argument("-v", "--verbose", action="store_true", help="add each manager's figures (LLM batching and prefix cache, "
                        "memory compression and evictions, tool isolation); with --json, also the scheduler's status")
    p.set_defaults(func=status_main)
    p = sub.add_parser("stop", help="stop the kernel and every process it started")
    _run_dir_arg(p)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait before SIGKILL")
    p.set_defaults(func=stop_main)
    p = sub.add_parser("logs", help="show a process's log from the run directory")
    p.add_argument("name", nargs="?", help="process name (scheduler, supervisor, llm-0, ...); default: all")
    _run_dir_arg(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines (Ctrl-C to stop)")
    p.add_argument("-n", "--lines", type=int, default=40, help="lines to show from the end of each log (0: all)")
    p.set_defaults(func=logs_main)
    p = sub.add_parser("config", help="configuration tools")
    cfg = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    c = cfg.add_parser("check", help="validate a configuration file without starting anything")
    c.add_argument("file")
    c.set_defaults(func=config_check_main)
    p = sub.add_parser("files", help="an agent's files in kernel storage: ls, cat, history, rollback, search")
    files = p.add_subparsers(dest="files_command", required=True, metavar="ACTION")
    f = files.add_parser("ls", help="list files (under PREFIX)")
    f.add_argument("prefix", nargs="?", default="")
    f.add_argument("--top", action="store_true", help="only the top level (directories shown with /)")
    f.add_argument("--deleted", action="store_true", help="also deleted files (which rollback can restore)")
    _agent_args(f)
    f = files.add_parser("cat", help="print a file (or one of its kept versions)")
    f.add_argument("path")
    f.add_argument("--version", type=int)
    _agent_args(f)
    f = files.add_parser("history", help="a file's kept versions")
    f.add_argument("path")
    _agent_args(f)
    f = files.add_parser("rollback", help="make a kept version current again")
    f.add_argument("path")
    f.add_argument("version", type=int)
    _agent_args(f)
    f = files.add_parser("search", help="full-text search of the agent's files")
    f.add_argument("query")
    f.add_argument("--limit", type=int, default=10)
    _agent_args(f)
    p.set_defaults(func=files_main)
    p = sub.add_parser("memory", help="an agent's memory entries: ls, show, search")
    mem = p.add_subparsers(dest="memory_command", required=True, metavar="ACTION")
    m = mem.add_parser("ls", help="list entries, oldest first (no content)")
    m.add_argument("--offset", type=int, default=0)
    m.add_argument("--limit", type=int, default=100)
    _agent_args(m)
    m = mem.add_parser("show", help="one entry with its content")
    m.add_argument("id")
    _agent_args(m)
    m = mem.add_parser("search", help="ranked search of the agent's entries")
    m.add_argument("query")
    m.add_argument("--limit", type=int, default=10)
    _agent_args(m)
    p.set_defaults(func=memory_main)
    p = sub.add_parser("tools", help="the tools the kernel offers (or one, with its argument schema)")
    p.add_argument("name", nargs="?", help="a tool to describe")
    _agent_args(p, agent_required=False)
    p.set_defaults(func=tools_main)
    from aios.bench.cli import add_bench_parser
    add_bench_parser(sub)
    from aios.demo import add_demo_parser
    add_demo_parser(sub)
    return parser


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # `kill` (SIGTERM) unwinds like Ctrl-C: a command that started a temporary kernel (bench, demo)
    # stops it on the way out instead of leaving its process tree running as orphans.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return int(args.func(args) or 0)
    except (RunDirError, ConfigError) as exc:
        print(f"aios {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
