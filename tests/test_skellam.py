"""Distributed-DP accounting (``server/skellam.py``): parity with the reference formula on a
grid, the Gaussian limit, composition through the ledger, and the DDP plan's bounds."""

from __future__ import annotations

import dataclasses
import math

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant

from edgetune.adapters.secagg_quant import ddp_plan
from edgetune.server.accounting import RoundEvent, epsilon, events_from_json, events_to_json
from edgetune.server.skellam import ORDERS, skellam_epsilon, skellam_rdp


def reference_skellam_rdp(l1_sens: float, l2_sens: float, central_var: float, scale: float, order: int) -> float:
    """The RDP of google-research/federated ``distributed_dp/accounting_utils.py`` (``_skellam_rdp``),
    restated: sensitivities and variance in the *unscaled* domain, ``scale`` the integer grid's."""
    a, s, mu = order, scale, central_var
    rdp = a / (2 * mu) * l2_sens**2
    rdp += min(((2 * a - 1) * s * l2_sens**2 + 6 * l1_sens) / (4 * s**3 * mu**2), 3 * l1_sens / (2 * s * mu))
    return rdp


@pytest.mark.parametrize("scale", [1.0, 10.0, 300.0])
@pytest.mark.parametrize("order", [2, 8, 64])
@pytest.mark.parametrize(("l2", "stddev"), [(1.0, 0.5), (0.1, 1.0), (3.0, 30.0)])
def test_matches_the_reference_formula_on_a_grid(scale: float, order: int, l2: float, stddev: float) -> None:
    l1 = l2 * math.sqrt(1000)
    ours = skellam_rdp(order, scale * l1, scale * l2, (scale * stddev) ** 2)  # integer units
    assert ours == pytest.approx(reference_skellam_rdp(l1, l2, stddev**2, scale, order), rel=1e-12)


def test_approaches_the_gaussian_mechanism_as_the_noise_grows() -> None:
    """Agarwal et al.: the Skellam mechanism's RDP tends to the Gaussian's at the same variance."""
    z, rounds, delta = 1.0, 10, 1e-5
    acc = RdpAccountant(orders=[float(a) for a in ORDERS])
    acc.compose(dp_accounting.GaussianDpEvent(z), rounds)
    gaussian = acc.get_epsilon(delta)
    previous = math.inf
    for l2 in (10.0, 100.0, 1000.0, 10_000.0):
        event = RoundEvent(1, "poisson", 4, 4.0, z, 4, "skellam", l1=l2 * 30, l2=l2, variance=(z * l2) ** 2)
        eps = skellam_epsilon([event] * rounds, delta)
        assert gaussian <= eps <= previous  # never below the Gaussian, closer as mu grows
        previous = eps
    assert previous == pytest.approx(gaussian, rel=1e-3)


def test_ledger_composes_skellam_rounds_and_round_trips() -> None:
    plan = ddp_plan(clip_norm=1.0, bits=16, dim=10_000, cohort=8, noise_multiplier=1.0, threshold=5)
    event = RoundEvent(1, "fixed", 8, 8.0, 1.0, 8, "skellam", plan.l1, plan.l2, plan.central_variance)
    ledger = [dataclasses.replace(event, round=r) for r in (1, 2, 3)]
    assert events_from_json(events_to_json(ledger)) == ledger
    eps = epsilon(ledger, "rdp", 1e-5)
    assert eps == skellam_epsilon(ledger, 1e-5) and 0 < eps < math.inf
    with pytest.raises(ValueError, match="mechanisms"):
        epsilon([ledger[0], dataclasses.replace(event, mechanism="gaussian")], "rdp", 1e-5)


def test_plan_bounds() -> None:
    """Rounding costs little sensitivity at 16 bits; k holds signal and noise; wrap bound tiny."""
    plan = ddp_plan(clip_norm=1.0, bits=16, dim=100_000, cohort=8, noise_multiplier=1.0, threshold=5)
    cs = 2**15 - 1
    assert cs < plan.l2 < cs * 1.02  # conditional rounding: D2^2 <= (Cs)^2 + d/4 + ...
    assert plan.l1 <= math.sqrt(plan.dim) * plan.l2
    assert plan.device_variance == pytest.approx(plan.central_variance / 4)
    assert plan.wrap_bound <= 1e-9 and 2 ** (plan.k - 1) > 8 * 2**15
