"""Integer inputs for secure aggregation: a device's delta as a vector in Z_(2^k).

Secure aggregation sums vectors modulo ``2^k``; this module turns a (delta + residual) into
such a vector and the unmasked sum back into a mean. Two modes:

Quantised (no DP), ``b`` bits, round-shared per-coordinate range ``c`` (one per tensor)::

    L   = 2^b - 1                                   # levels 0..L stand for -c..+c
    q_j = stoch_round((clip(x_j, -c, c) + c) / (2c) * L)   # E[q_j] = (x_j + c) L / (2c): unbiased
    S_j = sum_i q_ij  <= n L < 2^k   with  k = b + ceil(log2(n + 1))
    sum_i x_ij ~= S_j 2c / L - n c                  # the device keeps x - decode(q) (error feedback)

1-bit is ``b = 1``: each coordinate travels as -c or +c with the probabilities that make it
unbiased. k is exactly large enough that the sum of ``n`` inputs never wraps.

Distributed DP (Skellam, Agarwal, Kairouz and Liu, NeurIPS 2021), signed ``b``-bit inputs::

    x'  = clip_L2(x, C)                     # the user-level bound
    z   = stoch_round(x' s), s = (2^(b-1) - 1) / C, redrawn until ||z||_2 <= D2   (|z_j| <= 2^(b-1))
    y   = z + Sk(v_dev)                     # Poisson(v/2) - Poisson(v/2): integer, variance v
    sum = sum_i y_i  (mod 2^k, read as signed); mean = sum / (s m)

``D2`` is the conditional-rounding bound of Kairouz et al. (ICML 2021, Sec. 4.1), so the
integer sensitivity is exactly ``D2`` (L2) and ``min(D2^2, sqrt(d) D2)`` (L1). ``k`` holds the
signal's worst case ``n 2^(b-1)`` plus a noise headroom ``h`` for which a Bernstein bound
puts the chance that any coordinate wraps below :data:`WRAP_TARGET`; the run reports it.

Everything here is pure numpy/torch; nothing here knows about Flower or keys.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from edgetune.types import StateDict

__all__ = [
    "WRAP_TARGET",
    "DdpPlan",
    "ddp_encode",
    "ddp_plan",
    "flatten",
    "modulus_bits",
    "pack_bits",
    "quantize",
    "quantized_decode",
    "signed",
    "skellam_noise",
    "sum_to_mean",
    "unflatten",
    "unpack_bits",
]

WRAP_TARGET = 1e-9
"""Upper bound we accept on the chance that the noised sum wraps around modulo 2^k."""
ROUNDING_BETA = math.exp(-0.5)
"""Kairouz et al.'s beta: each conditional-rounding attempt succeeds with probability >= 1 - beta."""


def modulus_bits(bits: int, n: int) -> int:
    """``k = b + ceil(log2(n + 1))``: the sum of ``n`` values in ``[0, 2^b - 1]`` never wraps."""
    if bits < 1 or n < 1:
        raise ValueError(f"need bits >= 1 and n >= 1, got bits={bits}, n={n}")
    return bits + math.ceil(math.log2(n + 1))


def flatten(state: StateDict) -> np.ndarray:
    """All tensors of ``state`` in sorted-name order as one float64 vector."""
    return np.concatenate([state[k].detach().double().reshape(-1).numpy() for k in sorted(state)])


