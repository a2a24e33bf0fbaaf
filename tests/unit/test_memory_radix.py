"""The memory engine's radix tree: exact round trips, sharing, freeing, honest byte counts."""
from __future__ import annotations

import gc
import random
import tracemalloc

import pytest

from aios.bench.memory_workloads import conversation_logs, distinct_notes, templated_notes
from aios.managers.memory.radix import TUPLE_MAX, RadixTree


def assert_consistent(tree: RadixTree) -> None:
    figures = tree.audit()
    assert figures == {"nbytes": tree.nbytes, "stored_bytes": tree.stored_bytes, "raw_bytes": tree.raw_bytes,
                       "node_count": tree.node_count, "handle_count": tree.handle_count}


EDGE_CASES = [
    "",
    "a",
    "ab",
    "abc",
    "abd",
    "abc",  # identical to an earlier one
    "",  # a second empty string
    "Grüße, café – naïve",
    "日本語のテキスト",
    "日本語の文章",
    "emoji 😀👍🏽 and flags 🇫🇷",
    "emoji 😀👍 differs",
    "e\u0301 combining accent",
    "é precomposed",
    "nul\x00inside",
    "nul\x00inside too",
    "lone surrogate \ud800 kept as is",
    "x" * 5000,
    "x" * 5000 + "y",
    "x" * 4999,
]


def test_edge_cases_round_trip_exactly() -> None:
    tree = RadixTree()
    handles = [(tree.insert(text), text) for text in EDGE_CASES]
    for handle, text in handles:
        assert tree.get(handle) == text
        assert type(tree.get(handle)) is str
    assert_consistent(tree)
    raw = sum(len(t.encode("utf-8", "surrogatepass")) for t in EDGE_CASES)
    assert tree.raw_bytes == raw
    assert tree.stored_bytes < raw  # "abc" twice, "x"*5000 thrice, the shared prefixes...


def test_identical_entries_share_one_node_and_survive_each_others_removal() -> None:
    tree = RadixTree()
    first = tree.insert("same text")
    second = tree.insert("same text")
    assert first is second and first.refs == 2
    stored = tree.stored_bytes
    tree.remove(first)
    assert tree.get(second) == "same text"
    assert tree.stored_bytes == stored
    tree.remove(second)
    assert tree.node_count == 1 and tree.stored_bytes == 0 and tree.raw_bytes == 0
    with pytest.raises(ValueError):
        tree.remove(second)


def test_a_prefix_entry_and_its_extension() -> None:
    tree = RadixTree()
    long = tree.insert("hello world")
    short = tree.insert("hello")  # splits the edge: the long entry's handle must stay valid
    assert tree.get(long) == "hello world" and tree.get(short) == "hello"
    assert tree.stored_bytes == len("hello world")
    tree.remove(short)  # the split is undone
    assert tree.get(long) == "hello world"
    assert tree.node_count == 2  # root + one leaf again
    assert_consistent(tree)


def test_handles_stay_valid_through_random_inserts_and_removals() -> None:
    rng = random.Random(1)
    alphabet = "ab€😀 \n" + "cdefg"
    for _ in range(60):
        tree = RadixTree()
        live: list[tuple[object, str]] = []
        for _ in range(150):
            if live and rng.random() < 0.4:
                handle, _text = live.pop(rng.randrange(len(live)))
                tree.remove(handle)  # type: ignore[arg-type]
            else:
                base = rng.choice(live)[1] if live and rng.random() < 0.6 else ""
                text = base[:rng.randint(0, len(base))] + "".join(rng.choices(alphabet, k=rng.randint(0, 6)))
                live.append((tree.insert(text), text))
            for handle, text in live:
                assert tree.get(handle) == text  # type: ignore[arg-type]
            assert_consistent(tree)
        for handle, _ in live:
            tree.remove(handle)  # type: ignore[arg-type]
        assert tree.audit()["node_count"] == 1 and tree.nbytes == RadixTree().nbytes


def test_wide_nodes_switch_between_tuple_and_dict_children() -> None:
    tree = RadixTree()
    texts = [f"{chr(0x4E00 + i)} note" for i in range(TUPLE_MAX * 3)]  # non-Latin-1 keys cost objects
    handles = [tree.insert(t) for t in texts]
    assert isinstance(tree._root.children, dict)
    assert_consistent(tree)
    for handle in handles[:-2]:
        tree.remove(handle)
        assert_consistent(tree)
    assert isinstance(tree._root.children, tuple)
    assert [tree.get(h) for h in handles[-2:]] == texts[-2:]


def test_a_growing_chat_log_is_stored_once() -> None:
    tree = RadixTree()
    logs = list(conversation_logs(conversations=1, turns=25))
    handles = [tree.insert(log) for log in logs]
    assert [tree.get(h) for h in handles] == logs
    # every entry is a prefix of the next: the tree holds the last one, nothing more
    assert tree.stored_bytes == len(logs[-1].encode())
    assert tree.raw_bytes / tree.stored_bytes > 10
    assert_consistent(tree)


def test_templated_notes_share_their_template() -> None:
    tree = RadixTree()
    notes = list(templated_notes(400))
    for note in notes:
        tree.insert(note)
    raw = sum(len(n.encode()) for n in notes)
    assert tree.raw_bytes == raw
    assert tree.stored_bytes < 0.95 * raw  # "Daily report for project ..., day N. Status: ..." is shared


def test_removal_frees_everything_it_alone_used() -> None:
    tree = RadixTree()
    empty = tree.nbytes
    keep = [tree.insert(t) for t in templated_notes(50, seed=1)]
    with_keep = (tree.nbytes, tree.stored_bytes, tree.node_count)
    extra = [tree.insert(t) for t in templated_notes(200, seed=2)]
    assert tree.nbytes > with_keep[0]
    grown = tree.nbytes - with_keep[0]
    for handle in extra:
        tree.remove(handle)
    assert (tree.stored_bytes, tree.node_count) == with_keep[1:]
    # a node that had many children may keep a dict where a tuple would do (CPython dicts do
    # not shrink, and dicts turn back into tuples only at TUPLE_BACK children): a little slack
    assert 0 <= tree.nbytes - with_keep[0] <= max(1024, grown // 20)
    assert_consistent(tree)
    for handle in keep:
        tree.remove(handle)
    assert tree.nbytes == empty


@pytest.mark.parametrize("workload", ["conversation", "notes", "short"])
def test_byte_count_matches_what_tracemalloc_sees(workload: str) -> None:
    """nbytes counts real objects: at least what tracemalloc traces (exact request sizes) and at
    most the allocator's rounding above it."""
    make = {
        "conversation": lambda: conversation_logs(5, 20),
        "notes": lambda: distinct_notes(500, lo_words=20, hi_words=120),
        "short": lambda: distinct_notes(3000, lo_words=2, hi_words=6),
    }[workload]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tree = RadixTree()
        handles = [tree.insert(text) for text in make()]  # texts are made here, owned by the tree
        del handles
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert traced * 0.98 <= tree.nbytes <= traced * 1.3, (tree.nbytes, traced)
