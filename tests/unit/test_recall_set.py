"""The generated retrieval set behind `aios bench recall`: the same every time, and what its docstring says."""
from __future__ import annotations

from aios.bench.recall_set import describe, recall_set
from aios.managers.memory.bm25 import tokenize

#: words a question may share with its answer without giving it away
FUNCTION_WORDS = {"what", "is", "my", "i", "am", "do", "did", "which", "where", "who", "in", "the", "to", "a", "on",
                  "was", "be", "me", "how", "of", "we", "have", "will", "for", "after", "why", "when"}


def test_the_set_is_the_same_for_a_seed_and_big_enough() -> None:
    first, again = recall_set(), recall_set()
    assert [(c.turns, c.questions) for c in first] == [(c.turns, c.questions) for c in again]
    assert [c.turns for c in recall_set(seed=18)] != [c.turns for c in first]
    d = describe(first)
    assert d["turns"] >= 600 and d["questions"] >= 150
    assert d["keyword_questions"] == d["paraphrase_questions"] == d["questions"] // 2


def test_each_question_points_at_the_persons_turn_and_paraphrases_share_no_content_word() -> None:
    for conv in recall_set():
        names = {turn.split(":", 1)[0] for turn in conv.turns}
        assert len(names) == 2 and "Assistant" in names
        for q in conv.questions:
            answer = conv.turns[q.answer]
            assert not answer.startswith("Assistant:")
            shared = set(tokenize(q.text)) & set(tokenize(answer)) - FUNCTION_WORDS
            if q.kind == "paraphrase":
                assert not shared, (q.text, answer)
            else:
                assert shared, (q.text, answer)
