"""Sampling options on raw logits, the way llama.cpp applies them, as pure functions.

The embedded backend samples from its own copy of the logits (so that a
suspended generation resumes bit-for-bit: everything a step depends on is in
the `Generation`), which means it cannot use llama.cpp's sampler chain for the
options either. This module reproduces that chain's meaning and order
(`common/sampling.cpp`: penalties, top-k, top-p, min-p, temperature, draw):

- penalties look at the last `PENALTY_LAST_N` tokens of the completion
  (llama.cpp's `penalty_last_n` default; like llama.cpp's sampler, which
  remembers only tokens it sampled, and OpenAI's penalties, the prompt does
  not count). Measured on Gemma 3 270M: counting the prompt too pushes a
  summary away from the very words of the text it summarises (repeat_penalty
  1.3 produced an answer about RAM addresses for a paragraph on scheduling);
  counting the completion only kept it on topic and still broke the loops;
- `repeat_penalty` divides a positive logit and multiplies a negative one (the
  CTRL rule llama.cpp uses); `frequency_penalty` subtracts count x value and
  `presence_penalty` subtracts the value once (OpenAI's definitions);
- top-k, top-p and min-p remove tokens (set them to -inf) judged on the
  probabilities *before* temperature, as llama.cpp's default order does.

At temperature 0 the filters cannot change the argmax, so only the penalties
are applied: greedy decoding stays as cheap as it was.

`choose_token` is the whole choice of one token: the options above, then the
argmax or a draw, then the output constraint (a grammar) if the generation has
one; it reads nothing but its arguments, so a resumed run samples the same.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from ..types import ChatArgs

#: how many trailing tokens the penalties consider (llama.cpp's `penalty_last_n` default)
PENALTY_LAST_N = 64

#: top-p looks at this many best tokens first and sorts the whole vocabulary only when their
#: mass falls short: a full argsort of Gemma's 262k logits costs ~15 ms, several decodes' worth
_TOP_P_FIRST = 512

#: candidates tried against an output constraint (greedy) before scanning the whole vocabulary
CONSTRAINT_TOPK = 64

#: `allowed(ids, logits)`: the mask of the candidate tokens `ids` (with their logits) that an output
#: constraint (grammar.GrammarFilter with a generation's grammar) allows
Allowed = Callable[[np.ndarray, np.ndarray], np.ndarray]


def penalized(logits: np.ndarray, history: Sequence[int], args: ChatArgs) -> np.ndarray:
    """`logits` with the repetition penalties applied (a copy when any is set, else `logits`)."""
    rep, freq, pres = args.repeat_penalty, args.frequency_penalty, args.presence_penalty
    if rep == 1.0 and freq == 0.0 and pres == 0.0:
        return logits
    counts = Counter(history[-PENALTY_LAST_N:])
    if not counts:
        return logits
    out = logits.astype(np.float32, copy=True)
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    n = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    x = out[ids]
    if rep != 1.0:
        x = np.where(x > 0, x / rep, x * rep)
    x = x - n * freq - pres
    out[ids] = x
    return out


def filtered(logits: np.ndarray, args: ChatArgs) -> np.ndarray:
    """`logits` with tokens outside top-k / top-p / min-p set to -inf (a copy when any applies)."""
    k, p, min_p = args.top_k, args.top_p, args.min_p
    if (k == 0 or k >= len(logits)) and p >= 1.0 and min_p <= 0.0:
        return logits
    out = logits.astype(np.float32, copy=True)
    if 0 < k < len(out):
        keep = np.argpartition(out, -k)[-k:]
        mask = np.ones(len(out), dtype=bool)
        mask[keep] = False
        out[mask] = -np.inf
    finite = np.isfinite(out)
    if not finite.any():
        return out
    best = out[finite].max()
    if min_p > 0.0:
        # p(token) >= min_p * p(best)  <=>  logit >= best + log(min_p)
        out[out < best + np.log(min_p)] = -np.inf
    if p < 1.0:
        _apply_top_p(out, best, p)
    return out


def _apply_top_p(out: np.ndarray, best: float, p: float) -> None:
    """Keep the smallest set of best tokens whose probability reaches `p` (in place)."""
    weights = np.exp((out - best).astype(np.float64))  # exp(-inf) = 0 for removed tokens
    total = weights.sum()
    order = _best_first(out, min(_TOP_P_FIRST, len(out)))
    mass = np.cumsum(weights[order]) / total
    if mass[-1] < p and len(order) < len(out):
        order = _best_first(out, len(out))
        mass = np.cumsum(weights[order]) / total
    # the first index where the mass reaches p is kept, everything after it goes
    cut = int(np.searchsorted(mass, p, side="left")) + 1
    out[order[cut:]] = -np.inf
    if len(order) < len(out):  # tokens never ranked lie below all ranked ones
        ranked = np.zeros(len(out), dtype=bool)
        ranked[order] = True
        out[~ranked] = -np.inf


def _best_first(x: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` largest values, largest first, ties by lower index (deterministic)."""
    idx = np.arange(len(x)) if n >= len(x) else np.argpartition(x, -n)[-n:]
    return idx[np.lexsort((idx, -x[idx]))]


