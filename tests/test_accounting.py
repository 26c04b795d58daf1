"""The privacy ledger (``server/accounting.py``) against ``dp-accounting`` called directly."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from edgetune.config import DpConfig
from edgetune.server.accounting import RoundEvent, epsilon, events_from_json, events_to_json, next_event

# (population N, devices per round k, noise multiplier z, rounds R, delta)
GRID = [
    (10, 5, 1.0, 10, 1e-5),
    (100, 10, 0.8, 50, 1e-6),
    (1000, 20, 1.5, 200, 1e-6),
    (8, 8, 2.0, 5, 1e-3),  # everybody every round: no amplification
    (50, 1, 0.5, 30, 1e-4),
]


def _ledger(sampling: str, n: int, k: int, z: float, rounds: int) -> list[RoundEvent]:
    dp = DpConfig(enabled=True, noise_multiplier=z, sampling=sampling)
    return [next_event(dp, t, n, k, sampled=t % 3) for t in range(1, rounds + 1)]


@pytest.mark.parametrize(("n", "k", "z", "rounds", "delta"), GRID)
def test_poisson_rdp_matches_dp_accounting(n: int, k: int, z: float, rounds: int, delta: float) -> None:
    direct = RdpAccountant()  # add-or-remove-one: one device's data present or not
    direct.compose(dp_accounting.PoissonSampledDpEvent(k / n, dp_accounting.GaussianDpEvent(z)), rounds)
    assert epsilon(_ledger("poisson", n, k, z, rounds), "rdp", delta) == direct.get_epsilon(delta)


@pytest.mark.parametrize(("n", "k", "z", "rounds", "delta"), GRID)
def test_fixed_size_rdp_matches_dp_accounting(n: int, k: int, z: float, rounds: int, delta: float) -> None:
    # Replace-one: swapping a device moves the clipped sum by up to 2C, so the noise z C is
    # (z / 2) times the sensitivity.
    direct = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    direct.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, k, dp_accounting.GaussianDpEvent(z / 2)), rounds)
    assert epsilon(_ledger("fixed", n, k, z, rounds), "rdp", delta) == direct.get_epsilon(delta)


@pytest.mark.parametrize(("n", "k", "z", "rounds", "delta"), [GRID[0], GRID[2], GRID[3]])
def test_poisson_pld_matches_dp_accounting(n: int, k: int, z: float, rounds: int, delta: float) -> None:
    direct = PLDAccountant()
    direct.compose(dp_accounting.PoissonSampledDpEvent(k / n, dp_accounting.GaussianDpEvent(z)), rounds)
    assert epsilon(_ledger("poisson", n, k, z, rounds), "pld", delta) == direct.get_epsilon(delta)


def test_pld_is_no_looser_than_rdp() -> None:
    ledger = _ledger("poisson", 100, 10, 1.0, 20)
    assert epsilon(ledger, "pld", 1e-5) <= epsilon(ledger, "rdp", 1e-5)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    eps = [epsilon(_ledger("poisson", 20, 4, 1.0, r), "rdp", 1e-5) for r in (1, 2, 5, 10)]
    assert eps == sorted(eps) and eps[0] > 0
    assert epsilon(_ledger("poisson", 20, 4, 2.0, 10), "rdp", 1e-5) < eps[-1]
    assert epsilon([], "rdp", 1e-5) == 0.0


def test_devices_actually_sampled_do_not_enter_epsilon() -> None:
    a = _ledger("poisson", 20, 4, 1.0, 6)
    b = [RoundEvent(e.round, e.sampling, e.population, e.sample_size, e.noise_multiplier, 0) for e in a]
    assert epsilon(a, "rdp", 1e-5) == epsilon(b, "rdp", 1e-5)


def test_ledger_json_round_trip_gives_the_same_epsilon() -> None:
    ledger = _ledger("fixed", 30, 6, 1.2, 7)
    restored = events_from_json(events_to_json(ledger))
    assert restored == ledger
    assert epsilon(restored, "rdp", 1e-5) == epsilon(ledger, "rdp", 1e-5)
    with pytest.raises(ValueError, match="not a privacy ledger"):
        events_from_json('[{"round": 1}]')


def test_next_event_caps_the_sample_at_the_population() -> None:
    e = next_event(DpConfig(enabled=True, sampling="fixed"), 3, population=4, devices_per_round=9)
    assert (e.round, e.population, e.sample_size, e.probability) == (3, 4, 4.0, 1.0)
    with pytest.raises(ValueError, match="population"):
        next_event(DpConfig(enabled=True), 1, population=0, devices_per_round=1)


def test_mixed_samplings_and_pld_with_fixed_size_are_refused() -> None:
    mixed = _ledger("poisson", 10, 2, 1.0, 1) + _ledger("fixed", 10, 2, 1.0, 1)
    with pytest.raises(ValueError, match="different samplings"):
        epsilon(mixed, "rdp", 1e-5)
    with pytest.raises(ValueError, match="Poisson sampling only"):
        epsilon(_ledger("fixed", 10, 2, 1.0, 1), "pld", 1e-5)
    assert math.isfinite(epsilon(_ledger("fixed", 10, 2, 1.0, 1), "rdp", 1e-5))
