"""Configuration composed from the components (no kernel, no sockets, no processes): options in leaf
modules, rules that span managers as the managers' own hooks, and the standard `status` op and its line."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from aios.config import Config, ConfigError, load_config
from aios.managers.base import Manager, RequestContext
from aios.managers.runner import resolve_managers
from aios.rundir import RunDir

AIOS = Path(__file__).resolve().parents[2] / "aios"


def _aios_imports(path: Path) -> set[str]:
    """Every `aios...` module a source file imports, at any depth (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n == "aios" or n.startswith("aios.")}


# ------------------------------------------------------------------ options in leaf modules
def test_the_component_option_modules_are_leaves_and_config_never_imports_the_policies() -> None:
    for leaf in ("scheduler/options.py", "managers/llm/options.py"):
        assert _aios_imports(AIOS / leaf) == set(), leaf
    assert "aios.scheduler.policies" not in _aios_imports(AIOS / "config.py")
    assert _aios_imports(AIOS / "scheduler/policies.py") & {"aios.config"} == set()


def test_the_policy_names_the_configuration_accepts_are_the_policies() -> None:
    from aios.scheduler.options import POLICY_NAMES
    from aios.scheduler.policies import POLICIES
    assert set(POLICY_NAMES) == set(POLICIES)


def test_moved_option_models_keep_their_old_names_and_the_context_table() -> None:
    from aios.config import ContextConfig, SchedulerConfig
    from aios.managers.llm.options import ContextConfig as LLMContext
    from aios.scheduler.options import SchedulerConfig as Options
    assert ContextConfig is LLMContext and SchedulerConfig is Options
    cfg = load_config(None, {"context.ram_budget_mb": 32, "context.disk_budget_mb": 1})
    assert (cfg.context.ram_budget_mb, cfg.context.disk_budget_mb) == (32, 1)
    with pytest.raises(ConfigError, match=r'\[context\], key "ram_budget_mbb": unknown key; did you mean "ram_budget_mb"'):
        load_config(None, {"context.ram_budget_mbb": 32})


# ------------------------------------------------------------------ rules that span managers
def _resolve(overrides: dict[str, Any]) -> dict[str, Any]:
    return {r.name: r.options for r in resolve_managers(load_config(None, {"llm": [], **overrides}))}


def test_memory_needs_storage_is_the_memory_managers_rule() -> None:
    with pytest.raises(ConfigError) as info:
        _resolve({"storage.enabled": False})
    assert str(info.value) == ("[memory] keeps its entries in the storage service, which [storage] turns off: enable "
                               "[storage], or set [memory] storage = false (RAM only, nothing survives a restart)")
    assert "memory" in _resolve({"storage.enabled": False, "memory.storage": False})


def test_the_prefix_cache_must_fit_the_context_budget_and_every_problem_is_reported() -> None:
    with pytest.raises(ConfigError) as info:
        _resolve({"storage.enabled": False, "context.ram_budget_mb": 64,
                  "llm": [{"name": "big", "prefix_cache_mb": 100}]})
    lines = str(info.value).splitlines()
    assert lines == ['[[llm]] #1 (name "big"): prefix_cache_mb = 100 exceeds [context] ram_budget_mb = 64; the '
                     'prefix cache is part of the context RAM budget: lower prefix_cache_mb or raise ram_budget_mb',
                     lines[1]]
    assert lines[1].startswith("[memory] keeps its entries in the storage service")
    assert "big" in _resolve({"context.ram_budget_mb": 64, "llm": [{"name": "big", "prefix_cache_mb": 64}]})


@pytest.mark.parametrize("marked, default", [((), "a"), (("b",), "b"), (("a", "c"), "a c")])
def test_which_llm_core_serves_requests_naming_no_model_is_settled_at_configuration(
        marked: tuple[str, ...], default: str) -> None:
    cores = [{"name": n, "backend": "sim", **({"default": True} if n in marked else {})} for n in "abc"]
    options = _resolve({"llm": cores})
    assert [n for n in "abc" if options[n].default] == default.split()


# ------------------------------------------------------------------ the standard status op
def _ctx() -> RequestContext:
    return RequestContext(id="r", client=b"c", agent="a", op="status", attempt=1, resume=False, slice=None,
                          deadline=None, target=None)


def test_every_manager_answers_status_with_its_figures_and_a_summary_line(tmp_path: Path) -> None:
    from tests.support.echo_manager import EchoManager
    from tests.support.gauge_manager import GaugeManager

    echo = EchoManager("echo", RunDir(tmp_path), Config())
    assert "status" in echo.ops and echo.ops["status"].idempotent
    reply = echo.status(Manager.StatusArgs(), _ctx())
    assert reply == {"summary": f"echo service, capacity 2; ops: {', '.join(sorted(echo.ops))}"}
    gauge = GaugeManager("gauge", RunDir(tmp_path), Config())
    gauge.setup()
    gauge.add(gauge.ops["add"].args_model(n=5), _ctx())
    assert gauge.status(Manager.StatusArgs(), _ctx()) == {"total": 5, "calls": 1, "summary": "total 5 from 1 calls"}


def test_a_status_line_that_fails_on_its_figures_falls_back_to_the_generic_line(tmp_path: Path) -> None:
    from tests.support.gauge_manager import GaugeManager

    class Broken(GaugeManager):
        def status_figures(self) -> dict[str, Any]:
            return {"total": 1}  # no "calls": the line cannot be written

    m = Broken("gauge", RunDir(tmp_path), Config())
    assert m.status(Manager.StatusArgs(), _ctx()) == {"total": 1, "summary": "gauge service, capacity 2; ops: add, status"}


def test_the_tool_managers_line_shows_what_the_scheduler_says_is_in_use(tmp_path: Path) -> None:
    from aios.managers.tools.manager import ToolManager

    tools = ToolManager("tools", RunDir(tmp_path), Config())
    per_target = {"slow2": {"limit": 2, "running": 2, "queued": 5}, "calculator": {"limit": 4, "running": 0, "queued": 0}}
    figures = {"isolation_complete": True, "workers": {"warm": 1, "idle": 0, "cold": 3, "live": 1, "max": 32},
               "call_limits": {"summary": "memory per call by process-tree accounting"}, "mcp": {}}
    tools.status_figures = lambda: figures  # type: ignore[method-assign]
    reply = tools.status(Manager.StatusArgs(per_target=per_target), _ctx())
    assert reply["per_target"] == per_target
    assert reply["summary"] == ("isolation complete; memory per call by process-tree accounting; workers 1/32 live, "
                                "0 idle, 1 warm calls, 3 cold starts; MCP servers: none; "
                                "in use: slow2 2/2 running, 5 queued")


@pytest.mark.parametrize("names, route", [
    ([("llm-0", "llm", ["gemma"], {})], None),                      # its service's only manager: no target
    ([("a", "llm", ["m1", "m2"], {}), ("b", "llm", ["m3"], {})], "m1"),  # several cores: a model it serves
    ([("t", "tools", ["slow", "fast"], {"slow": 2}), ("u", "tools", [], {})], "fast"),  # never a limited one
])
def test_aios_status_reaches_each_manager_itself(names: list[tuple[Any, ...]], route: str | None) -> None:
    from aios.kernel import _route
    managers = [{"name": n, "service": s, "targets": t, "limits": lim} for n, s, t, lim in names]
    assert _route(managers[0], managers) == route
