"""Keyword ranking for the entries an agent holds in RAM: Okapi BM25, scored on the fly.

Tokens: maximal runs of Unicode word characters (`\\w+`) of the casefolded
text. Casefolding is per character (unlike `lower`, which treats a final
sigma by context), so the tokens of a text are the tokens of its pieces
joined at the boundaries, and the scorer can walk the radix tree. Scripts
written without spaces (Chinese, Japanese) give one token per run, as with
SQLite FTS5's unicode61 tokenizer (which also folds diacritics; this does not).

Score of an entry d for the query's distinct terms t:

    idf(t) * tf(t,d) * (k1 + 1) / (tf(t,d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

N, df and avgdl are taken over the agent's entries in RAM. k1 = 1.2 (how
fast repeated occurrences of a term stop adding to the score) and b = 0.75
(how much long entries are penalised) are the usual defaults (Robertson and
Zaragoza 2009; Lucene, Elasticsearch). The idf is Lucene's, never negative,
so a term present in most entries still counts a little rather than
pushing an entry down.

Index or scan? Measured here (`python -m aios.bench.memory_engine index`:
CPython 3.11, 3,000 notes of 40 to 120 Zipf-distributed words, 1.8 MB): an
inverted index (term -> {entry: tf}) held 4.3 bytes of RAM per byte of text
(tracemalloc; 7.0 with a larger vocabulary), i.e. it would take four to seven
times the room of the text itself out of the memory budget, and with
conversation logs (each entry repeating the turns before it) it grows with
the raw bytes, undoing the radix compression. Scoring on the fly cost 21 ms
per MB of stored text per query. So the scorer keeps no index: it walks the
agent's radix tree and tokenizes each *stored* character once per query
(`RadixTree.fold`), so search time grows with the stored bytes, not the raw
bytes: compression makes search faster too (600 conversation-log entries,
9.2 MB raw, 0.55 MB stored: 10 ms a search). (With a storage service, keyword
search over all entries goes to storage's FTS5 index; see store.py.)
"""
from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, NamedTuple, Sequence

from aios.managers.memory.radix import Handle, RadixTree

_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """The terms of `text`, in order."""
    return _WORD.findall(text.casefold())


def query_terms(query: str) -> tuple[str, ...]:
    """The distinct terms of a query, in first-seen order."""
    return tuple(dict.fromkeys(tokenize(query)))


#: English function words: a question is full of them ("What is the capital of France?") and an entry
#: that shares only these with it does not match it. BM25's idf alone cannot tell: in a memory of a
#: few entries "the" is as rare as "france". (The usual English stop list, as Lucene's and NLTK's.)
FUNCTION_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves s t d ll m re ve don didn doesn isn wasn
""".split())


def keyword_terms(terms: Sequence[str]) -> tuple[str, ...]:
    """The terms a keyword hit must contain one of: the query's terms less its function words
    (all of them, if the query has nothing else: "the who" still searches for what it says)."""
    return tuple(t for t in terms if t not in FUNCTION_WORDS) or tuple(terms)


# A node's state while folding the tree: (term frequencies of the query terms in the
# text so far, number of terms closed so far, the unfinished word at the end).
_State = tuple[tuple[int, ...], int, str]


class _TermCounter:
    """Counts query terms and document length along radix-tree paths.

    A word may be cut by an edge ("hel" | "lo world"): the trailing run of word
    characters is carried down to the child and completed there; at a node an
    entry ends at, the carried run is the entry's last term.
    """

    def __init__(self, terms: Sequence[str]) -> None:
        self.terms = tuple(terms)
        self.initial: _State = ((0,) * len(self.terms), 0, "")

    def step(self, state: _State, label: str) -> _State:
        tfs, length, carry = state
        text = carry + label.casefold()
        tokens = _WORD.findall(text)
        carry = ""
        if tokens and _WORD.match(text, len(text) - 1):
            carry = tokens.pop()  # still open: the next label may continue it
        if tokens:
            tfs = tuple(tf + tokens.count(t) for tf, t in zip(tfs, self.terms))
            length += len(tokens)
        return tfs, length, carry

    def finish(self, state: _State) -> tuple[tuple[int, ...], int]:
        tfs, length, carry = state
        if carry:
            tfs = tuple(tf + (carry == t) for tf, t in zip(tfs, self.terms))
            length += 1
        return tfs, length


class TreeCounts(NamedTuple):
    matches: dict[Handle, tuple[tuple[int, ...], int]]  # handles whose text has a query term
    entries: int  # entries in the tree (a handle counts as many entries as end at it)
    total_length: int  # terms in all entries


def count_in_tree(tree: RadixTree, terms: Sequence[str]) -> TreeCounts:
    """Term frequencies and lengths of the texts that contain a query term, and the collection
    figures BM25 needs (N, total length). Keeps nothing for the texts that do not match, so the
    transient memory of a search grows with its matches, not with the agent's entries."""
    counter = _TermCounter(terms)
    matches: dict[Handle, tuple[tuple[int, ...], int]] = {}
    entries = total = 0
    for handle, state in tree.fold(counter.step, counter.initial):
        tfs, length = counter.finish(state)
        entries += handle.refs
        total += length * handle.refs
        if any(tfs):
            matches[handle] = (tfs, length)
    return TreeCounts(matches, entries, total)


def count_in_text(text: str, terms: Sequence[str]) -> tuple[tuple[int, ...], int]:
    """The same figures for one text (the reference the tree walk must agree with)."""
    tokens = tokenize(text)
    return tuple(tokens.count(t) for t in terms), len(tokens)


@dataclass(frozen=True)
class BM25:
    k1: float = 1.2
    b: float = 0.75

    def rank(self, terms: Sequence[str], docs: Iterable[tuple[Hashable, tuple[int, ...], int]], n: int,
             avgdl: float, limit: int,
             tiebreak: Callable[[Hashable], object] | None = None) -> list[tuple[Hashable, float]]:
        """Score `docs` (key, term frequencies in the order of `terms`, length) against the
        terms, in a collection of `n` documents of average length `avgdl`; `docs` must hold
        every document that contains a term (the others score 0 and are not returned). Returns
        the best `limit` as (key, score), best first; ties go to the smaller `tiebreak(key)`
        (default: the key)."""
        docs = list(docs)
        if not docs or not terms or limit <= 0:
            return []
        avgdl = avgdl or 1.0
        df = [0] * len(terms)
        for _, tfs, _ in docs:
            for i, tf in enumerate(tfs):
                if tf:
                    df[i] += 1
        idf = [math.log(1.0 + (n - d + 0.5) / (d + 0.5)) for d in df]
        k1, b = self.k1, self.b
        scored: list[tuple[float, object, Hashable]] = []
        tie = tiebreak or (lambda key: key)
        for key, tfs, length in docs:
            norm = k1 * (1.0 - b + b * length / avgdl)
            score = 0.0
            for i, tf in enumerate(tfs):
                if tf:
                    score += idf[i] * tf * (k1 + 1.0) / (tf + norm)
            if score > 0.0:
                scored.append((score, tie(key), key))
        best = heapq.nsmallest(limit, scored, key=lambda s: (-s[0], s[1]))
        return [(key, score) for score, _, key in best]
