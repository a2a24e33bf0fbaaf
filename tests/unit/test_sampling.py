"""The sampling options on raw logits and the choice of a token (`backends/sampling.py`): pure, no model.

Each test builds logits whose right answer can be worked out by hand and
checks the function against it; the real-model tests (exact resume with every
option set, top_k = 1 equals greedy) are in test_llamacpp_backend.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from aios.managers.llm.backends import sampling
from aios.managers.llm.types import ChatArgs, ChatMessage


def args(**kw: object) -> ChatArgs:
    return ChatArgs(messages=[ChatMessage(role="user", content="hi")], **kw)


def kept(x: np.ndarray) -> set[int]:
    return {int(i) for i in np.flatnonzero(np.isfinite(x))}


def test_neutral_options_return_the_same_array() -> None:
    logits = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    assert sampling.shaped(logits, [0, 1, 2], args(temperature=0.7)) is logits


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = np.array([2.0, -2.0, 4.0, 1.0], dtype=np.float32)
    out = sampling.penalized(logits, [0, 1, 1], args(repeat_penalty=2.0))
    assert out.tolist() == [1.0, -4.0, 4.0, 1.0]  # counts do not matter for repeat_penalty
    assert logits.tolist() == [2.0, -2.0, 4.0, 1.0]  # the input is not modified


def test_frequency_and_presence_penalties_follow_openai() -> None:
    logits = np.zeros(4, dtype=np.float32)
    out = sampling.penalized(logits, [1, 1, 1, 2], args(frequency_penalty=0.5, presence_penalty=0.25))
    assert out.tolist() == pytest.approx([0.0, -1.75, -0.75, 0.0])


def test_penalties_see_only_the_last_n_tokens() -> None:
    logits = np.ones(3, dtype=np.float32)
    history = [0] + [1] * sampling.PENALTY_LAST_N  # token 0 fell out of the window
    out = sampling.penalized(logits, history, args(presence_penalty=1.0))
    assert out.tolist() == [1.0, 0.0, 1.0]


def test_penalty_can_change_the_greedy_choice() -> None:
    logits = np.array([3.0, 2.5, 0.0], dtype=np.float32)
    out = sampling.shaped(logits, [0], args(repeat_penalty=1.5))  # temperature 0: penalties only
    assert int(out.argmax()) == 1


def test_top_k_keeps_exactly_the_k_best() -> None:
    logits = np.array([0.1, 5.0, 3.0, -1.0, 4.0], dtype=np.float32)
    assert kept(sampling.filtered(logits, args(temperature=1.0, top_k=2))) == {1, 4}


def test_min_p_drops_tokens_below_a_fraction_of_the_best() -> None:
    # probabilities relative to the best: e^0, e^-1 (0.37), e^-3 (0.05)
    logits = np.array([0.0, -1.0, -3.0], dtype=np.float32)
    assert kept(sampling.filtered(logits, args(temperature=1.0, min_p=0.1))) == {0, 1}
    assert kept(sampling.filtered(logits, args(temperature=1.0, min_p=0.01))) == {0, 1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = np.array([0.05, 0.5, 0.3, 0.15])
    logits = np.log(probs).astype(np.float32)
    assert kept(sampling.filtered(logits, args(temperature=1.0, top_p=0.5))) == {1}
    assert kept(sampling.filtered(logits, args(temperature=1.0, top_p=0.79))) == {1, 2}
    assert kept(sampling.filtered(logits, args(temperature=1.0, top_p=0.81))) == {1, 2, 3}


def test_top_p_over_a_flat_vocabulary_sorts_beyond_the_first_candidates() -> None:
    # 2,000 equally likely tokens: 0.9 of the mass needs 1,800 of them, more than the quick pass ranks
    logits = np.zeros(2000, dtype=np.float32)
    out = sampling.filtered(logits, args(temperature=1.0, top_p=0.9))
    assert len(kept(out)) == 1800
    assert kept(out) == set(range(1800))  # ties broken by the lower id, deterministically


def test_filters_are_not_applied_when_greedy() -> None:
    logits = np.array([1.0, 2.0], dtype=np.float32)
    assert sampling.shaped(logits, [], args(top_k=1)) is logits


# ---------------------------------------------------------------- choose_token: the whole choice of a token
class Only:
    """An output constraint that allows a fixed set of tokens, and records what it was asked."""

    def __init__(self, tokens: set[int]) -> None:
        self.tokens = tokens
        self.asked: list[int] = []  # how many candidates each call checked

    def __call__(self, ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        self.asked.append(len(ids))
        return np.array([int(i) in self.tokens for i in ids], dtype=bool)


def ramp(n: int = 1000) -> np.ndarray:
    """Logits that rank token i above token i - 1: the best is n - 1."""
    return np.arange(n, dtype=np.float32)


def test_greedy_without_a_constraint_is_the_argmax() -> None:
    assert sampling.choose_token(ramp(), args(), [], None, None) == 999


def test_greedy_takes_the_chosen_token_when_the_constraint_allows_it() -> None:
    allowed = Only({999, 5})
    assert sampling.choose_token(ramp(), args(), [], None, allowed) == 999
    assert allowed.asked == [1]  # one token checked, no scan


def test_greedy_finds_the_best_allowed_token_among_the_top_candidates() -> None:
    allowed = Only({990, 950, 3})
    assert sampling.choose_token(ramp(), args(), [], None, allowed) == 990
    assert allowed.asked == [1, sampling.CONSTRAINT_TOPK]  # the vocabulary was not scanned


def test_greedy_scans_the_vocabulary_when_no_top_candidate_is_allowed() -> None:
    allowed = Only({3, 7})
    assert sampling.choose_token(ramp(), args(), [], None, allowed) == 7
    assert allowed.asked == [1, sampling.CONSTRAINT_TOPK, 1000]


def test_a_constraint_that_allows_nothing_ends_the_choice_with_minus_one() -> None:
    for temperature in (0.0, 0.8):
        rng = np.random.default_rng(1)
        assert sampling.choose_token(ramp(), args(temperature=temperature), [], rng, Only(set())) == -1


def test_sampled_tokens_respect_the_constraint_and_repeat_with_the_seed() -> None:
    logits = np.zeros(1000, dtype=np.float32)
    picks = [sampling.choose_token(logits, args(temperature=1.0), [], np.random.default_rng(seed), Only({10, 20, 30}))
             for seed in (1, 1, 2, 3, 4, 5)]
    assert set(picks) <= {10, 20, 30}
    assert picks[0] == picks[1]  # the same RNG state draws the same token


def test_penalties_shape_the_logits_before_the_choice() -> None:
    logits = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    assert sampling.choose_token(logits, args(), [1], None, None) == 1
    assert sampling.choose_token(logits, args(presence_penalty=2.0), [1], None, None) == 2


def test_draw_never_returns_a_token_outside_the_mask() -> None:
    rng = np.random.default_rng(7)
    mask = np.zeros(50, dtype=bool)
    mask[[4, 9]] = True
    assert {sampling.draw(np.zeros(50, dtype=np.float32), 0.7, rng, mask) for _ in range(200)} == {4, 9}