def unflatten(vec: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> StateDict:
    """Inverse of :func:`flatten` (float32 tensors)."""
    out, at = {}, 0
    for k in sorted(shapes):
        size = math.prod(shapes[k])
        out[k] = torch.from_numpy(np.ascontiguousarray(vec[at : at + size], dtype=np.float32)).reshape(shapes[k])
        at += size
    if at != len(vec):
        raise ValueError(f"vector has {len(vec)} entries, the shapes need {at}")
    return out


def _stoch_round(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unbiased randomised rounding to integers: ``floor(y) + Bernoulli(y - floor(y))``."""
    low = np.floor(y)
    return (low + (rng.random(y.shape) < (y - low))).astype(np.int64)


def quantize(x: np.ndarray, c: np.ndarray | float, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Levels ``q`` in ``[0, 2^b - 1]`` (uint64) with ``E[decode(q)] = clip(x, -c, c)``.

    Args:
        x: the values (float64, ``(d,)``).
        c: the round-shared range per coordinate (``(d,)`` or scalar, > 0).
        bits: b, 1..30.
        rng: the device's randomness for the rounding.
    """
    levels = (1 << bits) - 1
    y = (np.clip(x, -c, c) + c) / (2 * c) * levels
    return np.clip(_stoch_round(y, rng), 0, levels).astype(np.uint64)


def quantized_decode(total: np.ndarray, c: np.ndarray | float, bits: int, count: int) -> np.ndarray:
    """``sum_i x_i`` estimated from ``total = sum_i q_i`` over ``count`` devices (float64)."""
    levels = (1 << bits) - 1
    return total.astype(np.float64) * (2 * c) / levels - count * c


def signed(total: np.ndarray, k: int) -> np.ndarray:
    """Residues mod ``2^k`` read as signed integers in ``[-2^(k-1), 2^(k-1))`` (int64)."""
    t = total.astype(np.int64) & ((1 << k) - 1)
    return np.where(t >= 1 << (k - 1), t - (1 << k), t)


def skellam_noise(size: int, variance: float, rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam noise ``Poisson(v/2) - Poisson(v/2)`` (int64, variance ``v``).

    Sums of independent Skellam variables are Skellam, so ``m`` devices each adding
    variance ``v`` give the sum exactly ``Sk`` with variance ``m v``.
    """
    if variance < 0:
        raise ValueError(f"variance must be >= 0, got {variance}")
    if variance == 0:
        return np.zeros(size, dtype=np.int64)
    return rng.poisson(variance / 2, size).astype(np.int64) - rng.poisson(variance / 2, size).astype(np.int64)


class DdpPlan:
    """The integer grid and bounds of one distributed-DP round (same on every side).

    Args:
        clip_norm: C, the L2 bound on a device's delta.
        bits: b, signed bits per device input (``|z_j| <= 2^(b-1)``), >= 2.
        dim: d, parameters per input.
        cohort: n, devices that may contribute (the sum's worst case).
        noise_multiplier: z, the std of the summed noise over the (rounded) sensitivity.
        min_noisy: devices whose noise the guarantee counts on (threshold - 1, >= 1).
    """

    def __init__(
        self, clip_norm: float, bits: int, dim: int, cohort: int, noise_multiplier: float, min_noisy: int
    ) -> None:
        if bits < 2 or clip_norm <= 0 or dim < 1 or cohort < 1 or min_noisy < 1 or noise_multiplier <= 0:
            raise ValueError(f"bad DDP plan: C={clip_norm}, b={bits}, d={dim}, n={cohort}, z={noise_multiplier}")
        self.scale = ((1 << (bits - 1)) - 1) / clip_norm
        cs = clip_norm * self.scale
        root = math.sqrt(2 * math.log(1 / ROUNDING_BETA))
        self.l2 = math.sqrt(min(cs**2 + dim / 4 + root * (cs + math.sqrt(dim) / 2), (cs + math.sqrt(dim)) ** 2))
        self.l1 = min(self.l2**2, math.sqrt(dim) * self.l2)
        self.central_variance = (noise_multiplier * self.l2) ** 2
        self.device_variance = self.central_variance / min_noisy
        worst_variance = self.device_variance * cohort
        log_term = math.log(2 * dim / WRAP_TARGET)
        headroom = log_term / 3 + math.sqrt(log_term**2 / 9 + 2 * log_term * worst_variance)
        signal = cohort * (1 << (bits - 1))
        self.k = int(math.ceil(signal + headroom)).bit_length() + 1
        x = (1 << (self.k - 1)) - 1 - signal
        self.wrap_bound = min(1.0, 2 * dim * math.exp(-(x**2) / (2 * (worst_variance + x / 3))))
        self.dim, self.bits, self.clip_norm = dim, bits, clip_norm


def ddp_plan(clip_norm: float, bits: int, dim: int, cohort: int, noise_multiplier: float, threshold: int) -> DdpPlan:
    """:class:`DdpPlan` counting on the noise of ``threshold - 1`` devices (the others' when one differs)."""
    return DdpPlan(clip_norm, bits, dim, cohort, noise_multiplier, max(threshold - 1, 1))


def ddp_encode(x: np.ndarray, plan: DdpPlan, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(z + noise, z / s)``: the noised integer input (int64) and what it decodes to before noise.

    ``x`` (float64, ``(d,)``) is clipped to L2 norm C, scaled by ``s`` and rounded with
    conditional randomised rounding (redrawn until ``||z|| <= D2``). The second value is for
    the device's error feedback (the noise never enters it).
    """
    norm = float(np.linalg.norm(x))
    scaled = x * (plan.scale * min(1.0, plan.clip_norm / norm) if norm > 0 else plan.scale)
    for _ in range(1000):
        z = _stoch_round(scaled, rng)
        if float(np.linalg.norm(z)) <= plan.l2:
            return z + skellam_noise(len(z), plan.device_variance, rng), z / plan.scale
    raise RuntimeError("conditional rounding failed 1000 times; the plan's bound is wrong")


def sum_to_mean(total: np.ndarray, plan: DdpPlan, denominator: float) -> np.ndarray:
    """The released mean from the unmasked sum mod 2^k (float64)."""
    return signed(total, plan.k) / (plan.scale * denominator)


def pack_bits(values: np.ndarray, k: int) -> np.ndarray:
    """The low ``k`` bits of every value, packed back to back (``ceil(d k / 8)`` bytes)."""
    if not 1 <= k <= 63:
        raise ValueError(f"k must be in [1, 63], got {k}")
    v = np.ascontiguousarray(values.astype("<u8"))
    bits = np.unpackbits(v.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, :k]
    return np.packbits(bits.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, k: int, d: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` (uint64).

    Raises:
        ValueError: ``packed`` is not exactly ``ceil(d k / 8)`` bytes.
    """
    if packed.dtype != np.uint8 or packed.shape != ((d * k + 7) // 8,):
        raise ValueError(f"packed input: expected {(d * k + 7) // 8} uint8 bytes, got {packed.dtype} {packed.shape}")
    bits = np.unpackbits(packed, bitorder="little")[: d * k].reshape(d, k)
    full = np.zeros((d, 64), dtype=np.uint8)
    full[:, :k] = bits
    return np.packbits(full, axis=1, bitorder="little").view("<u8").reshape(d).astype(np.uint64)