def shaped(logits: np.ndarray, history: Sequence[int], args: ChatArgs) -> np.ndarray:
    """Penalties, then (when sampling at temperature > 0) the top-k / top-p / min-p filters."""
    out = penalized(logits, history, args)
    if args.temperature > 0:
        out = filtered(out, args)
    return out


def choose_token(logits: np.ndarray, args: ChatArgs, history: Sequence[int], rng: np.random.Generator | None,
                 allowed: Allowed | None) -> int:
    """Greedy or temperature sampling from `logits`, filtered by the output constraint if any; -1 when the
    constraint allows no token.

    `history` is the completion so far (the penalties read its tail).  The
    constraint is consulted on the chosen token first, then (greedy) on the
    64 best, and on the whole vocabulary only when none of those is allowed:
    scanning 262k tokens through a grammar costs 30-100 ms, several decodes.
    At temperature > 0 a rejected draw is redrawn from the constraint-filtered
    distribution with the same RNG (the scheme llama.cpp's own sampler uses).
    """
    temp = args.temperature
    if args.sampling_set():
        logits = shaped(logits, history[-PENALTY_LAST_N:], args)
    tok = int(logits.argmax()) if temp <= 0 else draw(logits, temp, rng)
    if allowed is None:
        return tok
    if allowed(np.array([tok], dtype=np.int32), logits[tok:tok + 1])[0]:
        return tok
    if temp <= 0:
        # Greedy: if any of the K best tokens is allowed, the best allowed one is
        # the global answer, at a fraction of the cost of a full-vocabulary scan.
        top = np.argpartition(logits, -CONSTRAINT_TOPK)[-CONSTRAINT_TOPK:]
        top = top[np.lexsort((top, -logits[top]))]
        in_top = allowed(top, logits[top])
        if in_top.any():
            return int(top[in_top.argmax()])
    mask = allowed(np.arange(len(logits), dtype=np.int32), logits)
    if not mask.any():
        return -1
    if temp <= 0:
        return int(np.where(mask, logits, -np.inf).argmax())
    return draw(logits, temp, rng, mask)


def draw(logits: np.ndarray, temperature: float, rng: np.random.Generator | None,
         allowed: np.ndarray | None = None) -> int:
    """One token drawn from softmax(logits / temperature), restricted to `allowed` when given."""
    assert rng is not None
    x = logits.astype(np.float64)
    if allowed is not None:
        x[~allowed] = -np.inf
    x /= temperature
    x -= x.max()
    np.exp(x, out=x)
    cdf = np.cumsum(x)
    u = rng.random() * cdf[-1]
    return int(min(np.searchsorted(cdf, u, side="right"), len(cdf) - 1))
