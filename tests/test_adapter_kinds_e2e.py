"""End-to-end: DoRA, binary adapter weights and an int8 base each federate over 2 rounds in a
Flower simulation on the tiny Llama (``pytest -m e2e``; about 30 s each, mostly Ray start-up)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from edgetune import wire
from edgetune.adapters.binary_io import BINARY_WEIGHTS, load_binary_adapter
from edgetune.adapters.peft_io import load_adapter
from edgetune.config import DataConfig, FederationConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig
from edgetune.server.metrics import read_metrics
from edgetune.simulations.simulate import simulate
from edgetune.types import Codec

pytestmark = pytest.mark.e2e


def _run(tmp_path: Path, lora: LoraConfig, quantize: str = "none", codec: Codec = "1bit") -> tuple[Path, list[dict]]:
    cfg = RunConfig(
        seed=3,
        run_dir=str(tmp_path / "run"),
        model=ModelConfig(base="tiny", quantize=quantize),
        lora=lora,
        data=DataConfig(max_length=128, max_eval_examples=8),
        train=TrainConfig(local_steps=2, batch_size=4, precision="fp32"),
        federation=FederationConfig(rounds=2, num_devices=2, codec=codec),
    )
    run_dir = simulate(cfg)
    rows = read_metrics(run_dir)
    assert [m["round"] for m in rows] == [0, 1, 2]
    assert all(m["eval_loss"] is not None and math.isfinite(m["eval_loss"]) for m in rows)
    assert all(m["replies"] == 2 and m["rejected"] == [] for m in rows[1:])
    return run_dir, rows


def test_dora_federates_two_rounds(tmp_path: Path) -> None:
    run_dir, rows = _run(tmp_path, LoraConfig(rank=4, kind="dora"))
    assert all(m["aggregation_error"] is not None and m["aggregation_error"] > 0 for m in rows[1:])
    adapter = load_adapter(run_dir / wire.ADAPTER_DIR)
    assert sum(".lora_magnitude_vector" in k for k in adapter) == 14


def test_binary_adapter_federates_two_rounds(tmp_path: Path) -> None:
    run_dir, rows = _run(tmp_path, LoraConfig(rank=4, kind="binary"), codec="fp16")
    # Latent FedAvg is exact; what binarising the mean costs is measured and > 0.
    assert all(m["aggregation_error"] is not None and m["aggregation_error"] > 0 for m in rows[1:])
    folder = run_dir / wire.ADAPTER_DIR
    assert (folder / BINARY_WEIGHTS).is_file()
    dense, packed = load_adapter(folder), load_binary_adapter(folder)
    assert dense.keys() == packed.keys() and all(torch.equal(dense[k], packed[k]) for k in dense)
    assert any(dense[k].abs().sum() > 0 for k in dense if ".lora_B." in k)


def test_int8_base_federates_two_rounds(tmp_path: Path) -> None:
    _, rows = _run(tmp_path, LoraConfig(rank=4), quantize="int8")
    assert rows[-1]["eval_loss"] != rows[0]["eval_loss"]
