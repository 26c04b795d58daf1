"""Robust aggregation: combining deltas when some devices may be broken or malicious.

Each aggregator is a pure function of the round's decoded deltas ``d_1..d_n`` (one
``dict[str, Tensor]`` each, flattened in sorted-key order into rows of an ``(n, D)`` float64
matrix ``X``) and their example counts ``w_i``; it returns the update and which devices it
rejected or clipped (indices into the inputs), for the log and ``metrics.jsonl``:

    mean           sum_i w_i d_i / sum_i w_i                          (FedAvg; the default)
    median         coordinate-wise median (mean of the two middle values when n is even)
    trimmed-mean   per coordinate, drop the k = floor(f n) largest and k smallest, mean the rest
    norm-bound     d_i * min(1, c M / ||d_i||), M = median_i ||d_i||; then the weighted mean
    multi-krum     score_i = sum of squared distances to its n - k - 2 nearest others
                   (k = floor(f n)); the weighted mean of the n - k lowest scores
    centered-clip  v <- v + sum_i w_i (d_i - v) min(1, tau / ||d_i - v||) / sum_i w_i,
                   three times from v = the coordinate median; tau = c * median_i ||d_i - v0||

``f`` is ``federation.byzantine-fraction`` and ``c`` is ``federation.clip-multiple``. Median,
trimmed mean, multi-Krum (Blanchard et al. 2017), norm bounding (Sun et al. 2019) and centered
clipping (Karimireddy et al. 2021) are the usual names; the code follows the formulas above.

Example:
    >>> import torch
    >>> deltas = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, {"w": torch.tensor([90.0])}]
    >>> aggregate("median", deltas, [1.0, 1.0, 1.0], 0.2, 2.0).update["w"].tolist()
    [2.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from edgetune.config import AGGREGATORS
from edgetune.types import StateDict

__all__ = ["AGGREGATORS", "Aggregate", "aggregate"]

_CENTERED_CLIP_ITERATIONS = 3


@dataclass(frozen=True)
class Aggregate:
    """One round's robust update and what the aggregator did to whom."""

    update: StateDict
    """The aggregate delta (float32, the inputs' keys and shapes)."""
    rejected: list[int] = field(default_factory=list)
    """Indices of deltas left out entirely (multi-Krum)."""
    clipped: list[int] = field(default_factory=list)
    """Indices of deltas scaled down (norm bound, centered clipping)."""


def _stack(deltas: Sequence[StateDict]) -> tuple[Tensor, list[str]]:
    keys = sorted(deltas[0])
    for d in deltas:
        if sorted(d) != keys:
            raise KeyError(f"deltas differ in their tensors: {sorted(set(d) ^ set(keys))[:3]}")
    rows = [torch.cat([d[k].reshape(-1).double() for k in keys]) for d in deltas]
    return torch.stack(rows), keys  # (n, D)


def _unstack(vector: Tensor, like: StateDict, keys: list[str]) -> StateDict:
    out, start = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vector[start : start + n].reshape(like[k].shape).float()
        start += n
    return out


def _weighted(x: Tensor, weights: Tensor) -> Tensor:
    return (weights[:, None] * x).sum(0) / weights.sum()


def _median(x: Tensor) -> Tensor:
    ordered = x.sort(dim=0).values
    n = x.shape[0]
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def _trimmed_mean(x: Tensor, fraction: float) -> Tensor:
    n = x.shape[0]
    k = min(int(math.floor(fraction * n)), (n - 1) // 2)
    return x.sort(dim=0).values[k : n - k].mean(0)


def _norm_bound(x: Tensor, w: Tensor, multiple: float) -> tuple[Tensor, list[int]]:
    norms = x.norm(dim=1)
    bound = multiple * float(_median(norms[:, None])[0])
    factors = torch.clamp(bound / norms.clamp_min(1e-300), max=1.0)
    clipped = [i for i, f in enumerate(factors.tolist()) if f < 1.0]
    return _weighted(x * factors[:, None], w), clipped


def _multi_krum(x: Tensor, w: Tensor, fraction: float) -> tuple[Tensor, list[int]]:
    n = x.shape[0]
    k = min(int(math.floor(fraction * n)), max(n - 3, 0))  # Krum needs n > 2k + 2 neighbours to score
    neighbours = max(n - k - 2, 1)
    distances = torch.cdist(x, x).square()  # (n, n)
    # The nearest n-k-2 others (skip the zero distance to itself, sorted first).
    scores = distances.sort(dim=1).values[:, 1 : neighbours + 1].sum(1) if n > 1 else torch.zeros(1)
    keep = sorted(torch.argsort(scores, stable=True)[: n - k].tolist())
    rejected = sorted(set(range(n)) - set(keep))
    return _weighted(x[keep], w[keep]), rejected


def _centered_clip(x: Tensor, w: Tensor, multiple: float) -> tuple[Tensor, list[int]]:
    v = _median(x)
    tau = multiple * float(_median((x - v).norm(dim=1)[:, None])[0])
    if tau <= 0:  # at least half the deltas sit on the median: it is the answer
        return v, []
    for _ in range(_CENTERED_CLIP_ITERATIONS):
        diff = x - v
        factors = torch.clamp(tau / diff.norm(dim=1).clamp_min(1e-300), max=1.0)
        v = v + _weighted(diff * factors[:, None], w)
    clipped = [i for i, f in enumerate(factors.tolist()) if f < 1.0]
    return v, clipped


def aggregate(
    name: str, deltas: Sequence[StateDict], weights: Sequence[float], fraction: float, multiple: float
) -> Aggregate:
    """Combine ``deltas`` (weighted by ``weights``) with aggregator ``name``.

    Args:
        name: One of :data:`AGGREGATORS`.
        deltas: The round's decoded deltas, same keys and shapes.
        weights: Example counts (``median`` and ``trimmed-mean`` ignore them).
        fraction: ``f``, the share of deltas assumed malicious (trimmed mean, multi-Krum).
        multiple: ``c``, the clipping radius in units of the round's median (norm bound,
            centered clipping).

    Returns:
        The update (float32) and the indices rejected or clipped.

    Raises:
        ValueError: an unknown name, no deltas, or weights that do not match.
    """
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; known: {', '.join(AGGREGATORS)}")
    if not deltas or len(weights) != len(deltas) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"need deltas with one non-negative weight each, got {len(deltas)} and {list(weights)}")
    x, keys = _stack(deltas)
    w = torch.tensor(list(weights), dtype=torch.float64)
    rejected: list[int] = []
    clipped: list[int] = []
    if name == "mean":
        vector = _weighted(x, w)
    elif name == "median":
        vector = _median(x)
    elif name == "trimmed-mean":
        vector = _trimmed_mean(x, fraction)
    elif name == "norm-bound":
        vector, clipped = _norm_bound(x, w, multiple)
    elif name == "multi-krum":
        vector, rejected = _multi_krum(x, w, fraction)
    else:
        vector, clipped = _centered_clip(x, w, multiple)
    return Aggregate(_unstack(vector, deltas[0], keys), rejected, clipped)
