"""bench_trainer's Trainer + PEFT client and how it sets the two sides against each other."""

from __future__ import annotations

import math
import sys

import pytest

from edgetune.adapters.lora import adapter_shapes
from edgetune.config import DataConfig, FederationConfig, ModelConfig, RunConfig, TrainConfig
from edgetune.models import model_skeleton
from edgetune.simulations import bench_trainer
from edgetune.simulations.bench_trainer import _best_rate, _ratios, run_trainer


def test_the_trainer_client_trains_both_factors_and_sends_them_in_fp32(tmp_path) -> None:
    cfg = RunConfig(
        run_dir=str(tmp_path / "run"),
        model=ModelConfig(base="tiny"),
        data=DataConfig(max_length=128),
        train=TrainConfig(local_steps=2, batch_size=2, learning_rate=8e-3, max_grad_norm=1.0, precision="fp32"),
        federation=FederationConfig(rounds=1, num_devices=2),
    )
    factor_bytes = 4 * sum(math.prod(s) for s in adapter_shapes(model_skeleton("tiny"), cfg.lora).values())  # A and B

    result = run_trainer(cfg)

    assert result["bytes_up_per_round"] == result["bytes_down_per_round"] == 2 * factor_bytes  # A and B, 2 devices
    assert math.isfinite(result["heldout_loss"]) and result["heldout_loss"] != result["heldout_loss_before"]
    assert result["cpu_seconds_per_update"] > 0 and result["cpu_seconds_per_1k_tokens"] > 0


def test_updates_per_hour_is_the_median_of_each_repeats_own_ratio() -> None:
    e = {"cpu_seconds_per_1k_tokens": 2.0, "bytes_up_per_round": 10.0, "bytes_down_per_round": 10.0}
    t = {"cpu_seconds_per_1k_tokens": 3.0, "bytes_up_per_round": 300.0, "bytes_down_per_round": 310.0}
    e["heldout_loss"], t["heldout_loss"] = 1.0, 1.1

    ratio = _ratios(e, t, e_cpu=[10.0, 20.0, 10.0], t_cpu=[30.0, 20.0, 16.0])

    assert ratio["updates_per_hour_runs"] == [3.0, 1.0, 1.6] and ratio["updates_per_hour"] == 1.6
    assert ratio["tokens_per_cpu_second"] == 1.5
    assert (ratio["fewer_bytes_up"], ratio["fewer_bytes_down"]) == (30.0, 31.0)


def test_a_diverged_rate_is_never_the_best() -> None:
    runs = {
        "8e-3": {"edgetune": {"heldout_loss": math.nan}, "trainer": {"heldout_loss": 1.2}},
        "2e-3": {"edgetune": {"heldout_loss": 1.3}, "trainer": {"heldout_loss": 1.1}},
    }

    assert (_best_rate(runs, "edgetune"), _best_rate(runs, "trainer")) == ("2e-3", "2e-3")


def test_an_unknown_precision_is_refused_before_anything_runs(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_trainer", "--precision", "fp16"])

    with pytest.raises(SystemExit) as exit_:
        bench_trainer.main()

    assert exit_.value.code == 2
    assert "--precision" in capsys.readouterr().err
