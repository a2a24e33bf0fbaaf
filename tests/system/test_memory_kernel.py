"""The memory manager through the real kernel, with the real storage manager behind it: per-agent
entries, compression, LRU-K eviction within a tiny budget with every entry still readable, kill -9
of memory and then storage under load, bad input, and `aios memory`."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

from aios import sdk
from aios.memory_ids import new_entry_id
from tests.support.kernel import Kernel
from tests.support.waiting import in_thread, wait_until

pytestmark = pytest.mark.timeout(180)


def memory_kernel(kernel, tmp_path: Path, **memory: Any) -> Kernel:
    return kernel(echo=False, builtins={"storage": {"path": str(tmp_path / "storage.sqlite3")}, "memory": memory},
                  kernel={"heartbeat_interval_s": 0.25}, supervisor={"backoff_initial_s": 0.05})


def test_entries_round_trip_and_stay_with_their_agent(kernel, tmp_path: Path) -> None:
    k = memory_kernel(kernel, tmp_path)
    with k.client("alice", timeout=20) as a, k.client("bob", timeout=20) as b:
        e = a.memory.add("The harbour opens at dawn.", {"topic": "harbour"})
        assert a.memory.get(e["id"]) == e
        a.memory.update(e["id"], content="The harbour opens at six.")
        assert a.memory.get(e["id"])["content"] == "The harbour opens at six."
        hits = a.memory.search("harbour")
        assert [h["id"] for h in hits] == [e["id"]] and hits[0]["ranking"] == "bm25"
        assert a.memory.list()["total"] == 1
        # bob sees none of it, whatever he tries
        for call in (lambda: b.memory.get(e["id"]), lambda: b.memory.update(e["id"], content="mine"),
                     lambda: b.memory.delete(e["id"])):
            with pytest.raises(sdk.NotFound):
                call()
        assert b.memory.search("harbour") == [] and b.memory.list()["total"] == 0
        assert a.memory.get(e["id"])["content"] == "The harbour opens at six."
        a.memory.delete(e["id"])
        with pytest.raises(sdk.NotFound):
            a.memory.get(e["id"])


def test_a_tiny_budget_evicts_with_lru_k_and_every_entry_stays_readable(kernel, tmp_path: Path) -> None:
    """Writing 10x the budget keeps the manager's memory bounded; every entry reads back exactly."""
    budget_mb = 4
    k = memory_kernel(kernel, tmp_path, budget_mb=budget_mb)
    proc = psutil.Process(k.pid("memory"))
    written: dict[str, str] = {}
    with k.client("writer", timeout=60) as c:
        c.memory.add("warm up")
        idle = proc.memory_info().rss
        peak = idle
        # a conversation log: each entry is the transcript so far (shared prefixes compress)
        transcript = "System: you are a careful assistant who answers briefly.\n"
        i = 0
        while sum(len(v) for v in written.values()) < 10 * budget_mb * 1024 * 1024:
            i += 1
            transcript += f"User: question {i} about {'sailing ' * (i % 7)}\nAssistant: answer {i}.\n"
            if len(transcript) > 60_000:
                transcript = f"System: conversation {i}.\n"
            text = transcript + f"[{i}] " + os.urandom(2000).hex()  # part of it incompressible
            e = c.memory.add(text, {"n": i})
            written[e["id"]] = text
            if i % 200 == 0:
                peak = max(peak, proc.memory_info().rss)
        stats = c.memory.stats()
        for entry_id, text in written.items():
            assert c.memory.get(entry_id)["content"] == text
        stats_after = c.memory.stats()["store"]
    peak = max(peak, proc.memory_info().rss)
    assert stats["store"]["evictions"] > 0 and stats_after["swap_ins"] > 0
    assert stats["store"]["accounted_bytes"] <= budget_mb * 1024 * 1024
    assert stats["entries"] == len(written) + 1 and stats["entries_evicted"] > 0  # + the warm-up entry
    growth = peak - idle
    assert growth < 3 * budget_mb * 1024 * 1024, f"the memory manager grew by {growth >> 20} MB"


