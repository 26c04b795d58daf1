"""A federated run that mixes engines: device 0 trains with ONNX Runtime, device 1 with PyTorch.

One 2-round Flower simulation on the tiny random Llama (Ray start-up dominates its time). The
ORT device builds its training artefacts once in its storage folder and reuses them in round
2; both devices' 1-bit replies are accepted every round and the global adapter moves.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgetune import wire
from edgetune.adapters.lora import adapter_shapes, init_adapter
from edgetune.adapters.peft_io import ADAPTER_WEIGHTS
from edgetune.config import from_flat
from edgetune.fileio import load_tensors
from edgetune.models import model_skeleton
from edgetune.server.metrics import read_metrics
from edgetune.simulations.simulate import simulate

pytestmark = pytest.mark.e2e


def test_ort_device_and_pytorch_device_share_a_round(tmp_path: Path) -> None:
    cfg = from_flat(
        {
            "seed": 3,
            "run-dir": str(tmp_path / "run"),
            "model.base": "tiny",
            "lora.rank": 4,
            "data.max-length": 128,
            "train.local-steps": 2,
            "train.batch-size": 4,
            "train.ort-devices": "0",
            "federation.rounds": 2,
            "federation.num-devices": 2,
        }
    )
    run_dir = simulate(cfg)

    rounds = [m for m in read_metrics(run_dir) if m["round"] >= 1]
    assert [m["round"] for m in rounds] == [1, 2]
    for m in rounds:
        assert m["replies"] == 2 and m["rejected"] == [], m
        assert m["train_loss"] is not None and m["train_loss"] > 0

    builds = list((run_dir / wire.DEVICES_DIR / "sim-0" / wire.ORT_ARTIFACTS_DIR).iterdir())
    assert len(builds) == 1 and (builds[0] / "training_model.onnx").is_file()  # built once, reused
    assert not (run_dir / wire.DEVICES_DIR / "sim-1" / wire.ORT_ARTIFACTS_DIR).exists()

    shapes = adapter_shapes(model_skeleton("tiny"), cfg.lora)
    initial = init_adapter(shapes, cfg.seed)
    final = load_tensors(run_dir / wire.ADAPTER_DIR / ADAPTER_WEIGHTS)
    moved = [k for k in final if ".lora_B." in k and not torch.equal(final[k], initial[k])]
    assert moved, "the global adapter did not change"
