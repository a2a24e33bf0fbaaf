"""Entry point of a manager process: `python -m aios.managers.runner --run-dir D --name N`.

Kept apart from `aios.managers.base` so that running it as `__main__` never
creates a second copy of the `Manager` class.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from aios.log import setup_logging
from aios.managers.base import build_manager
from aios.procutil import exit_with_parent
from aios.rundir import RunDir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aios-manager", description="Run one AIOS manager (started by the supervisor)")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    setup_logging(args.name)
    run_dir = RunDir(args.run_dir)
    config = run_dir.load_config()
    sys.path.insert(0, os.getcwd())
    manager = build_manager(args.name, run_dir, config)
    signal.signal(signal.SIGTERM, lambda *_: manager.stop())
    signal.signal(signal.SIGINT, lambda *_: manager.stop())
    exit_with_parent()
    manager.setup()
    manager.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
