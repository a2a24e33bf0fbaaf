"""Deterministic text workloads for the memory engine's benchmarks and tests.

Seeded pseudo-English (a Zipf-weighted vocabulary of invented words), so the
figures can be reproduced exactly and nothing is downloaded.
"""
from __future__ import annotations

import itertools
import random
from typing import Iterator

_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"


class TextGen:
    def __init__(self, seed: int = 7, vocabulary: int = 5000) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        self.words = ["".join(rng.choices(_LETTERS, weights=range(26, 0, -1), k=rng.randint(2, 10)))
                      for _ in range(vocabulary)]
        self.cum_weights = list(itertools.accumulate(1.0 / (i + 1) for i in range(vocabulary)))

    def sentence(self, lo: int, hi: int) -> str:
        words = self.rng.choices(self.words, cum_weights=self.cum_weights, k=self.rng.randint(lo, hi))
        return " ".join(words).capitalize() + "."

    def paragraph(self, lo_words: int, hi_words: int) -> str:
        target = self.rng.randint(lo_words, hi_words)
        parts, count = [], 0
        while count < target:
            n = min(target - count, self.rng.randint(6, 18))
            parts.append(self.sentence(n, n))
            count += n
        return " ".join(parts)


def conversation_logs(conversations: int = 20, turns: int = 30, seed: int = 7) -> Iterator[str]:
    """An agent saving its conversation log after every turn.

    Each conversation starts with the same system prompt (about 1,100 characters);
    a turn is a user message of 15 to 60 words and an assistant reply of 40 to 150
    words; after each turn the whole transcript so far is stored as a new entry.
    Yields conversations x turns entries.
    """
    gen = TextGen(seed)
    system = "System: You are a careful research assistant. " + gen.paragraph(170, 170)
    for _ in range(conversations):
        log = system
        for _ in range(turns):
            log += "\nUser: " + gen.paragraph(15, 60) + "\nAssistant: " + gen.paragraph(40, 150)
            yield log


def prompt_replays(count: int = 600, seed: int = 8) -> Iterator[str]:
    """Repeated prompts: a fixed instruction and few-shot block (about 2,300 characters)
    followed by one new question of 10 to 40 words."""
    gen = TextGen(seed)
    prefix = ("Instructions: answer from the notes below. " + gen.paragraph(120, 120) + "\n"
              + "\n".join(f"Example {i}: " + gen.paragraph(40, 40) for i in range(1, 5)) + "\nQuestion: ")
    for _ in range(count):
        yield prefix + gen.paragraph(10, 40)


def templated_notes(count: int = 2000, seed: int = 9) -> Iterator[str]:
    """Notes from a few templates ("Daily report for project P, day D. Status: S. ...")
    with 20 to 80 words of free text each."""
    gen = TextGen(seed)
    projects = [gen.paragraph(2, 3).rstrip(".") for _ in range(8)]
    statuses = ["on track", "blocked on review", "waiting for data", "done"]
    for i in range(count):
        project = projects[i % len(projects)]
        yield (f"Daily report for project {project}, day {i // len(projects) + 1}. "
               f"Status: {gen.rng.choice(statuses)}. Observations: " + gen.paragraph(20, 80))


def distinct_notes(count: int = 2000, seed: int = 10, lo_words: int = 20, hi_words: int = 120) -> Iterator[str]:
    """Unrelated notes (no shared prefixes beyond chance): the control."""
    gen = TextGen(seed)
    for _ in range(count):
        yield gen.paragraph(lo_words, hi_words)
