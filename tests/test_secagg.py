"""Secure aggregation core (``adapters/secagg_protocol.py``, ``adapters/secagg_session.py``,
``adapters/secagg_quant.py``): exact sums under dropouts at every stage, refusal below the
threshold, tamper detection, uniform masked inputs, quantisation and packing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from edgetune.adapters.secagg_protocol import SecAggError, neighbours
from edgetune.adapters.secagg_quant import (
    ddp_encode,
    ddp_plan,
    flatten,
    modulus_bits,
    pack_bits,
    quantize,
    quantized_decode,
    signed,
    skellam_noise,
    sum_to_mean,
    unflatten,
    unpack_bits,
)
from edgetune.adapters.secagg_session import DeviceSession, unmask_sum


def seeded(seed: int):
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def run_round(xs, k, t, *, before=(), after_share=(), after_mask=(), in_unmask=(), degree=0, tamper=None, seed=0):
    """Drive every stage for devices 1..n; the named devices drop at that stage."""
    entropy, nodes = seeded(seed), sorted(xs)
    sessions = {u: DeviceSession.start(u, 3, t, entropy) for u in nodes}
    roster = {u: s.advertise() for u, s in sessions.items() if u not in before}
    cts, commits = {}, {}
    for u in roster:
        if u not in after_share:
            cts[u], commits[u] = sessions[u].share(roster, degree, entropy)
    shared = sorted(cts)
    if tamper == "ciphertext":
        v = next(iter(cts[shared[0]]))
        blob = bytearray(cts[shared[0]][v])
        blob[20] ^= 1
        cts[shared[0]][v] = bytes(blob)
    masked = {}
    for u in shared:
        if u in after_mask:
            continue
        received = {v: cts[v][u] for v in shared if u in cts[v]}
        masked[u] = sessions[u].mask(xs[u], k, received, shared)
    survivors, dropped = sorted(masked), sorted(set(shared) - set(masked))
    seed_shares, key_shares = {}, {}
    for v in survivors:
        if v in in_unmask:
            continue
        seeds, keys = sessions[v].unmask(survivors, dropped)
        for u, s in seeds.items():
            seed_shares.setdefault(u, []).append(s)
        for u, s in keys.items():
            key_shares.setdefault(u, []).append(s)
    if tamper == "share":
        u = survivors[0]
        bad = bytearray(seed_shares[u][0])
        bad[10] ^= 1
        seed_shares[u][0] = bytes(bad)
    return unmask_sum(masked, roster, shared, commits, seed_shares, key_shares, t, degree, 3, k), masked


def inputs(n, d, k, seed=1):
    rng = np.random.default_rng(seed)
    return {u: rng.integers(0, 2, d).astype(np.uint64) for u in range(1, n + 1)}


@pytest.mark.parametrize("stage", ["before", "after_share", "after_mask", "in_unmask"])
@pytest.mark.parametrize("drops", [0, 1, 3])  # 3 of 10: 30%
def test_sum_exact_with_dropouts(stage, drops):
    n, d, t = 10, 64, 6
    k = modulus_bits(1, n)
    xs = inputs(n, d, k)
    gone = tuple(range(1, drops + 1))
    result, _ = run_round(xs, k, t, **{stage: gone})
    counted = [u for u in xs if stage == "in_unmask" or u not in gone]
    assert result.survivors == sorted(counted)
    expected = sum(xs[u].astype(np.int64) for u in counted) % (1 << k)
    np.testing.assert_array_equal(result.total, expected.astype(np.uint64))


def test_dropouts_at_every_stage_at_once_and_secagg_plus_graph():
    n, d, t = 10, 40, 4
    k = modulus_bits(1, n)
    xs = inputs(n, d, k, seed=2)
    result, _ = run_round(xs, k, t, before=(1,), after_share=(2,), after_mask=(3,), in_unmask=(4,), degree=6)
    expected = sum(xs[u].astype(np.int64) for u in range(4, n + 1)) % (1 << k)
    np.testing.assert_array_equal(result.total, expected.astype(np.uint64))
    assert result.dropped == [3]


def test_below_threshold_is_refused_cleanly():
    xs = inputs(5, 16, 4)
    with pytest.raises(SecAggError, match="threshold"):
        run_round(xs, 4, 4, after_mask=(1, 2))
    with pytest.raises(SecAggError, match="threshold"):  # too few share-holders answer
        run_round(xs, 4, 4, in_unmask=(1, 2))
    with pytest.raises(SecAggError, match="threshold"):
        run_round(xs, 4, 4, before=(1, 2))


def test_tampered_ciphertext_and_share_are_detected():
    xs = inputs(4, 16, 4)
    with pytest.raises(SecAggError, match="authentication"):
        run_round(xs, 4, 3, tamper="ciphertext")
    with pytest.raises(SecAggError, match="tampered"):
        run_round(xs, 4, 3, tamper="share")


def test_masked_input_is_uniform():
    """A constant input, once masked, is uniform over Z_(2^k): chi-square on the residues."""
    n, d, k = 3, 32_000, 5
    xs = {u: np.full(d, 7, dtype=np.uint64) for u in range(1, n + 1)}
    _, masked = run_round(xs, k, 2, seed=5)
    for y in masked.values():
        counts = np.bincount(y.astype(np.int64), minlength=1 << k)
        assert chisquare(counts).pvalue > 1e-4


def test_unmask_refuses_both_shares_and_a_second_call():
    s = DeviceSession.start(1, 1, 2, seeded(0))
    with pytest.raises(SecAggError, match="both"):
        s.unmask([1, 2], [2])
    s.unmask([1, 2], [])
    with pytest.raises(SecAggError, match="twice"):
        s.unmask([1, 2], [])


def test_session_round_trips_through_bytes():
    entropy = seeded(3)
    a, b = DeviceSession.start(1, 2, 2, entropy), DeviceSession.start(2, 2, 2, entropy)
    roster = {1: a.advertise(), 2: b.advertise()}
    a.share(roster, 0, entropy)
    assert DeviceSession.from_bytes(a.to_bytes()) == a


def test_secagg_plus_graph_is_symmetric_with_the_degree():
    g = neighbours(range(20), 4, seed=1)
    assert all(len(v) == 4 for v in g.values())
    assert all(u in g[v] for u in g for v in g[u])
    assert neighbours([1, 2, 3], 0, 0) == {1: {2, 3}, 2: {1, 3}, 3: {1, 2}}


def test_quantize_is_unbiased_and_the_sum_decodes():
    rng = np.random.default_rng(0)
    x = np.array([-0.5, -0.1, 0.0, 0.3, 0.9, 2.0])  # 2.0 is clipped to c = 1
    c = np.ones_like(x)
    for bits in (1, 3):
        q = np.stack([quantize(x, c, bits, rng) for _ in range(20_000)])
        assert q.max() <= (1 << bits) - 1
        mean = quantized_decode(q.sum(axis=0), c, bits, len(q)) / len(q)
        # std of one decoded value <= c, so the mean of 20k is within 5 * 1/sqrt(20k) = 0.035
        np.testing.assert_allclose(mean, np.clip(x, -1, 1), atol=0.036)
    assert modulus_bits(1, 8) == 5  # the n = 8, b = 1


def test_quantized_error_feedback_on_the_device():
    """decode(q) + residual == the input: what quantisation dropped is carried to the next round."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 0.3, 100)
    c = np.full(100, 1.0)
    decoded = quantized_decode(quantize(x, c, 1, rng), c, 1, 1)
    assert set(np.unique(decoded)) <= {-1.0, 1.0}
    np.testing.assert_allclose(decoded + (x - decoded), x)


