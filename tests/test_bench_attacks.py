"""The attack benchmark (simulations/bench_attacks.py) on the tiny model, in-process (no Ray)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from edgetune.simulations.bench_attacks import main, malicious_deltas


def test_crafted_deltas_match_hand_computed_values() -> None:
    own = [{"w": torch.tensor([1.0, -2.0])}]
    honest = [{"w": torch.tensor([v, 0.0])} for v in (1.0, 2.0, 3.0, 4.0)]
    assert malicious_deltas("sign-flip", own, honest, 5, 0)[0]["w"].tolist() == [-1.0, 2.0]
    assert malicious_deltas("scale", own, honest, 5, 0)[0]["w"].tolist() == [100.0, -200.0]
    # ALIE, n = 5, k = 1: s = floor(5/2 + 1) - 1 = 2, z = Phi^-1(3/5) = 0.253347;
    # coordinate 0: mean 2.5, population std sqrt(1.25) = 1.118034 -> 2.5 - 0.283248.
    alie = malicious_deltas("alie", own, honest, 5, 0)[0]["w"]
    assert alie.tolist() == pytest.approx([2.5 - 0.253347 * 1.118034, 0.0], abs=1e-5)
    noise = malicious_deltas("noise", own, honest, 5, 0)[0]["w"]
    assert noise.shape == (2,) and torch.equal(noise, malicious_deltas("noise", own, honest, 5, 0)[0]["w"])
    with pytest.raises(ValueError, match="unknown attack"):
        malicious_deltas("flood", own, honest, 5, 0)


def test_tiny_attack_table_runs_and_validation_stops_the_scaling_attack(tmp_path: Path) -> None:
    argv = ["--devices", "5", "--rounds", "1", "--attacks", "scale,alie", "--aggregators", "mean,median"]
    summary = main([*argv, "--fractions", "0,0.2", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "result.json").read_text()) == summary
    rows = {(r["attack"], r["aggregator"]): r for r in summary["results"]}
    assert set(rows) == {(a, g) for a in ("none", "scale", "alie") for g in ("mean", "median")}
    assert all(math.isfinite(r["honest_eval_loss"]) and -1 <= r["cosine"] <= 1 for r in rows.values())
    # x100 lies far beyond federation.max-delta-rms: validation rejects it before any aggregator.
    assert rows[("scale", "mean")]["rejected"] == 1 and rows[("none", "mean")]["rejected"] == 0
    assert rows[("alie", "mean")]["malicious"] == 1
