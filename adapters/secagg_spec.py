"""One secure-aggregation round's integer encoding, derived identically on device and server.

Everything both sides must agree on follows from the run config and the cohort size ``n``
(devices sent the round's first stage), so the server sends only ``n``:

    quantised   b-bit levels on [-c, c] per coordinate, k = b + ceil(log2(n + 1))
    skellam     (dp.enabled) clip to C, signed b-bit grid, Skellam noise, k from
                :class:`adapters.secagg_quant.DdpPlan` (signal plus noise headroom)

:func:`encode_input` is the device's side (it also returns what the server will effectively
decode from this device, for error feedback); :func:`decode_sum` is the server's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgetune.adapters.secagg_quant import (
    DdpPlan,
    ddp_encode,
    ddp_plan,
    flatten,
    modulus_bits,
    quantize,
    quantized_decode,
    sum_to_mean,
    unflatten,
)
from edgetune.config import RunConfig
from edgetune.types import StateDict

__all__ = ["RoundSpec", "decode_sum", "encode_input", "round_spec", "threshold_for"]


def threshold_for(cfg: RunConfig, cohort: int) -> int:
    """t: ``secagg.threshold``, or floor(n / 2) + 1 (at least 2) when it is 0."""
    return cfg.secagg.threshold or max(cohort // 2 + 1, 2)


@dataclass(frozen=True)
class RoundSpec:
    """What one round's inputs look like."""

    shapes: dict[str, tuple[int, ...]]
    cohort: int
    threshold: int
    bits: int
    k: int
    range: float
    plan: DdpPlan | None
    """Set under distributed DP (Skellam), else None."""

    @property
    def dim(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())


def round_spec(cfg: RunConfig, shapes: dict[str, tuple[int, ...]], cohort: int) -> RoundSpec:
    """The round's encoding for ``cohort`` devices (raises ValueError for a cohort below 2)."""
    if cohort < 2:
        raise ValueError(f"secure aggregation needs >= 2 devices, got {cohort}")
    sa, t = cfg.secagg, threshold_for(cfg, cohort)
    c = sa.range or cfg.train.learning_rate * cfg.train.local_steps
    d = sum(math.prod(s) for s in shapes.values())
    if cfg.dp.enabled:
        plan = ddp_plan(cfg.dp.clip_norm, sa.bits, d, cohort, cfg.dp.noise_multiplier, t)
        return RoundSpec(dict(shapes), cohort, t, sa.bits, plan.k, c, plan)
    return RoundSpec(dict(shapes), cohort, t, sa.bits, modulus_bits(sa.bits, cohort), c, None)


def encode_input(corrected: StateDict, spec: RoundSpec, rng: np.random.Generator) -> tuple[np.ndarray, StateDict]:
    """``(integer input mod 2^k as uint64, the device's new residual)`` for one device.

    ``corrected`` is delta + residual. The residual is what quantisation dropped (error
    feedback); under DP it is measured from the clipped vector, so what lies beyond the
    clip norm is dropped, not carried (it would otherwise grow without bound), and the
    noise never enters it.
    """
    x = flatten(corrected)
    mod = np.uint64((1 << spec.k) - 1)
    if spec.plan is not None:
        y, z = ddp_encode(x, spec.plan, rng)
        norm, clip_norm = float(np.linalg.norm(x)), spec.plan.clip_norm
        clipped = x * min(1.0, clip_norm / norm) if norm > 0 else x
        return y.astype(np.uint64) & mod, unflatten(clipped - z, spec.shapes)
    q = quantize(x, spec.range, spec.bits, rng)
    return q, unflatten(x - quantized_decode(q, spec.range, spec.bits, 1), spec.shapes)


def decode_sum(total: np.ndarray, spec: RoundSpec, survivors: int, denominator: float) -> StateDict:
    """The mean update from the unmasked sum of ``survivors`` inputs.

    Quantised: the uniform mean over the survivors. Skellam: the noised sum over
    ``denominator`` (``server.dp.mean_denominator``: survivors or the expected sample size).
    """
    if spec.plan is not None:
        return unflatten(sum_to_mean(total, spec.plan, denominator), spec.shapes)
    return unflatten(quantized_decode(total, spec.range, spec.bits, survivors) / survivors, spec.shapes)
