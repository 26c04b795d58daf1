"""Answer metrics against hand-computed values (server/answer_metrics.py)."""

from __future__ import annotations

import pytest

from edgetune.server.answer_metrics import (
    bootstrap_ci,
    exact_match,
    normalize_answer,
    rouge_l,
    score_answers,
    token_f1,
)


def test_normalize_answer_drops_case_punctuation_articles_and_spaces() -> None:
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("An apple; a pear.") == "apple pear"
    assert normalize_answer("theory") == "theory"  # "the" only as a whole word


def test_exact_match_after_normalisation() -> None:
    assert exact_match("The answer.", "answer") == 1.0
    assert exact_match("an answer", "answers") == 0.0


def test_token_f1_hand_computed() -> None:
    # pred {cat, sat}, ref {cat, sat, down}: P = 2/2, R = 2/3, F1 = 2 * 1 * 2/3 / (5/3) = 0.8
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # multiset: pred [yes, yes, no], ref [yes, no, no]: common {yes: 1, no: 1} = 2, P = R = 2/3
    assert token_f1("yes yes no", "yes no no") == pytest.approx(2 / 3)
    assert token_f1("red", "blue") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("the", "cat") == 0.0  # the prediction normalises to nothing


def test_rouge_l_hand_computed() -> None:
    # LCS of "the cat sat on the mat" / "the cat is on the mat" is "the cat on the mat": 5 of 6 each way
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS "a c": P = 2/4, R = 2/2, F = 2 * 0.5 * 1 / 1.5 = 2/3
    assert rouge_l("a b c d", "a c") == pytest.approx(2 / 3)
    assert rouge_l("Hello, World!", "hello world") == 1.0  # lower case, punctuation dropped, no stemming
    assert rouge_l("running", "run") == 0.0
    assert rouge_l("", "anything") == 0.0


def test_score_answers_aligns_pairs() -> None:
    scores = score_answers(["the cat sat", "no"], ["a cat sat down", "No."])
    assert scores["exact_match"] == [0.0, 1.0]
    assert scores["token_f1"] == pytest.approx([0.8, 1.0])
    # ROUGE-L keeps articles: LCS "cat sat" of 3 and 4 tokens, P = 2/3, R = 2/4, F = 4/7
    assert scores["rouge_l"] == pytest.approx([4 / 7, 1.0])
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        score_answers(["a", "b"], ["a"])


def test_bootstrap_ci_cases() -> None:
    assert bootstrap_ci([0.5]) == (0.5, 0.5)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)
    # resample means of [0, 1] are 0, 0.5, 1 with probability 1/4, 1/2, 1/4: the 2.5% and
    # 97.5% percentiles of 1000 resamples are 0 and 1 (a quarter of the draws sit at each end)
    assert bootstrap_ci([0.0, 1.0], resamples=1000, seed=3) == (0.0, 1.0)
    values = [0.1, 0.4, 0.35, 0.8, 0.9, 0.2, 0.55]
    low, high = bootstrap_ci(values, seed=7)
    assert low < sum(values) / len(values) < high
    assert bootstrap_ci(values, seed=7) == (low, high)  # seeded: the same interval again
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=1.5)
