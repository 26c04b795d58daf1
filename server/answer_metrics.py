"""Scores of generated answers against reference answers, and bootstrap confidence intervals.

Pure functions of strings and arrays (no model):

    rouge_l          ROUGE-L F1 (longest common subsequence), Google's ``rouge-score`` package
    exact_match      1.0 if the SQuAD-normalised strings are equal, else 0.0
    token_f1         SQuAD token-overlap F1 of the normalised strings
    score_answers    all three for aligned lists of predictions and references
    bootstrap_ci     seeded percentile bootstrap interval of a mean (``scipy.stats.bootstrap``)

SQuAD normalisation (Rajpurkar et al., 2016, the official evaluation script): lower case,
drop punctuation, drop the articles "a", "an", "the", collapse white space. Example::

    >>> normalize_answer("The  Cat, sat!")
    'cat sat'
    >>> token_f1("the cat sat", "a cat sat down")  # common {cat, sat}: P = 2/2, R = 2/3
    0.8

ROUGE-L uses ``rouge-score``'s own tokenizer (lower case, runs of ``[a-z0-9]``) without
stemming, so nothing is downloaded; text with no such characters scores 0.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

__all__ = ["METRICS", "bootstrap_ci", "exact_match", "normalize_answer", "rouge_l", "score_answers", "token_f1"]

METRICS = ("rouge_l", "exact_match", "token_f1")
"""Per-answer metric names, in table order."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall of shared normalised tokens.

    Shared tokens count with multiplicity (a multiset intersection). Two empty answers score
    1.0; one empty answer scores 0.0.
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _rouge_scorer():  # noqa: ANN202 - rouge_score has no type hints
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one answer against one reference (0.0 when either has no tokens)."""
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def score_answers(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """Every metric of ``METRICS`` for each (prediction, reference) pair.

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = _rouge_scorer()
    return {
        "rouge_l": [float(scorer.score(r, p)["rougeL"].fmeasure) for p, r in zip(predictions, references, strict=True)],
        "exact_match": [exact_match(p, r) for p, r in zip(predictions, references, strict=True)],
        "token_f1": [token_f1(p, r) for p, r in zip(predictions, references, strict=True)],
    }


def bootstrap_ci(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling with replacement).

    Uses ``scipy.stats.bootstrap`` with a generator seeded by ``seed``, so equal inputs give
    equal intervals. With fewer than two values, or all values equal, the interval is the
    mean itself.

    Raises:
        ValueError: ``values`` is empty, or ``confidence`` is not in (0, 1).
    """
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("bootstrap_ci needs at least one value, got none")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(data.mean())
    if data.size < 2 or np.all(data == data[0]):
        return mean, mean
    result = bootstrap(
        (data,),
        np.mean,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