def test_pack_round_trip_and_size():
    rng = np.random.default_rng(2)
    v = rng.integers(0, 32, 1001).astype(np.uint64)
    packed = pack_bits(v, 5)
    assert packed.nbytes == math.ceil(1001 * 5 / 8)
    np.testing.assert_array_equal(unpack_bits(packed, 5, 1001), v)
    with pytest.raises(ValueError):
        unpack_bits(packed[:-1], 5, 1001)


def test_flatten_round_trip():
    s = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.tensor([1.5])}
    out = unflatten(flatten(s), {k: tuple(v.shape) for k, v in s.items()})
    assert all(torch.equal(out[k], s[k]) for k in s)


def test_skellam_noise_moments_and_ddp_sum():
    rng = np.random.default_rng(3)
    noise = skellam_noise(200_000, 8.0, rng)
    assert noise.dtype == np.int64
    assert abs(noise.mean()) < 0.05 and abs(noise.var() - 8.0) < 0.15  # 5 std errors
    plan = ddp_plan(clip_norm=1.0, bits=8, dim=50, cohort=4, noise_multiplier=0.5, threshold=3)
    assert plan.wrap_bound <= 1e-9
    xs = [rng.normal(0, 0.1, 50) for _ in range(4)]
    encoded = [ddp_encode(x, plan, rng) for x in xs]
    assert all(np.linalg.norm(z) <= 1.0 + 1e-9 for _, z in encoded)  # decoded, noise-free part is clipped
    total = sum(y for y, _ in encoded) & ((1 << plan.k) - 1)
    mean = sum_to_mean(total, plan, 4)
    # noise std on the mean: sqrt(4 v_dev) / (s 4); allow 6 std
    std = math.sqrt(4 * plan.device_variance) / (plan.scale * 4)
    assert np.abs(mean - sum(z for _, z in encoded) / 4).max() < 6 * std
    assert signed(np.array([31, 1], dtype=np.uint64), 5).tolist() == [-1, 1]
