"""The benchmarks' shared helpers (aios.bench.common) that need no kernel. The `aios bench syscall`
command and the temporary kernel are tested in tests/system/test_bench_syscall.py."""
from __future__ import annotations


def test_toml_dumps_round_trips_and_percentiles() -> None:
    import tomllib

    from aios.bench.common import percentile, summarize
    from aios.config import dump_toml

    config = {"llm": [], "kernel": {"heartbeat_interval_s": 0.5}, "scheduler": {"policy": "rr", "weights": {"a b": 2.0}},
              "managers": [{"name": "echo", "target": "m:C", "options": {"xs": [1, 2], "s": 'q"\\'}}]}
    assert tomllib.loads(dump_toml(config)) == config
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    s = summarize([1000 * i for i in range(1, 101)])
    assert s["count"] == 100 and s["p50_us"] == 50.5 and s["max_us"] == 100.0
