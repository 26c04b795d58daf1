"""Privacy accounting with Google's ``dp-accounting``: one event per round, epsilon at delta.

Every training round composes one event, whether or not it released an update (a round
skipped under quorum is counted too: conservative, and it keeps epsilon a function of the
round count alone). Distributed-DP rounds under secure aggregation compose Skellam events
instead (``server/skellam.py``). The neighbouring datasets differ in one *device's* entire data
(user-level DP); the mechanism is the Gaussian sum of ``server/dp.py`` with sensitivity C:

    dp.sampling=poisson  each device joins with probability q = devices-per-round / num-devices
                         PoissonSampledDpEvent(q, GaussianDpEvent(z)), add-or-remove-one
    dp.sampling=fixed    exactly k of the N connected devices, without replacement
                         SampledWithoutReplacementDpEvent(N, k, GaussianDpEvent(z / 2)),
                         replace-one: swapping one device moves the clipped sum by up to
                         2C, so the noise is z C = (z / 2) * sensitivity

``dp.accountant`` picks RDP (``RdpAccountant``; both samplings) or PLD (``PLDAccountant``;
Poisson only, tighter). The ledger (:class:`RoundEvent` list) is plain JSON and travels in the
server checkpoint, so a resumed run recomposes exactly the same events.

Example:
    >>> e = RoundEvent(round=1, sampling="poisson", population=10, sample_size=5.0, noise_multiplier=1.0, sampled=4)
    >>> round(epsilon([e] * 10, "rdp", 1e-5), 2)
    11.54
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import dp_accounting
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from edgetune.config import DpConfig
from edgetune.server.skellam import skellam_epsilon

__all__ = ["RoundEvent", "dp_event", "epsilon", "events_from_json", "events_to_json", "next_event"]

NeighborRel = dp_accounting.NeighboringRelation


@dataclass(frozen=True)
class RoundEvent:
    """What one training round did, as far as the guarantee is concerned."""

    round: int
    sampling: str
    """``poisson`` or ``fixed``."""
    population: int
    """N: devices the round sampled from."""
    sample_size: float
    """Expected sample size q N (Poisson) or k (fixed)."""
    noise_multiplier: float
    """z: noise std on the sum over C."""
    sampled: int
    """Devices actually sampled (history only; it does not enter epsilon)."""
    mechanism: str = "gaussian"
    """``gaussian`` (the server's noise, ``server/dp.py``) or ``skellam`` (distributed DP
    under secure aggregation, ``server/skellam.py``; then l1, l2 and variance are set)."""
    l1: float = 0.0
    """Skellam: integer L1 sensitivity of one device's input."""
    l2: float = 0.0
    """Skellam: integer L2 sensitivity of one device's input."""
    variance: float = 0.0
    """Skellam: per-coordinate noise variance the sum is guaranteed, in integer units."""

    @property
    def probability(self) -> float:
        """Each device's chance of being in the round: q = sample_size / population."""
        return self.sample_size / self.population


def next_event(dp: DpConfig, round_: int, population: int, devices_per_round: int, sampled: int = 0) -> RoundEvent:
    """The event of round ``round_`` sampling from ``population`` devices.

    Args:
        dp: DP settings (sampling, z).
        round_: the training round.
        population: N, devices connected and eligible.
        devices_per_round: ``federation.devices-per-round``-derived sample size (>= 1).
        sampled: devices actually sampled, for the history.
    """
    if population < 1 or devices_per_round < 1:
        raise ValueError(f"population and devices_per_round must be >= 1, got {population} and {devices_per_round}")
    k = min(devices_per_round, population)
    return RoundEvent(round_, dp.sampling, population, float(k), dp.noise_multiplier, sampled)


def dp_event(e: RoundEvent) -> dp_accounting.DpEvent:
    """The ``dp-accounting`` event for one round (see the module docstring)."""
    if e.sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(e.probability, dp_accounting.GaussianDpEvent(e.noise_multiplier))
    if e.sampling == "fixed":
        return dp_accounting.SampledWithoutReplacementDpEvent(
            e.population, int(e.sample_size), dp_accounting.GaussianDpEvent(e.noise_multiplier / 2)
        )
    raise ValueError(f"unknown sampling {e.sampling!r}; known: poisson, fixed")


def _accountant(kind: str, sampling: str) -> dp_accounting.PrivacyAccountant:
    relation = NeighborRel.REPLACE_ONE if sampling == "fixed" else NeighborRel.ADD_OR_REMOVE_ONE
    if kind == "rdp":
        return RdpAccountant(neighboring_relation=relation)
    if kind == "pld":
        if sampling == "fixed":
            raise ValueError("the pld accountant supports Poisson sampling only; use rdp for fixed-size sampling")
        return PLDAccountant(neighboring_relation=relation)
    raise ValueError(f"unknown accountant {kind!r}; known: rdp, pld")


def epsilon(events: Sequence[RoundEvent], accountant: str, delta: float) -> float:
    """Epsilon at ``delta`` after composing ``events`` (0.0 for none).

    Identical events are composed once with their count, which is what a caller of
    ``dp-accounting`` composing ``R`` equal rounds does, so the figures match it exactly.

    Raises:
        ValueError: events of both samplings (they use different neighbouring relations), or
            an unknown accountant or sampling.
    """
    if not events:
        return 0.0
    samplings = {e.sampling for e in events}
    if len(samplings) > 1:
        raise ValueError(f"cannot compose rounds of different samplings {sorted(samplings)}")
    mechanisms = {e.mechanism for e in events}
    if mechanisms == {"skellam"}:
        return skellam_epsilon(events, delta)
    if mechanisms != {"gaussian"}:
        raise ValueError(f"cannot compose rounds of mechanisms {sorted(mechanisms)}")
    acc = _accountant(accountant, samplings.pop())
    counts = Counter(dp_event(e) for e in events)
    for event, count in counts.items():
        acc.compose(event, count)
    eps = float(acc.get_epsilon(delta))
    return eps if math.isfinite(eps) else math.inf


def events_to_json(events: Sequence[RoundEvent]) -> str:
    """The ledger as a JSON list (what the checkpoint keeps)."""
    return json.dumps([asdict(e) for e in events], sort_keys=True)


def events_from_json(text: str) -> list[RoundEvent]:
    """Inverse of :func:`events_to_json`.

    Raises:
        ValueError: the text is not a JSON list of round events.
    """
    try:
        return [RoundEvent(**item) for item in json.loads(text)]
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"not a privacy ledger: {err}") from err
