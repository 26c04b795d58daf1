"""Robust aggregators (server/robust.py) against hand-computed expectations."""

from __future__ import annotations

import pytest
import torch

from edgetune.server.robust import AGGREGATORS, aggregate


def _deltas(values: list[list[float]]) -> list[dict[str, torch.Tensor]]:
    """One delta per row: the first value in tensor "a" (1, 1), the rest in "b" (n,)."""
    return [{"a": torch.tensor([[v[0]]]), "b": torch.tensor(v[1:])} for v in values]


def _flat(update: dict[str, torch.Tensor]) -> list[float]:
    return [*update["a"].reshape(-1).tolist(), *update["b"].tolist()]


def test_mean_is_fedavg_weighted_by_examples() -> None:
    out = aggregate("mean", _deltas([[1, 0], [2, 4], [90, 8]]), [1, 1, 2], 0.0, 1.0)
    assert _flat(out.update) == pytest.approx([(1 + 2 + 180) / 4, (0 + 4 + 16) / 4])
    assert out.rejected == [] and out.clipped == []


def test_median_odd_and_even() -> None:
    odd = aggregate("median", _deltas([[1, -5], [2, 7], [90, 0]]), [1, 1, 1], 0.0, 1.0)
    assert _flat(odd.update) == [2.0, 0.0]
    even = aggregate("median", _deltas([[1, 0], [2, 5], [3, 6], [90, 100]]), [1, 5, 1, 1], 0.0, 1.0)
    assert _flat(even.update) == [2.5, 5.5]  # middle pair's mean; weights do not count


def test_trimmed_mean_drops_k_largest_and_smallest_per_coordinate() -> None:
    # f = 0.25 of n = 4: k = 1 off each end, per coordinate independently.
    out = aggregate("trimmed-mean", _deltas([[1, 2], [2, -100], [3, 0], [90, 1]]), [1, 1, 1, 1], 0.25, 1.0)
    assert _flat(out.update) == [2.5, 0.5]


def test_norm_bound_clips_to_a_multiple_of_the_median_norm() -> None:
    # Norms 5, 1, 2: median 2, bound 1.5 * 2 = 3, so [3, 4] becomes [1.8, 2.4].
    out = aggregate("norm-bound", _deltas([[3, 4], [0, 1], [0, 2]]), [1, 1, 1], 0.0, 1.5)
    assert _flat(out.update) == pytest.approx([0.6, 1.8])
    assert out.clipped == [0] and out.rejected == []


def test_multi_krum_rejects_the_far_delta() -> None:
    # n = 4, f = 0.25: k = 1, scores over n - k - 2 = 1 nearest other: 1, 1, 1, 98**2.
    out = aggregate("multi-krum", _deltas([[0, 0], [1, 0], [2, 0], [100, 0]]), [1, 1, 2, 1], 0.25, 1.0)
    assert _flat(out.update) == pytest.approx([(0 + 1 + 4) / 4, 0.0])  # weighted mean of the kept three
    assert out.rejected == [3]


def test_centered_clip_stays_at_the_honest_centre() -> None:
    # v0 = median 1.5; distances 1.5, 0.5, 0.5, 98.5, median 1.0, so tau = 1. Clipped
    # differences -1, -0.5, 0.5, 1 average to 0: v stays at 1.5 every iteration.
    out = aggregate("centered-clip", _deltas([[0, 0], [1, 0], [2, 0], [100, 0]]), [1, 1, 1, 1], 0.0, 1.0)
    assert _flat(out.update) == pytest.approx([1.5, 0.0])
    assert out.clipped == [0, 3]


@pytest.mark.parametrize("name", AGGREGATORS)
def test_identical_deltas_aggregate_to_themselves(name: str) -> None:
    deltas = _deltas([[0.5, -1.0, 2.0]] * 5)
    out = aggregate(name, deltas, [1, 2, 3, 4, 5], 0.2, 2.0)
    assert _flat(out.update) == pytest.approx([0.5, -1.0, 2.0])
    assert out.update["a"].dtype == torch.float32 and out.update["a"].shape == (1, 1)
    assert out.rejected == [] if name != "multi-krum" else len(out.rejected) == 1  # Krum drops k = 1 of 5


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown aggregator 'krum'"):
        aggregate("krum", _deltas([[1, 2]]), [1], 0.0, 1.0)
    with pytest.raises(ValueError, match="one non-negative weight each"):
        aggregate("mean", _deltas([[1, 2]]), [1, 1], 0.0, 1.0)
    with pytest.raises(KeyError, match="differ"):
        aggregate("mean", [{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1], 0.0, 1.0)


def test_robust_aggregation_is_refused_under_dp() -> None:
    from edgetune.config import ConfigError, from_flat

    with pytest.raises(ConfigError, match="federation.aggregator='median': must be mean under dp.enabled"):
        from_flat({"dp.enabled": True, "federation.aggregator": "median"})
    with pytest.raises(ConfigError, match="federation.aggregator='krum'"):
        from_flat({"federation.aggregator": "krum"})
