"""LRU-K victim selection on known reference strings, worked out by hand, and against brute force."""
from __future__ import annotations

import random

from aios.managers.memory.lruk import LRUK


def feed(lru: LRUK[str], refs: list[tuple[int, str]]) -> None:
    for t, key in refs:
        lru.reference(key, t)


def drain(lru: LRUK[str], now: float) -> list[str]:
    order = []
    while (victim := lru.victim(now)) is not None:
        order.append(victim)
        lru.remove(victim)
    return order


# time: key
REFS = [(1, "A"), (2, "B"), (3, "A"), (4, "C"), (5, "B"), (6, "D"), (7, "D"), (8, "E"), (9, "C")]
# After these references (K = 2):
#   A: references at 3, 1  -> 2nd most recent (HIST 2) = 1, last = 3
#   B: references at 5, 2  -> HIST 2 = 2, last = 5
#   C: references at 9, 4  -> HIST 2 = 4, last = 9
#   D: references at 7, 6  -> HIST 2 = 6, last = 7
#   E: one reference, at 8 -> HIST 2 = -infinity (fewer than K references)
# LRU-K evicts the oldest HIST 2: E (-inf), then A (1), B (2), C (4), D (6).
# Plain LRU evicts the oldest last reference: A (3), B (5), D (7), E (8), C (9).
# So the first victims differ: LRU-K throws out E, touched once, though A was touched longer ago.


def test_lru2_and_lru_choose_different_victims_on_a_known_sequence() -> None:
    lru2: LRUK[str] = LRUK(k=2)
    feed(lru2, REFS)
    assert lru2.order(now=10) == ["E", "A", "B", "C", "D"]
    assert drain(lru2, now=10) == ["E", "A", "B", "C", "D"]

    lru1: LRUK[str] = LRUK(k=1)  # LRU-1 is plain LRU
    feed(lru1, REFS)
    assert drain(lru1, now=10) == ["A", "B", "D", "E", "C"]


def test_entries_with_fewer_than_k_references_go_first_least_recent_first() -> None:
    lru: LRUK[str] = LRUK(k=2)
    feed(lru, REFS + [(10, "F"), (11, "G")])
    # E (8), F (10), G (11) each have one reference: infinite distance, ties broken by LRU
    assert drain(lru, now=12) == ["E", "F", "G", "A", "B", "C", "D"]


def test_a_scan_does_not_flush_the_entries_used_twice() -> None:
    # hot entries each read twice early on, then a scan of 20 entries read once each
    lru: LRUK[str] = LRUK(k=2)
    feed(lru, [(1, "h1"), (2, "h2"), (3, "h1"), (4, "h2")])
    feed(lru, [(10 + i, f"s{i}") for i in range(20)])
    # LRU would evict h1, h2 first (oldest last references: 3, 4); LRU-2 evicts the whole scan first
    assert drain(lru, now=100) == [f"s{i}" for i in range(20)] + ["h1", "h2"]


def test_exclude_passes_over_one_key() -> None:
    lru: LRUK[str] = LRUK(k=2)
    feed(lru, REFS)
    assert lru.victim(10, exclude="E") == "A"
    assert lru.victim(10, exclude="E") == "A"  # nothing was removed
    assert lru.victim(10) == "E"
    solo: LRUK[str] = LRUK(k=2)
    solo.reference("only", 1)
    assert solo.victim(2, exclude="only") is None


def test_correlated_references_count_as_one() -> None:
    # B: two references far apart; A: a burst of two references one tick apart
    refs = [(1, "B"), (5, "B"), (10, "A"), (11, "A")]
    plain: LRUK[str] = LRUK(k=2)
    feed(plain, refs)
    # without a correlated period A's HIST 2 = 10, B's = 1: B goes first
    assert plain.victim(now=20) == "B"
    correlated: LRUK[str] = LRUK(k=2, correlated_period=2)
    feed(correlated, refs)
    # with it, A's burst is one reference (infinite distance): A goes first
    assert correlated.victim(now=20) == "A"


def test_an_entry_inside_its_correlated_period_is_not_chosen_while_another_can_be() -> None:
    lru: LRUK[str] = LRUK(k=2, correlated_period=5)
    feed(lru, [(1, "X"), (7, "X"), (10, "Y")])  # X: HIST 2 = 1; Y: one reference (infinite distance)
    assert lru.victim(now=13) == "X"  # Y would go first, but it was referenced 3 ticks ago (X: 6)
    assert lru.victim(now=20) == "Y"
    lone: LRUK[str] = LRUK(k=2, correlated_period=5)
    lone.reference("Z", 10)
    assert lone.victim(now=11) == "Z"  # nothing else: take it anyway


def test_a_burst_moves_older_history_forward_by_its_length() -> None:
    # O'Neil et al.: at the next uncorrelated reference, HIST(i) = HIST(i-1) + (LAST - HIST(1))
    lru: LRUK[str] = LRUK(k=2, correlated_period=5)
    feed(lru, [(1, "A"), (2, "A"), (3, "A"), (20, "A")])  # burst 1..3 (length 2), then 20
    assert lru.remove("A") == (20, 20, 3)  # (last, HIST 1, HIST 2 = 1 + 2)


def test_history_returns_with_the_key() -> None:
    lru: LRUK[str] = LRUK(k=2)
    feed(lru, [(1, "A"), (2, "A")])
    history = lru.remove("A")  # A evicted after two references
    assert history == (2, 2, 1)
    feed(lru, [(4, "C"), (5, "C")])  # C: HIST 2 = 4
    lru.reference("A", 6, history)  # A comes back: references 6, 2 (HIST 2 = 2)
    lru.reference("B", 7)  # B: one reference
    assert lru.order(now=8) == ["B", "A", "C"]
    fresh: LRUK[str] = LRUK(k=2)
    feed(fresh, [(4, "C"), (5, "C"), (6, "A"), (7, "B")])
    # without its history A is a stranger with one reference, older than B's: first to go
    assert fresh.order(now=8) == ["A", "B", "C"]


def brute_force_victim(times: dict[str, list[int]], k: int) -> str | None:
    if not times:
        return None

    def key(item: tuple[str, list[int]]) -> tuple[float, int]:
        refs = item[1]
        return (refs[-k] if len(refs) >= k else float("-inf"), refs[-1])

    return min(times.items(), key=key)[0]


def test_agrees_with_brute_force_on_random_reference_strings() -> None:
    rng = random.Random(4)
    for k in (1, 2, 3):
        lru: LRUK[str] = LRUK(k=k)
        times: dict[str, list[int]] = {}
        for t in range(1, 3000):
            action = rng.random()
            if action < 0.75:
                key = f"k{rng.randrange(60)}"
                lru.reference(key, t)
                times.setdefault(key, []).append(t)
            elif action < 0.9 and times:
                key = rng.choice(sorted(times))
                lru.remove(key)
                del times[key]
            else:
                victim = lru.victim(t)
                assert victim == brute_force_victim(times, k)
                if victim is not None and rng.random() < 0.5:
                    lru.remove(victim)
                    del times[victim]
            # lazy invalidation never lets the heap grow without bound
            assert len(lru._heap) <= 2 * len(lru) + 65
        assert len(lru) == len(times)
