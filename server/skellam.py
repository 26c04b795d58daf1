"""Accounting for distributed DP with the Skellam mechanism (Agarwal, Kairouz and Liu, NeurIPS 2021).

Under secure aggregation with ``dp.enabled`` every device adds Skellam noise to its integer
input (``adapters/secagg_quant.py``), so the unmasked sum carries ``Sk`` noise of variance at
least ``mu = (z D2)^2`` per coordinate (the noise of the t - 1 other devices the threshold
guarantees). For integer L1 / L2 sensitivities ``D1`` / ``D2`` (conditional rounding makes
them hard bounds) and integer orders ``a > 1`` the round is ``(a, eps(a))``-RDP with
(their Theorem 3.5 / Corollary 3.6, in the variance parametrisation)::

    eps(a) = a D2^2 / (2 mu) + min( ((2a - 1) D2^2 + 6 D1) / (4 mu^2),  3 D1 / (2 mu) )

The first term is the Gaussian mechanism's RDP at the same variance; the second is the price
of the integer noise, and vanishes as mu grows. Rounds compose by adding RDP; epsilon at delta
comes from ``dp-accounting``'s conversion (``rdp_privacy_accountant.compute_epsilon``).

No amplification by sampling is claimed (conservative: every round counts as if every device
took part). Under fixed-size sampling the relation is replace-one, so D1 and D2 double.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

__all__ = ["ORDERS", "skellam_epsilon", "skellam_rdp"]

ORDERS = tuple(range(2, 257))
"""Integer Renyi orders (the bound holds for integer a > 1)."""


class SkellamRound(Protocol):
    sampling: str
    l1: float
    l2: float
    variance: float


def skellam_rdp(order: int, l1: float, l2: float, variance: float) -> float:
    """RDP of one Skellam sum with sensitivities ``l1``, ``l2`` and noise variance ``variance``."""
    if order <= 1 or variance <= 0 or l2 < 0 or l1 < 0:
        raise ValueError(f"need order > 1, variance > 0 and sensitivities >= 0; got {order}, {variance}, {l1}, {l2}")
    a, mu = order, variance
    extra = min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))
    return a * l2**2 / (2 * mu) + extra


def skellam_epsilon(events: Sequence[SkellamRound], delta: float) -> float:
    """Epsilon at ``delta`` after composing the Skellam rounds ``events``."""
    if not events:
        return 0.0
    rdp = np.zeros(len(ORDERS))
    for e in events:
        factor = 2.0 if e.sampling == "fixed" else 1.0  # replace-one moves the sum twice as far
        rdp += [skellam_rdp(a, factor * e.l1, factor * e.l2, e.variance) for a in ORDERS]
    eps, _ = compute_epsilon(ORDERS, list(rdp), delta)
    return float(eps) if math.isfinite(eps) else math.inf