def test_kill9_of_memory_then_storage_under_load_loses_no_acknowledged_entry(kernel, tmp_path: Path) -> None:
    k = memory_kernel(kernel, tmp_path)
    acked: dict[tuple[str, str], str] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def agent(i: int) -> None:
        with k.client(f"m{i}", timeout=30) as c:
            n = 0
            while not stop.is_set() or n < 30:
                n += 1
                text = f"agent {i} note {n}"
                while True:
                    try:
                        e = c.memory.add(text)
                        break
                    except sdk.AIOSError as exc:
                        assert exc.retryable, exc
                with lock:
                    acked[(f"m{i}", e["id"])] = text
                if n > 20_000:  # a safety net only: the load must outlast both kills and restarts
                    break

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for name in ("memory", "storage"):
        wait_until(lambda: len(acked) >= 10, timeout=60, message="adds under way")
        pid = k.wait_running(name)
        os.kill(pid, signal.SIGKILL)
        k.wait_running(name, other_than=pid, timeout=60)
        with lock:
            acked_before = len(acked)
        wait_until(lambda: len(acked) > acked_before + 5, timeout=60, message=f"the load going on after {name}")
    stop.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    for (agent_name, entry_id), text in acked.items():
        with k.client(agent_name, timeout=20) as c:
            assert c.memory.get(entry_id)["content"] == text
    k.stop()
    with sqlite3.connect(tmp_path / "storage.sqlite3") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_an_add_that_names_its_entry_is_the_same_add_when_repeated_even_after_a_restart(kernel,
                                                                                          tmp_path: Path) -> None:
    """memory.add is idempotent by the id its caller supplies: run again (in RAM, or by a restarted
    manager that finds it in storage) it returns the entry it stored; it never adds a copy."""
    k = memory_kernel(kernel, tmp_path)
    with k.client("alice", timeout=30) as c:
        entry_id = new_entry_id()

        def add(content: str = "the boat leaves at nine") -> dict[str, Any]:
            return c.call("memory", "add", content=content, metadata={"pier": 3}, id=entry_id)

        first = add()
        assert first["id"] == entry_id and add() == first
        old = k.pid("memory")
        os.kill(old, signal.SIGKILL)
        k.wait_running("memory", other_than=old, timeout=20)
        assert add() == first  # the new manager has nothing in RAM: it finds the entry in storage
        assert c.memory.list()["total"] == 1
        with pytest.raises(sdk.InvalidArgument) as info:
            add("something else")
        assert "already exists" in info.value.message
        # the SDK names each add itself: two adds of the same text are two entries
        assert c.memory.add("same text")["id"] != c.memory.add("same text")["id"]
        assert c.memory.list()["total"] == 3


