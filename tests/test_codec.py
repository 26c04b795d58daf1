"""Tests for adapters/codec.py: fp32/fp16/1-bit round trips, hand-computed 1-bit payloads,
byte counts, error feedback, payload validation and the grid rule of ``apply_update``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetune.adapters.codec import (
    CodecError,
    apply_update,
    compress,
    decode,
    encode,
    expected_payload_bytes,
    full_codec,
    grid_dtype,
    payload_bytes,
    raw_bytes,
)

SMOLLM2_B_SHAPES = {"q_proj.B": (576, 8), "k_proj.B": (192, 8), "up_proj.B": (1536, 8)}


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), (3, 7), (7, 3), (4, 4), (2, 3, 4)])
def test_fp32_round_trip_is_exact(shape: tuple[int, ...]) -> None:
    state = {"w": _randn(*shape)}
    out = decode(encode(state, "fp32"), _shapes(state), "fp32")
    assert torch.equal(out["w"], state["w"])
    assert out["w"].dtype == torch.float32


def test_fp16_round_trip_is_exact_on_fp16_values() -> None:
    state = {"a": _randn(8, 3).half().float(), "b": (_randn(3, 8, seed=1) * 1e3).half().float()}
    out = decode(encode(state, "fp16"), _shapes(state), "fp16")
    for k in state:
        assert torch.equal(out[k], state[k])


def test_fp16_round_trip_rounds_other_values_to_nearest_fp16() -> None:
    state = {"w": _randn(6, 5)}
    out = decode(encode(state, "fp16"), _shapes(state), "fp16")
    assert torch.equal(out["w"], state["w"].half().float())


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 12),
    cols=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_1bit_preserves_signs_and_scales_keep_the_projection(rows: int, cols: int, seed: int) -> None:
    t = _randn(rows, cols, seed=seed)
    out = decode(encode({"w": t}, "1bit"), {"w": (rows, cols)}, "1bit")["w"]
    # Sign: x >= 0 decodes non-negative, x < 0 negative (scales of random data are > 0).
    assert torch.equal(out >= 0, t >= 0)
    assert torch.equal(out < 0, t < 0)
    # Rows run along the longer axis: one scale per index of the shorter one.
    dim = 1 if rows <= cols else 0
    scale = (t * t).sum(dim=dim, keepdim=True) / t.abs().sum(dim=dim, keepdim=True)
    assert torch.equal(out.abs(), scale.half().float().expand_as(t))
    # The decoded row has the same projection onto the row as the row itself (up to fp16).
    torch.testing.assert_close((out * t).sum(dim=dim), (t * t).sum(dim=dim), rtol=2e-3, atol=1e-6)


def test_1bit_lora_b_gets_rank_scales_and_lora_a_too() -> None:
    b, a = _randn(64, 4), _randn(4, 128, seed=1)
    payload = encode({"B": b, "A": a}, "1bit")
    assert payload["B:scales"].shape == (4,)
    assert payload["A:scales"].shape == (4,)
    b_scales = (b * b).sum(dim=0) / b.abs().sum(dim=0)
    a_scales = (a * a).sum(dim=1) / a.abs().sum(dim=1)
    np.testing.assert_array_equal(payload["B:scales"], b_scales.numpy().astype(np.float16))
    np.testing.assert_array_equal(payload["A:scales"], a_scales.numpy().astype(np.float16))


def test_1bit_hand_computed_wide_tensor() -> None:
    # Rows along axis 1 (length 3): ||x||^2 / ||x||_1 = (1+1+4)/4 = 1.5 and (4+4+16)/8 = 3.
    t = torch.tensor([[1.0, -1.0, 2.0], [-2.0, 2.0, 4.0]])
    payload = encode({"w": t}, "1bit")
    np.testing.assert_array_equal(payload["w:scales"], np.array([1.5, 3.0], dtype=np.float16))
    # Signs (x >= 0) row by row: 1 0 1 | 0 1 1 | pad 0 0  ->  0b10101100.
    np.testing.assert_array_equal(payload["w:bits"], np.array([0b10101100], dtype=np.uint8))
    out = decode(payload, {"w": (2, 3)}, "1bit")["w"]
    assert out.tolist() == [[1.5, -1.5, 1.5], [-3.0, 3.0, 3.0]]


def test_1bit_hand_computed_lora_b_shape() -> None:
    # B (out=4, r=2): one scale per column: (1+1+4+0)/4 = 1.5 and (9+1+1+9)/8 = 2.5.
    t = torch.tensor([[1.0, -3.0], [-1.0, 1.0], [2.0, -1.0], [0.0, 3.0]])
    payload = encode({"B": t}, "1bit")
    np.testing.assert_array_equal(payload["B:scales"], np.array([1.5, 2.5], dtype=np.float16))
    # Column 0 signs 1 0 1 1, column 1 signs 0 1 0 1 -> 0b10110101.
    np.testing.assert_array_equal(payload["B:bits"], np.array([0b10110101], dtype=np.uint8))
    out = decode(payload, {"B": (4, 2)}, "1bit")["B"]
    assert out.tolist() == [[1.5, -2.5], [-1.5, 2.5], [1.5, -2.5], [1.5, 2.5]]


def test_2bit_hand_computed_row() -> None:
    # One row (1 x 4): mean |x| = 3, so only 6 is "high". Group means 2 and 6; the
    # projection <q, x> = 2*6 + 6*6 = 48 against ||x||^2 = 50 scales both by 50/48.
    t = torch.tensor([[1.0, -2.0, 3.0, -6.0]])
    payload = encode({"w": t}, "2bit")
    np.testing.assert_array_equal(payload["w:scales"], np.array([2 * 50 / 48, 6 * 50 / 48], dtype=np.float16))
    # Sign bits 1 0 1 0 (pad) then magnitude bits 0 0 0 1 (pad): one byte each.
    np.testing.assert_array_equal(payload["w:bits"], np.array([0b10100000, 0b00010000], dtype=np.uint8))
    out = decode(payload, {"w": (1, 4)}, "2bit")["w"]
    lo, hi = (float(v) for v in payload["w:scales"].astype(np.float32))
    assert out.tolist() == [[lo, -lo, lo, -hi]]
    assert payload_bytes(payload) == expected_payload_bytes({"w": (1, 4)}, "2bit") == 2 + 4


@given(rows=st.integers(1, 12), cols=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_2bit_keeps_signs_and_the_projection_with_less_error_than_1bit(rows: int, cols: int, seed: int) -> None:
    t = _randn(rows, cols, seed=seed)
    out = {c: decode(encode({"w": t}, c), {"w": (rows, cols)}, c)["w"] for c in ("1bit", "2bit")}
    assert torch.equal(out["2bit"] >= 0, t >= 0)
    dim = 1 if rows <= cols else 0
    torch.testing.assert_close((out["2bit"] * t).sum(dim=dim), (t * t).sum(dim=dim), rtol=2e-3, atol=1e-6)
    # At most two magnitudes per row (one where all are alike).
    along = out["2bit"].abs() if dim == 1 else out["2bit"].abs().t()
    assert all(len(set(row.tolist())) <= 2 for row in along)
    # Never more error than 1-bit's (up to fp16 rounding of the scales).
    assert (out["2bit"] - t).norm() <= (out["1bit"] - t).norm() * (1 + 1e-3) + 1e-6


def test_2bit_on_a_lora_b_has_a_third_of_1bits_error_at_twice_the_bytes() -> None:
    b = _randn(576, 8)
    errors = {c: float((compress({"B": b}, None, c)[2]["B"].norm() / b.norm()) ** 2) for c in ("1bit", "2bit")}
    assert errors["2bit"] < errors["1bit"] / 3
    sizes = {c: payload_bytes(encode({"B": b}, c)) for c in ("1bit", "2bit")}
    assert sizes == {"1bit": 576 + 16, "2bit": 2 * (576 + 16)}


def test_decode_rejects_bad_2bit_payloads() -> None:
    state = {"B": _randn(16, 4)}
    good = encode(state, "2bit")
    decode(good, _shapes(state), "2bit")
    cases = [
        ({**good, "B:bits": good["B:bits"][:8]}, "shape"),  # the magnitude bits cut off
        ({**good, "B:scales": good["B:scales"][:4]}, "shape"),  # one level per row
        ({**good, "B:scales": -good["B:scales"]}, "negative"),
        (encode(state, "1bit"), "shape"),
    ]
    for bad, message in cases:
        with pytest.raises(CodecError, match=message):
            decode(bad, _shapes(state), "2bit")


def test_docstring_example() -> None:
    p = encode({"w": torch.tensor([[0.5, -1.5]])}, "1bit")
    assert decode(p, {"w": (1, 2)}, "1bit")["w"].tolist() == [[1.25, -1.25]]


def test_encode_rejects_non_finite_and_unknown_codec() -> None:
    with pytest.raises(CodecError, match="'w'"):
        encode({"w": torch.tensor([1.0, float("nan")])}, "1bit")
    with pytest.raises(CodecError, match="'w'"):
        encode({"w": torch.tensor([1.0, float("inf")])}, "fp16")
    with pytest.raises(CodecError, match="bf8"):
        encode({"w": torch.zeros(2)}, "bf8")


def test_encode_does_not_mutate_input() -> None:
    t = _randn(4, 6)
    before = t.clone()
    encode({"w": t}, "1bit")
    assert torch.equal(t, before)


# --- bytes -------------------------------------------------------------------------------


def test_1bit_payload_bytes_of_576_by_8() -> None:
    payload = encode({"B": _randn(576, 8)}, "1bit")
    assert payload["B:bits"].nbytes == 576  # 576 * 8 bits
    assert payload["B:scales"].nbytes == 8 * 2  # 8 fp16 scales
    assert payload_bytes(payload) == 576 + 16


def test_fp_payload_bytes() -> None:
    state = {"B": _randn(576, 8)}
    assert payload_bytes(encode(state, "fp32")) == 576 * 8 * 4 == raw_bytes(_shapes(state))
    assert payload_bytes(encode(state, "fp16")) == 576 * 8 * 2 == raw_bytes(_shapes(state), itemsize=2)


@pytest.mark.parametrize("name", sorted(SMOLLM2_B_SHAPES))
def test_1bit_compression_ratio_at_least_25x_for_smollm2_lora_b(name: str) -> None:
    shapes = {name: SMOLLM2_B_SHAPES[name]}
    payload = encode({name: _randn(*shapes[name])}, "1bit")
    assert raw_bytes(shapes) / payload_bytes(payload) >= 25


def test_1bit_compression_ratio_of_smollm2_adapter_both_directions() -> None:
    b_shapes = SMOLLM2_B_SHAPES
    a_shapes = {k.replace(".B", ".A"): (8, 576) for k in b_shapes}
    for shapes in (b_shapes, {**b_shapes, **a_shapes}):
        payload = encode({k: _randn(*s) for k, s in shapes.items()}, "1bit")
        assert raw_bytes(shapes) / payload_bytes(payload) >= 25


# --- error feedback ----------------------------------------------------------------------


def test_compress_returns_what_the_receiver_decodes() -> None:
    delta, residual = {"B": _randn(32, 4)}, {"B": _randn(32, 4, seed=1) * 0.1}
    payload, decoded, new_residual = compress(delta, residual, "1bit")
    assert torch.equal(decode(payload, {"B": (32, 4)}, "1bit")["B"], decoded["B"])
    torch.testing.assert_close(new_residual["B"], delta["B"] + residual["B"] - decoded["B"], rtol=0, atol=0)


@pytest.mark.parametrize("codec", ["1bit", "2bit", "fp16", "fp32"])
def test_error_feedback_sum_of_decoded_plus_residual_is_sum_of_deltas(codec: str) -> None:
    residual = None
    sent = torch.zeros(32, 4, dtype=torch.float64)
    true = torch.zeros(32, 4, dtype=torch.float64)
    norms = []
    for t in range(60):
        delta = {"B": _randn(32, 4, seed=t) * 0.01}
        _, decoded, residual = compress(delta, residual, codec)
        sent += decoded["B"].double()
        true += delta["B"].double()
        norms.append(float(residual["B"].norm()))
    # Telescoping: sum_t decoded_t + r_T == sum_t d_t; what was dropped is only the last r.
    torch.testing.assert_close(sent + residual["B"].double(), true, rtol=0, atol=1e-6)
    # The residual stays bounded (about one delta's norm), it does not grow with rounds.
    delta_norm = float((_randn(32, 4) * 0.01).norm())
    assert max(norms) < 2 * delta_norm
    assert max(norms[30:]) < 2 * max(norms[:30]) + 1e-12


def test_error_feedback_recovers_what_1bit_drops_without_it() -> None:
    # A constant delta whose entries differ in size: sign coding alone biases every round.
    delta = {"w": torch.tensor([[1.0, 1.0, 1.0, 0.1]])}
    rounds = 100
    with_ef, without_ef, residual = torch.zeros(1, 4), torch.zeros(1, 4), None
    for _ in range(rounds):
        _, decoded, residual = compress(delta, residual, "1bit")
        with_ef += decoded["w"]
        without_ef += compress(delta, None, "1bit")[1]["w"]
    target = delta["w"] * rounds
    err_with = float((with_ef - target).abs().max())
    err_without = float((without_ef - target).abs().max())
    assert err_without > 60  # (0.775 - 0.1) * 100 on the last entry
    assert err_with < 2  # bounded by the final residual
    torch.testing.assert_close(with_ef + residual["w"], target, rtol=0, atol=1e-4)


# --- decode validation -------------------------------------------------------------------


def _good_1bit() -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    state = {"B": _randn(16, 4), "A": _randn(4, 16, seed=1)}
    return encode(state, "1bit"), _shapes(state)


def _drop(p: dict[str, np.ndarray]) -> None:
    del p["B:scales"]


def _extra(p: dict[str, np.ndarray]) -> None:
    p["C:bits"] = p["B:bits"].copy()


def _bits_dtype(p: dict[str, np.ndarray]) -> None:
    p["B:bits"] = p["B:bits"].astype(np.int16)


def _scales_dtype(p: dict[str, np.ndarray]) -> None:
    p["B:scales"] = p["B:scales"].astype(np.float32)


def _bits_shape(p: dict[str, np.ndarray]) -> None:
    p["B:bits"] = np.concatenate([p["B:bits"], p["B:bits"][:1]])


def _scales_shape(p: dict[str, np.ndarray]) -> None:
    p["A:scales"] = p["A:scales"][:-1]


def _nan_scale(p: dict[str, np.ndarray]) -> None:
    p["B:scales"] = p["B:scales"].copy()
    p["B:scales"][1] = np.nan


def _inf_scale(p: dict[str, np.ndarray]) -> None:
    p["A:scales"] = p["A:scales"].copy()
    p["A:scales"][0] = np.inf


def _negative_scale(p: dict[str, np.ndarray]) -> None:
    p["B:scales"] = p["B:scales"].copy()
    p["B:scales"][0] = -1.0


def _not_an_array(p: dict[str, np.ndarray]) -> None:
    p["B:scales"] = p["B:scales"].tolist()  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_drop, "missing"),
        (_extra, "unexpected"),
        (_bits_dtype, "dtype"),
        (_scales_dtype, "dtype"),
        (_bits_shape, "shape"),
        (_scales_shape, "shape"),
        (_nan_scale, "NaN or inf"),
        (_inf_scale, "NaN or inf"),
        (_negative_scale, "negative"),
        (_not_an_array, "dtype"),
    ],
)
def test_decode_rejects_bad_1bit_payloads(corrupt, message: str) -> None:
    payload, shapes = _good_1bit()
    decode(payload, shapes, "1bit")  # the uncorrupted payload is fine
    corrupt(payload)
    with pytest.raises(CodecError, match=message):
        decode(payload, shapes, "1bit")


@pytest.mark.parametrize("codec", ["fp16", "fp32"])
def test_decode_rejects_bad_value_payloads(codec: str) -> None:
    state = {"w": _randn(3, 5)}
    shapes = _shapes(state)
    good = encode(state, codec)
    other = "fp32" if codec == "fp16" else "fp16"
    cases = [
        {},
        {**good, "v:values": good["w:values"]},
        {"w:values": good["w:values"].astype(other.replace("fp", "float"))},
        {"w:values": good["w:values"].reshape(5, 3)},
        {"w:values": np.full((3, 5), np.inf, dtype=good["w:values"].dtype)},
        {"w:bits": np.zeros(2, np.uint8), "w:scales": np.ones(3, np.float16)},
    ]
    for bad in cases:
        with pytest.raises(CodecError):
            decode(bad, shapes, codec)


# --- grid rule ---------------------------------------------------------------------------


def test_grid_and_full_codec() -> None:
    assert grid_dtype("fp32") == torch.float32
    assert grid_dtype("fp16") == grid_dtype("1bit") == torch.float16
    assert full_codec("fp32") == "fp32"
    assert full_codec("fp16") == full_codec("1bit") == "fp16"


@pytest.mark.parametrize("codec", ["1bit", "fp16"])
def test_apply_update_keeps_values_on_the_fp16_grid(codec: str) -> None:
    state = {"A": _randn(4, 16), "B": _randn(16, 4, seed=1)}
    update = decode(encode({"B": _randn(16, 4, seed=2) * 1e-3}, codec), {"B": (16, 4)}, codec)
    out = apply_update(state, update, codec)
    assert torch.equal(out["B"].half().float(), out["B"])
    assert out["B"].dtype == torch.float32
    assert torch.equal(out["B"], (state["B"] + update["B"]).half().float())
    assert out["A"] is state["A"]  # keys the update lacks (a frozen A) are untouched
    again = apply_update(state, update, codec)
    assert all(torch.equal(out[k], again[k]) for k in out)


def test_apply_update_fp32_is_plain_addition() -> None:
    state, update = {"B": _randn(8, 2)}, {"B": _randn(8, 2, seed=1)}
    out = apply_update(state, update, "fp32")
    assert torch.equal(out["B"], state["B"] + update["B"])
    assert torch.equal(state["B"], _randn(8, 2))  # input not mutated
