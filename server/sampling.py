"""Which devices train in a DP round: sampling the accountant can vouch for.

Privacy amplification by sampling holds only if the adversary cannot predict who was
sampled, so under DP the choice is drawn from the operating system's entropy
(:class:`random.SystemRandom`), never from the run seed that sits in the run config:

    poisson   every device joins independently with probability q (the count varies)
    fixed     exactly k devices, uniformly without replacement

Without DP, ``server/federation.py`` samples reproducibly from (run seed, round) instead.

Example:
    >>> sorted(fixed_sample([3, 1, 2], 3))
    [1, 2, 3]
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["fixed_sample", "poisson_sample", "private_sample"]


def poisson_sample(items: Sequence[int], probability: float, rng: random.Random | None = None) -> list[int]:
    """Each item independently with ``probability`` (OS entropy unless ``rng`` is given), sorted."""
    if not 0 <= probability <= 1:
        raise ValueError(f"sampling probability must be in [0, 1], got {probability}")
    rng = rng or random.SystemRandom()
    return sorted(i for i in items if rng.random() < probability)


def fixed_sample(items: Sequence[int], size: int, rng: random.Random | None = None) -> list[int]:
    """``size`` distinct items, uniformly (OS entropy unless ``rng`` is given), sorted."""
    if not 0 <= size <= len(items):
        raise ValueError(f"sample size must be in [0, {len(items)}], got {size}")
    rng = rng or random.SystemRandom()
    return sorted(rng.sample(list(items), size))


def private_sample(items: Sequence[int], sampling: str, sample_size: float) -> list[int]:
    """Sample ``items`` as ``dp.sampling`` says, aiming at ``sample_size`` devices.

    Args:
        items: node ids eligible this round (the population N).
        sampling: ``poisson`` (q = sample_size / N) or ``fixed`` (k = sample_size).
        sample_size: expected (Poisson) or exact (fixed) number of devices.
    """
    if sampling == "poisson":
        return poisson_sample(items, sample_size / len(items))
    if sampling == "fixed":
        return fixed_sample(items, int(sample_size))
    raise ValueError(f"unknown sampling {sampling!r}; known: poisson, fixed")
