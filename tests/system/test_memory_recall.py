"""Memory search on the generated conversation set (aios/bench/recall_set.py) with the default model's
embeddings: the merged search recalls at least as many answers in its first 5 hits as the better of
keyword search alone and search by meaning alone (the property fusion.py is designed to keep)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.paths import AIOS, REPO

pytestmark = [pytest.mark.model, pytest.mark.bench, pytest.mark.timeout(1800)]


def test_fused_search_recalls_at_least_as_much_as_its_better_input() -> None:
    out = subprocess.run([sys.executable, str(AIOS), "bench", "recall", "--json"],
                         capture_output=True, text=True, timeout=1700, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, out.stdout
    r = json.loads(lines[0])
    assert r["set"]["turns"] >= 300 and r["set"]["questions"] >= 100
    recall = r["recall"]
    print(f"recall@5: {recall}, by kind {r['recall_by_kind']}, fused led by {r['fused_led_by']}")
    assert recall["fused"] >= max(recall["bm25"], recall["embedding"]), recall
    assert r["fused_at_least_better_input"] is True
    # both inputs do real work on this set: keywords find the keyword questions, meaning the paraphrases
    assert r["recall_by_kind"]["bm25"]["keyword"] > r["recall_by_kind"]["bm25"]["paraphrase"]
    assert r["recall_by_kind"]["embedding"]["paraphrase"] > r["recall_by_kind"]["bm25"]["paraphrase"]
