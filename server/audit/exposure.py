"""Canary exposure (Carlini et al., "The Secret Sharer", 2019), estimated from losses.

For a canary with secret s in a space R of possible secrets, exposure = log2|R| - log2 rank(s),
where rank 1 is the candidate the model finds most likely (lowest loss). Scoring all 10^8
PINs is out of reach, so the space is estimated by M reference candidates drawn uniformly
from it: rank = 1 + #(references with lower loss), exposure = log2(M + 1) - log2(rank).
A never-seen secret ranks in the middle (exposure about 1 bit); a memorised one ranks first
(exposure log2(M + 1), the most this estimate can show).

Example:
    >>> exposure(0.5, [1.0, 2.0, 3.0])   # beats all 3: rank 1 of 4
    2.0
    >>> round(exposure(2.5, [1.0, 2.0, 3.0]), 4)   # rank 3 of 4
    0.415
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from edgetune.server.audit.membership import bound_check, roc_auc

__all__ = ["exposure", "exposure_summary", "max_exposure"]


def exposure(canary_loss: float, reference_losses: Sequence[float] | np.ndarray) -> float:
    """Estimated exposure in bits of one canary among ``reference_losses`` (M candidates)."""
    refs = np.asarray(reference_losses, dtype=np.float64)
    if refs.size == 0:
        raise ValueError("exposure needs at least one reference candidate")
    rank = 1 + int((refs < canary_loss).sum())
    return math.log2(refs.size + 1) - math.log2(rank)


def max_exposure(references: int) -> float:
    """The largest exposure measurable with ``references`` candidates."""
    return math.log2(references + 1)


def exposure_summary(
    planted: Sequence[float], unplanted: Sequence[float], references: int, epsilon: float | None, delta: float
) -> dict:
    """Planted vs never-planted exposures: means, the AUC separating them, and the DP bound.

    Args:
        planted: Exposures of the canaries devices trained on.
        unplanted: Exposures of canaries drawn the same way but never planted.
        references: Reference candidates M used for both.
        epsilon: The bound the test is held to (None: no DP guarantee, nothing to check).
        delta: Its delta.
    """
    p, u = np.asarray(planted, dtype=np.float64), np.asarray(unplanted, dtype=np.float64)
    out = {
        "planted_mean": float(p.mean()),
        "unplanted_mean": float(u.mean()),
        "planted_median": float(np.median(p)),
        "unplanted_median": float(np.median(u)),
        "max_measurable": max_exposure(references),
        "auc_planted_vs_unplanted": roc_auc(p, u),
    }
    out["memorisation_detected"] = bool(out["auc_planted_vs_unplanted"] >= 0.9 and out["planted_mean"] > 2 + u.mean())
    out["bound"] = None if epsilon is None else bound_check(p, u, epsilon, delta)
    return out
