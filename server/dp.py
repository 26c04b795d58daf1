"""User-level differential privacy for one round: clip, noise the sum, take the uniform mean.

For the valid replies ``i = 1..m`` of one round, with decoded deltas ``d_i`` (each a whole
device's update: all exchanged tensors together)::

    c_i   = d_i * min(1, C / ||d_i||)                  # clip: ||c_i|| <= C
    s     = sum_i c_i + N(0, (z C)^2 I)                # one device moves s by at most C
    mean  = s / D                                      # uniform weights: example counts ignored

``D`` (:func:`mean_denominator`) is the number of devices that replied under fixed-size
sampling and the expected sample size ``q N`` under Poisson sampling; either way the noise on
the sum is ``z C`` whatever ``m`` is, so a round with few replies gets *relatively* more noise,
never less. Rounds with fewer than ``dp.min-replies`` valid replies release nothing.

The noise comes from a generator seeded from the operating system's entropy, never from the
run seed: anyone who knows the seed (it is in the run config) could otherwise subtract it.

Everything here is a pure function over ``dict[str, Tensor]``; the accounting lives in
``server/accounting.py`` and the wiring in ``server/federation.py``.

Example:
    >>> import torch
    >>> clipped, was_clipped = clip_delta({"w": torch.tensor([3.0, 4.0])}, 1.0)
    >>> [round(x, 6) for x in clipped["w"].tolist()], was_clipped
    ([0.6, 0.8], True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edgetune.adapters.delta import global_norm
from edgetune.config import DpConfig
from edgetune.types import StateDict

__all__ = [
    "PrivateMean",
    "clip_delta",
    "gaussian_noise",
    "mean_denominator",
    "noise_generator",
    "private_mean",
]


@dataclass(frozen=True)
class PrivateMean:
    """The outcome of one DP aggregation."""

    mean: StateDict | None
    """The noised uniform mean (float32), or None when the round released nothing."""
    skipped: str | None
    """Why nothing was released (under quorum), else None."""
    clipped_fraction: float | None
    """Share of the replies whose delta was longer than C (None when there were none)."""
    noise_std: float | None
    """Per-coordinate noise standard deviation on ``mean``: ``z C / D`` (None when skipped)."""


def noise_generator() -> torch.Generator:
    """A CPU generator seeded with 64 bits from the operating system's entropy pool."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def clip_delta(delta: StateDict, clip_norm: float) -> tuple[StateDict, bool]:
    """``(delta * min(1, C / ||delta||) in float64, whether it was scaled down)``.

    The norm is global over every tensor of the device's delta, so the bound holds for the
    device's whole contribution (user-level), not per layer. It holds exactly as
    :func:`adapters.delta.global_norm` measures it: should rounding leave the scaled delta an
    ulp longer than C, it is shrunk by a further 2^-40. ``delta`` is not modified.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = global_norm(delta)
    if norm <= clip_norm:
        return {k: v.double() for k, v in delta.items()}, False
    factor = clip_norm / norm
    clipped = {k: v.double() * factor for k, v in delta.items()}
    while global_norm(clipped) > clip_norm:
        factor *= 1 - 2**-40
        clipped = {k: v.double() * factor for k, v in delta.items()}
    return clipped, True


def gaussian_noise(like: StateDict, std: float, generator: torch.Generator) -> StateDict:
    """Independent ``N(0, std^2)`` noise, float64, one tensor per key of ``like``."""
    if not std >= 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    return {k: torch.randn(v.shape, generator=generator, dtype=torch.float64) * std for k, v in like.items()}


def mean_denominator(sampling: str, replied: int, expected: float) -> float:
    """What the noised sum is divided by.

    Args:
        sampling: ``fixed`` or ``poisson`` (``dp.sampling``).
        replied: valid replies this round.
        expected: expected sample size ``q N`` (Poisson) or the fixed sample size.

    Returns:
        ``replied`` under fixed-size sampling (the neighbouring relation is replace-one, so the
        count is public and dividing by it is post-processing); ``expected`` under Poisson
        sampling, where the count itself depends on who is in the population and a fixed
        denominator keeps the released mean a function of the noised sum alone.
    """
    if sampling == "fixed":
        return float(replied)
    if sampling == "poisson":
        return float(expected)
    raise ValueError(f"unknown sampling {sampling!r}; known: poisson, fixed")


def private_mean(
    deltas: Sequence[StateDict], dp: DpConfig, denominator: float, generator: torch.Generator
) -> PrivateMean:
    """Clip every delta to ``dp.clip_norm``, noise the sum with ``z C``, divide by ``denominator``.

    Args:
        deltas: decoded deltas of this round's valid replies, all with the same keys and shapes.
        dp: the DP settings (C, z, quorum).
        denominator: see :func:`mean_denominator`; must be > 0.
        generator: the OS-entropy noise generator (:func:`noise_generator`).

    Returns:
        A :class:`PrivateMean`; ``mean`` is None when ``len(deltas) < dp.min_replies``.
    """
    if len(deltas) < dp.min_replies:
        reason = f"{len(deltas)} valid replies < dp.min-replies {dp.min_replies}"
        fraction = None if not deltas else sum(global_norm(d) > dp.clip_norm for d in deltas) / len(deltas)
        return PrivateMean(None, reason, fraction, None)
    if not denominator > 0:
        raise ValueError(f"denominator must be > 0, got {denominator}")
    clipped = [clip_delta(d, dp.clip_norm) for d in deltas]
    std = dp.noise_multiplier * dp.clip_norm
    noise = gaussian_noise(deltas[0], std, generator)
    mean = {k: ((sum(c[k] for c, _ in clipped) + noise[k]) / denominator).float() for k in deltas[0]}
    fraction = sum(was for _, was in clipped) / len(clipped)
    return PrivateMean(mean, None, fraction, std / denominator)
