"""Building manager processes: one path for every manager, and the process entry point.

`resolve_managers(config)` imports each configured manager's class,
validates its options against the class's `Options` model and runs the class's
rules about the rest of the configuration (`Manager.check_kernel`), so a bad
target, a misspelled option or a missing companion service is reported at
`aios-start` (and by `aios config check`), one line per problem, naming its
place in the configuration. `build_manager`
does the same inside the manager process, and `main` runs it:
`python -m aios.managers.runner --run-dir D --name N`.

Kept apart from `aios.managers.base` so that running it as `__main__` never
creates a second copy of the `Manager` class.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path


from pydantic import BaseModel, ValidationError

from aios.config import Config, ConfigError, ManagerSpec, closest
from aios.log import setup_logging
from aios.managers.base import Manager
from aios.managers.shell import ManagerShell
from aios.procutil import exit_with_parent
from aios.rundir import RunDir


@dataclass(frozen=True)
class ResolvedManager:
    """A manager process ready to run: its class, service and validated options."""

    spec: ManagerSpec
    cls: type[Manager]
    options: BaseModel

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def service(self) -> str:
        return self.cls.service


def load_manager_class(target: str, path: str | None = None) -> type[Manager]:
    """Import 'package.module:ClassName' and check it is a Manager. The module is looked up in
    `path` first when given (`[[managers]] path`, a directory put on the import path), then in
    the current directory (plug-ins named relative to where the kernel was started), then in
    the installed packages."""
    module_name, _, class_name = target.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if path is not None:
        directory = str(Path(path).expanduser().absolute())
        if directory not in sys.path:
            sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = "" if path is not None else (f" (looked in the current directory, {os.getcwd()}, and the installed "
                                            f"packages; for a module elsewhere, set path = \"DIR\" in its "
                                            f"[[managers]] entry)")
        raise ValueError(f"cannot import manager module {module_name!r}: {exc}{hint}") from None
    except Exception as exc:  # the module itself is broken: say so in one line, not a traceback
        raise ValueError(f"manager module {module_name!r} failed to import: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Manager)):
        raise ValueError(f"{target!r} is not a aios.managers.base.Manager subclass")
    if not getattr(cls, "service", None):
        raise ValueError(f"{target!r} does not set a service name")
    return cls


def resolve(spec: ManagerSpec, config: Config) -> ResolvedManager:
    """Import the spec's class, validate its options and check how it fits the rest of the
    configuration (`Manager.check_kernel`); ConfigError names the place on failure. The options
    come back completed from the whole configuration (`Manager.complete_options`)."""
    try:
        cls = load_manager_class(spec.target, spec.path)
    except ValueError as exc:
        raise ConfigError(f"{spec.where}: {exc}") from None
    try:
        options = cls.Options.model_validate(spec.options)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err.get("loc", ()))
            key = ".".join(str(p) for p in loc) or "options"
            msg = str(err.get("msg", "invalid"))
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, "):]
            if err.get("type") == "extra_forbidden":
                guess = closest(str(loc[-1]), list(cls.Options.model_fields)) if loc else None
                msg = "unknown option" + (f'; did you mean "{guess}"?' if guess else
                                          f"; {cls.__name__} options: {', '.join(sorted(cls.Options.model_fields)) or 'none'}")
            lines.append(f'{spec.where}, key "{key}": {msg}')
        raise ConfigError("\n".join(lines)) from None
    problems = cls.check_kernel(spec, options, config)
    if problems:
        raise ConfigError("\n".join(problems))
    return ResolvedManager(spec, cls, cls.complete_options(spec, options, config))


def resolve_managers(config: Config) -> list[ResolvedManager]:
    """Every configured manager, resolved; all problems reported together."""
    resolved, problems = [], []
    for spec in config.manager_specs():
        try:
            resolved.append(resolve(spec, config))
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    return resolved


def build_manager(name: str, run_dir: RunDir, config: Config) -> Manager:
    spec = config.manager_spec(name)
    if spec is None:
        raise ValueError(f"no manager named {name!r} in the configuration")
    r = resolve(spec, config)
    return r.cls(name, run_dir, config, r.options, spec.capacity)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aios-manager", description="Run one AIOS manager (started by the supervisor)")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    setup_logging(args.name)
    run_dir = RunDir(args.run_dir)
    config = run_dir.load_config()
    manager = build_manager(args.name, run_dir, config)
    signal.signal(signal.SIGTERM, lambda *_: manager.stop())
    signal.signal(signal.SIGINT, lambda *_: manager.stop())
    exit_with_parent()
    manager.setup()
    ManagerShell(manager).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
