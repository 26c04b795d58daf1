"""The formal guarantee of a run: (epsilon, delta), re-derived with ``dp-accounting``.

Inputs are what the run folder holds: the resolved config (``dp.*`` keys) and the per-round
metrics (``dp_epsilon``, ``dp_clipped_fraction``, ``dp_noise_std``, ``dp_skipped``,
``dp_sampled``). Epsilon is recomputed here, independently of the server's ledger, from the
settings and the number of training rounds (every training round counts, released or skipped,
as ``server/accounting.py`` composes them), and compared with what the run reported:

    poisson  PoissonSampledDpEvent(q, GaussianDpEvent(z)), q = devices-per-round / num-devices,
             add-or-remove one device's whole data
    fixed    SampledWithoutReplacementDpEvent(N, k, GaussianDpEvent(z / 2)), replace one
             device's whole data (the sum moves by up to 2C)

The empirical tests change ONE device's data (a canary or one example more or less). Under
replace-one that is one neighbouring step, so they are held to (epsilon, delta) itself; under
add-or-remove it is two steps (remove the device, add it back changed), so by group privacy
they are held to (2 epsilon, (1 + e^epsilon) delta).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

__all__ = ["describe_guarantee", "rederive_epsilon", "empirical_bound"]

RELATIONS = {
    "poisson": "user-level: add or remove one device's whole data",
    "fixed": "user-level: replace one device's whole data",
}


def rederive_epsilon(
    sampling: str, accountant: str, population: int, sample_size: int, z: float, rounds: int, delta: float
) -> float:
    """Epsilon at ``delta`` after ``rounds`` sampled-Gaussian rounds, straight from ``dp-accounting``."""
    if rounds == 0:
        return 0.0
    gaussian = dp_accounting.GaussianDpEvent
    if sampling == "poisson":
        event = dp_accounting.PoissonSampledDpEvent(sample_size / population, gaussian(z))
        relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    elif sampling == "fixed":
        event = dp_accounting.SampledWithoutReplacementDpEvent(population, sample_size, gaussian(z / 2))
        relation = dp_accounting.NeighboringRelation.REPLACE_ONE
    else:
        raise ValueError(f"dp.sampling={sampling!r}: expected poisson or fixed")
    if accountant not in ("rdp", "pld"):
        raise ValueError(f"dp.accountant={accountant!r}: expected rdp or pld")
    acc = RdpAccountant(neighboring_relation=relation) if accountant == "rdp" else PLDAccountant(relation)
    acc.compose(event, rounds)
    eps = float(acc.get_epsilon(delta))
    return eps if math.isfinite(eps) else math.inf


def empirical_bound(sampling: str, epsilon: float, delta: float) -> dict[str, Any]:
    """The (epsilon, delta) an empirical test that changes one device's data is held to."""
    if sampling == "fixed":
        return {"epsilon": epsilon, "delta": delta, "why": "replace-one relation: the test is one neighbouring step"}
    return {
        "epsilon": 2 * epsilon,
        "delta": min(1.0, (1 + math.exp(min(epsilon, 700.0))) * delta),
        "why": "add-or-remove relation: changing one device's data is two steps (group privacy, k = 2)",
    }


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> list[Any]:
    return [row.get(key) for row in rows if row.get("round", 0) >= 1]


def describe_guarantee(config: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The guarantee section of the report.

    Args:
        config: The run's resolved flat config (``config.json``).
        rows: Its ``metrics.jsonl`` lines.
    """
    rounds = sum(1 for row in rows if row.get("round", 0) >= 1)
    if not config.get("dp.enabled", False):
        return {"enabled": False, "rounds": rounds, "statement": "no formal differential-privacy guarantee (DP off)"}
    n = int(config["federation.num-devices"])
    k = int(config.get("federation.devices-per-round") or n)
    sampling, accountant = str(config["dp.sampling"]), str(config["dp.accountant"])
    z, clip, delta = float(config["dp.noise-multiplier"]), float(config["dp.clip-norm"]), float(config["dp.delta"])
    rederived = rederive_epsilon(sampling, accountant, n, k, z, rounds, delta)
    reported = [e for e in _series(rows, "dp_epsilon") if e is not None]
    last = reported[-1] if reported else None
    return {
        "enabled": True,
        "epsilon": last,
        "epsilon_rederived": rederived,
        "epsilon_matches": last is not None and math.isclose(last, rederived, rel_tol=1e-6, abs_tol=1e-9),
        "delta": delta,
        "accountant": accountant,
        "relation": RELATIONS.get(sampling, sampling),
        "sampling": sampling,
        "sampling_probability": k / n,
        "population": n,
        "devices_per_round": k,
        "noise_multiplier": z,
        "clip_norm": clip,
        "clip_on": config.get("dp.clip-on"),
        "min_replies": config.get("dp.min-replies"),
        "max_epsilon": config.get("dp.max-epsilon"),
        "rounds": rounds,
        "per_round": {
            "round": _series(rows, "round"),
            "epsilon": _series(rows, "dp_epsilon"),
            "clipped_fraction": _series(rows, "dp_clipped_fraction"),
            "noise_std": _series(rows, "dp_noise_std"),
            "skipped": _series(rows, "dp_skipped"),
            "sampled": _series(rows, "dp_sampled"),
        },
        "empirical_bound": empirical_bound(sampling, last if last is not None else rederived, delta),
        "statement": f"({(last if last is not None else rederived):.3g}, {delta:.3g})-DP, {RELATIONS.get(sampling)}",
    }