def test_an_add_whose_manager_dies_under_it_is_run_again_and_stored_once(kernel, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: such an add was answered MANAGER_DIED, retryable, though it had often been stored, so the
    agent's retry added a copy. Now the scheduler runs it again (the op is idempotent: the SDK named its
    entry), and the re-run finds what the first run stored."""
    monkeypatch.setenv("AIOS_TEST_HOOKS", "1")  # storage holds the add's write until the manager is gone
    k = memory_kernel(kernel, tmp_path)
    with k.client("alice", timeout=60) as c, k.client("alice", timeout=60) as adder:
        c.memory.add("warm up")
        # Storage keeps its next batch open until 3 dispatches are in it (or 10 s): the add's write
        # waits there, uncommitted, while its manager is killed. (The add first asks storage whether
        # its entry exists, answered at once; should the kill land then instead, nothing was stored
        # and the re-run stores it: the outcome checked below is the same.)
        assert c.call("storage", "test_hold_batch", n=3) == {"holding": 3}
        t, out = in_thread(lambda: adder.memory.add("written once"))
        wait_until(lambda: k.busy("storage") == 1, timeout=20, message="the add's write held at storage")
        old = k.pid("memory")
        os.kill(old, signal.SIGKILL)
        t.join(60)
        assert "error" not in out, out
        entry = out["result"]
        assert entry["content"] == "written once"
        entries = c.memory.list()["entries"]
        assert len(entries) == 2 and entry["id"] in [e["id"] for e in entries]
        assert c.memory.get(entry["id"]) == entry
    assert k.kernel_status()["services"]["memory"]["requeued"] == 1  # it ran again, once


def test_bad_input_gets_a_clear_error_and_changes_nothing(kernel, tmp_path: Path) -> None:
    k = kernel(echo=False, builtins={"storage": {"enabled": False}, "memory": {"storage": False, "budget_mb": 1}})
    with k.client("careful", timeout=20) as c:
        kept = c.memory.add("kept")
        cases = [
            (lambda: c.memory.get("no-such-id"), sdk.NotFound, "no-such-id"),
            (lambda: c.call("memory", "add", content=5), sdk.InvalidArgument, "content"),
            (lambda: c.call("memory", "add", content="x", metadata={"k": [1, 2]}), sdk.InvalidArgument, "metadata"),
            (lambda: c.memory.add("x" * (2 * 1024 * 1024)), sdk.InvalidArgument, "budget_mb"),
            (lambda: c.memory.search(""), sdk.InvalidArgument, "query"),
            (lambda: c.memory.add(""), sdk.InvalidArgument, "empty"),
            (lambda: c.memory.add(" \n "), sdk.InvalidArgument, "empty"),
            (lambda: c.memory.update(kept["id"], content=""), sdk.InvalidArgument, "empty"),
        ]
        for fn, exc_type, needle in cases:
            with pytest.raises(exc_type) as info:
                fn()
            assert needle in info.value.message, info.value
        quota = None
        for i in range(1000):  # RAM only: the budget is a hard limit
            try:
                c.memory.add(f"filler {i} " + "z" * 20_000)
            except sdk.AIOSError as exc:
                quota = exc
                break
        assert quota is not None and quota.code == "QUOTA_EXCEEDED" and "budget_mb" in quota.message
        assert c.memory.get(kept["id"])["content"] == "kept"


def test_aios_memory_command(kernel, tmp_path: Path) -> None:
    k = memory_kernel(kernel, tmp_path)
    with k.client("cli-agent", timeout=20) as c:
        e = c.memory.add("remember the milk", {"kind": "errand"})
    ls = k.aios("memory", "ls", "--agent", "cli-agent")
    assert ls.returncode == 0 and e["id"] in ls.stdout and "errand" in ls.stdout
    show = json.loads(k.aios("memory", "show", e["id"], "--agent", "cli-agent", "--json").stdout)
    assert show["content"] == "remember the milk"
    found = k.aios("memory", "search", "milk", "--agent", "cli-agent")
    assert found.returncode == 0 and e["id"] in found.stdout and "[bm25, storage]" in found.stdout
    other = k.aios("memory", "show", e["id"], "--agent", "stranger")
    assert other.returncode == 1 and "NOT_FOUND" in other.stderr


@pytest.mark.model
def test_search_by_meaning_is_merged_and_says_which_ranking_found_each_hit(kernel, tmp_path: Path) -> None:
    """With the embedded model's LLM core (which offers `llm.embed`), search ranks by keywords and by
    meaning and merges them; each hit names the rankings that produced it; a hit by meaning must be
    closer to the query than generic text is, so a query about nothing stored finds nothing."""
    k = kernel(echo=False, llm=[{"name": "llm-0", "backend": "llamacpp", "n_ctx": 1024}],
               builtins={"storage": {"path": str(tmp_path / "storage.sqlite3")}, "memory": {}})
    with k.client("semantic", timeout=60) as c:
        texts = ["Our tabby kitten Mochi sleeps on the radiator all afternoon and purrs like an engine.",
                 "The rocket launched into orbit carrying a satellite.",
                 "The stock market fell sharply on Tuesday.", "I need to buy milk and eggs at the grocery store."]
        ids = [c.memory.add(t)["id"] for t in texts]
        reply = c.call("memory", "search", query="Which feline pet do I have?", limit=4)
        both = c.call("memory", "search", query="buy milk and eggs", limit=4)
        by_keyword = c.call("memory", "search", query="feline pet", limit=4, rankings=["bm25"])
        again = [c.call("memory", "search", query="buy milk and eggs", limit=4) for _ in range(2)]
        off_topic = c.call("memory", "search", query="What is the capital of France?", limit=4)
    with k.client("unrelated", timeout=60) as c:
        for text in [texts[1], texts[2], "The harbour opens at dawn."]:
            c.memory.add(text)
        # nothing is about peanuts: no hit, by either ranking (every entry was a hit by meaning before)
        peanut = c.call("memory", "search", query="peanut", limit=4)
        peanut_by_meaning = c.call("memory", "search", query="peanut", limit=4, rankings=["embedding"])
    assert peanut["hits"] == [] and peanut_by_meaning["hits"] == []
    assert peanut_by_meaning["rankings"] == ["embedding"] and peanut_by_meaning["compared_by_meaning"] == 3
    assert off_topic["hits"] == []
    assert by_keyword["rankings"] == ["bm25"] and by_keyword["hits"] == []  # no note says "feline" or "pet"
    assert all(a["hits"] == both["hits"] for a in again)  # the same search, the same answer
    assert reply["rankings"] == ["bm25", "embedding"]
    assert reply["compared_by_meaning"] == reply["candidates_by_meaning"] == 4
    # no note says "feline" or "pet": the kitten note is found by meaning alone, and first
    assert reply["hits"][0]["id"] == ids[0] and reply["hits"][0]["ranking"] == "embedding"
    assert reply["led_by"] == "embedding" and reply["hits"][0]["rankings"]["embedding"]["z"] >= 2.0
    assert ids[1] not in {h["id"] for h in reply["hits"]}  # the rocket is not a pet, by any ranking
    by_id = {h["id"]: h for h in both["hits"]}
    assert by_id[ids[3]]["ranking"] == "bm25+embedding" and both["hits"][0]["id"] == ids[3]  # found both ways
    assert all(h["rankings"][name]["rank"] >= 1 for h in both["hits"] for name in h["rankings"])
    # `aios status -v`: each manager's figures, one line each
    lines = {line.split(":")[0]: line for line in k.aios("status", "-v").stdout.splitlines() if ": " in line}
    assert "llamacpp gemma3-270m" in lines["llm-0"] and "prefix cache" in lines["llm-0"]
    assert "embeddings" in lines["llm-0"]
    assert lines["memory"].startswith("memory: write-through, 7 entries in RAM for 2 agents")


def test_without_embeddings_search_says_it_ranked_by_keywords_only(kernel, tmp_path: Path) -> None:
    k = memory_kernel(kernel, tmp_path)  # no LLM core at all
    with k.client("plain", timeout=30) as c:
        c.memory.add("fishing boats at dawn")
        reply = c.call("memory", "search", query="fishing")
        with pytest.raises(sdk.AIOSError) as info:
            c.memory.search("fishing", rankings=["embedding"])
    assert reply["rankings"] == ["bm25"] and reply["hits"][0]["ranking"] == "bm25"
    assert info.value.code == "UNAVAILABLE" and "embeddings" in info.value.message


def test_keyword_hits_with_equal_scores_come_in_the_same_order_every_time(kernel, tmp_path: Path) -> None:
    """Entries that score the same are listed in id order (creation order): the same data gives the same
    list on every search, and after storage and memory restart."""
    k = memory_kernel(kernel, tmp_path)
    with k.client("ties", timeout=30) as c:
        ids = [c.memory.add(text)["id"] for text in ["tide table", "tide table", "tide table", "low tide table",
                                                     "tide table", "tide table"]]
        first = [h["id"] for h in c.memory.search("tide", limit=10)]
        assert sorted(first) == sorted(ids) and [i for i in first if i != ids[3]] == sorted(set(ids) - {ids[3]})
        assert [h["id"] for h in c.memory.search("tide", limit=10)] == first
        assert [h["id"] for h in c.memory.search("tide", limit=3)] == first[:3]
    for name in ("storage", "memory"):
        pid = k.wait_running(name)
        os.kill(pid, signal.SIGKILL)
        k.wait_running(name, other_than=pid, timeout=30)
    with k.client("ties", timeout=30) as c:
        assert [h["id"] for h in c.memory.search("tide", limit=10)] == first
