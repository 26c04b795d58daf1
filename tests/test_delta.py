"""Tests for adapters/delta.py: property tests of the delta maths (hypothesis), hand-computed
weighted means and the LoRA factor-averaging error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edgetune.adapters.delta import add, clip, global_norm, lora_product_error, scale, subtract, weighted_mean
from edgetune.adapters.lora import init_adapter

SHAPES = {"layer.lora_A.weight": (2, 3), "layer.lora_B.weight": (3, 2), "bias": (4,)}
FLOATS = st.floats(-100, 100, width=32, allow_nan=False, allow_infinity=False)
WEIGHTS = st.floats(0.01, 100, allow_nan=False, allow_infinity=False)
PROPS = settings(max_examples=50, deadline=None)


@st.composite
def states(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(draw(arrays(np.float32, s, elements=FLOATS))) for k, s in SHAPES.items()}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=atol)


def _copy(s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in s.items()}


# --- subtract / add / scale --------------------------------------------------------------


@PROPS
@given(a=states(), b=states())
def test_subtract_and_add_are_inverse(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    a0, b0 = _copy(a), _copy(b)
    _close(add(b, subtract(a, b)), a)
    _close(subtract(add(a, b), b), a)
    assert all(torch.equal(subtract(a, a)[k], torch.zeros(SHAPES[k])) for k in a)
    # Pure functions: inputs unchanged.
    assert all(torch.equal(a[k], a0[k]) and torch.equal(b[k], b0[k]) for k in a)


@PROPS
@given(a=states(), factor=st.floats(-10, 10))
def test_scale_matches_elementwise_product(a: dict[str, torch.Tensor], factor: float) -> None:
    out = scale(a, factor)
    assert all(torch.equal(out[k], a[k] * factor) for k in a)


def test_mismatched_keys_and_shapes_raise() -> None:
    a = {"x": torch.zeros(2), "y": torch.zeros(3)}
    with pytest.raises(KeyError, match="'y'"):
        subtract(a, {"x": torch.zeros(2)})
    with pytest.raises(KeyError):
        add(a, {"x": torch.zeros(2), "z": torch.zeros(3)})
    with pytest.raises(ValueError, match="'y'.*\\(3,\\) vs \\(4,\\)"):
        add(a, {"x": torch.zeros(2), "y": torch.zeros(4)})


# --- weighted mean -----------------------------------------------------------------------


def test_weighted_mean_hand_computed() -> None:
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([3.0, 6.0])}
    c = {"w": torch.tensor([100.0, -100.0])}
    # (1*[1,2] + 3*[3,6]) / 4 = [10, 20] / 4; a zero weight leaves c out.
    assert weighted_mean([a, b], [1.0, 3.0])["w"].tolist() == [2.5, 5.0]
    assert weighted_mean([a, b, c], [1.0, 3.0, 0.0])["w"].tolist() == [2.5, 5.0]
    # (2*1 + 1*3 + 1*100) / 4 = 26.25 and (2*2 + 6 - 100) / 4 = -22.5
    assert weighted_mean([a, b, c], [2, 1, 1])["w"].tolist() == [26.25, -22.5]
    assert weighted_mean([a, b, c], [2, 1, 1])["w"].dtype == torch.float32


@PROPS
@given(s=states(), weights=st.lists(WEIGHTS, min_size=1, max_size=5))
def test_weighted_mean_of_identical_states_is_the_state(s: dict[str, torch.Tensor], weights: list[float]) -> None:
    _close(weighted_mean([s] * len(weights), weights), s, atol=1e-5)


@PROPS
@given(
    data=st.data(),
    n=st.integers(1, 5),
    factor=st.floats(1e-3, 1e3),
)
def test_weighted_mean_is_invariant_to_weight_scaling_and_order(data: st.DataObject, n: int, factor: float) -> None:
    ss = [data.draw(states()) for _ in range(n)]
    ws = data.draw(st.lists(WEIGHTS, min_size=n, max_size=n))
    ref = weighted_mean(ss, ws)
    _close(weighted_mean(ss, [w * factor for w in ws]), ref)
    order = data.draw(st.permutations(range(n)))
    _close(weighted_mean([ss[i] for i in order], [ws[i] for i in order]), ref)


@PROPS
@given(data=st.data(), n=st.integers(1, 4))
def test_weighted_mean_lies_within_the_inputs(data: st.DataObject, n: int) -> None:
    ss = [data.draw(states()) for _ in range(n)]
    ws = data.draw(st.lists(WEIGHTS, min_size=n, max_size=n))
    out = weighted_mean(ss, ws)
    for k in out:
        lo, hi = ss[0][k], ss[0][k]
        for s in ss[1:]:
            lo, hi = torch.minimum(lo, s[k]), torch.maximum(hi, s[k])
        assert bool((out[k] >= lo - 1e-4).all()) and bool((out[k] <= hi + 1e-4).all())


@pytest.mark.parametrize(
    "weights",
    [[1.0], [1.0, 2.0, 3.0], [-1.0, 2.0], [0.0, 0.0], [math.nan, 1.0], [math.inf, 1.0]],
)
def test_weighted_mean_rejects_bad_weights(weights: list[float]) -> None:
    s = {"w": torch.ones(2)}
    with pytest.raises(ValueError):
        weighted_mean([s, s], weights)


def test_weighted_mean_rejects_no_states_and_mismatched_keys() -> None:
    with pytest.raises(ValueError):
        weighted_mean([], [])
    with pytest.raises(KeyError):
        weighted_mean([{"w": torch.ones(2)}, {"v": torch.ones(2)}], [1.0, 1.0])
    with pytest.raises(ValueError):
        weighted_mean([{"w": torch.ones(2)}, {"w": torch.ones(3)}], [1.0, 1.0])


# --- norm and clip -----------------------------------------------------------------------


@PROPS
@given(a=states())
def test_global_norm_matches_concatenated_norm(a: dict[str, torch.Tensor]) -> None:
    ref = float(torch.cat([v.double().reshape(-1) for v in a.values()]).norm())
    assert math.isclose(global_norm(a), ref, rel_tol=1e-12, abs_tol=1e-12)


def test_global_norm_hand_computed() -> None:
    assert global_norm({"x": torch.tensor([3.0]), "y": torch.tensor([[4.0, 12.0]])}) == 13.0


@PROPS
@given(a=states(), max_norm=st.floats(1e-3, 1e4))
def test_clip_bounds_the_norm_and_keeps_direction(a: dict[str, torch.Tensor], max_norm: float) -> None:
    norm = global_norm(a)
    out = clip(a, max_norm)
    assert global_norm(out) <= max_norm * (1 + 1e-6)
    if norm <= max_norm:
        assert all(torch.equal(out[k], a[k]) for k in a)  # short deltas are left alone
    else:
        assert math.isclose(global_norm(out), max_norm, rel_tol=1e-5)
        _close(out, scale(a, max_norm / norm), atol=1e-6)


def test_clip_hand_computed_and_rejects_non_positive_bound() -> None:
    a = {"x": torch.tensor([3.0, 4.0])}
    assert clip(a, 1.0)["x"].tolist() == pytest.approx([0.6, 0.8])
    assert clip(a, 5.0)["x"].tolist() == [3.0, 4.0]
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="max_norm"):
            clip(a, bad)


# --- LoRA factor-averaging error ---------------------------------------------------------


def test_lora_product_error_hand_computed() -> None:
    # One layer, r = in = out = 1: A0 = 1, B0 = 0.
    # Device 1: A = 2, B = 1 (BA = 2); device 2: A = 1, B = 3 (BA = 3); equal weights.
    # mean(BA) = 2.5; mean(B) mean(A) = 2 * 1.5 = 3; error 0.5 over ||2.5 - 0|| -> 0.2.
    base = {"l.lora_A.weight": torch.tensor([[1.0]]), "l.lora_B.weight": torch.tensor([[0.0]])}
    deltas = [
        {"l.lora_A.weight": torch.tensor([[1.0]]), "l.lora_B.weight": torch.tensor([[1.0]])},
        {"l.lora_A.weight": torch.tensor([[0.0]]), "l.lora_B.weight": torch.tensor([[3.0]])},
    ]
    assert lora_product_error(base, deltas, [1.0, 1.0]) == pytest.approx(0.2, abs=1e-12)
    # Weights 3:1 -> mean(BA) = (6 + 3)/4 = 2.25; mean(B) = 1.5, mean(A) = 1.75 -> 2.625.
    assert lora_product_error(base, deltas, [3.0, 1.0]) == pytest.approx(0.375 / 2.25, abs=1e-12)


def _random_deltas(shapes: dict[str, tuple[int, ...]], n: int, with_a: bool) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [
        {k: torch.randn(s, generator=gen) * 0.1 for k, s in shapes.items() if with_a or ".lora_B." in k}
        for _ in range(n)
    ]


def test_lora_product_error_is_zero_for_b_only_deltas(tiny_shapes: dict[str, tuple[int, ...]]) -> None:
    base = init_adapter(tiny_shapes, seed=0)
    deltas = _random_deltas(tiny_shapes, 4, with_a=False)
    assert lora_product_error(base, deltas, [1.0, 2.0, 3.0, 4.0]) < 1e-6


def test_lora_product_error_is_clearly_positive_for_both_factors(tiny_shapes: dict[str, tuple[int, ...]]) -> None:
    base = init_adapter(tiny_shapes, seed=0)
    deltas = _random_deltas(tiny_shapes, 4, with_a=True)
    assert lora_product_error(base, deltas, [1.0, 2.0, 3.0, 4.0]) > 0.05


def test_lora_product_error_is_zero_without_any_update(tiny_shapes: dict[str, tuple[int, ...]]) -> None:
    base = init_adapter(tiny_shapes, seed=0)
    assert lora_product_error(base, [{}, {}], [1.0, 1.0]) == 0.0
