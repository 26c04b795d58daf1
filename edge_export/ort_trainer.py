"""Running ONNX Runtime training artefacts: a training session and the ORT-vs-PyTorch step timing.

    OrtTrainer      load a folder from ``edge_export.ort_training.build_artifacts``, start
                    from a given adapter with a fresh AdamW, step, read the adapter back
    benchmark_step  one batch, the same start: ORT steps vs the device's PyTorch steps
                    (time and loss); for the export benchmark and ``docs/export.md``

ORT runs fp32 on CPU; the PyTorch side can use bf16 autocast as the device path does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from torch import Tensor

from edgetune.edge_export.onnx_export import session_options
from edgetune.edge_export.ort_training import (
    CHECKPOINT_FILE,
    EVAL_FILE,
    INPUTS,
    OPTIMIZER_FILE,
    TRAINING_FILE,
    label_tokens,
    peft_name,
)

__all__ = ["OrtTrainer", "StepBenchmark", "benchmark_step"]


class OrtTrainer:
    """One training session over a set of artefacts: fresh AdamW state, given starting adapter.

    Args:
        folder: a folder written by ``edge_export.ort_training.build_artifacts``.
        start: the whole adapter to start from (PEFT names -> tensors), A and B.
        learning_rate: AdamW learning rate.

    Raises:
        ValueError: ``start`` and the checkpoint do not hold the same LoRA tensors (artefacts
            built for another LoRA config or base model).
    """

    def __init__(self, folder: Path, start: dict[str, Tensor], learning_rate: float) -> None:
        from onnxruntime.training.api import CheckpointState, Module, Optimizer

        self.state = CheckpointState.load_checkpoint(str(folder / CHECKPOINT_FILE))
        self.lora_names = {peft_name(n): n for n, _ in self.state.parameters if ".lora_" in n}
        options = session_options()
        self.module = Module(str(folder / TRAINING_FILE), self.state, str(folder / EVAL_FILE), "cpu", options)
        differ = sorted(set(start) ^ set(self.lora_names))
        if differ:
            raise ValueError(f"adapter and training checkpoint in {folder} differ, e.g. in {differ[0]}")
        # Parameters can only be written once a Module owns the state (ORT 1.19 crashes before).
        for name, onnx_name in self.lora_names.items():
            self.state.parameters[onnx_name] = start[name].detach().float().contiguous().numpy()
        self.optimizer = Optimizer(str(folder / OPTIMIZER_FILE), self.module)
        self.optimizer.set_learning_rate(learning_rate)

    def step(self, batch: dict[str, Tensor]) -> tuple[float, int]:
        """One AdamW step on ``batch``; returns (mean loss per label token, label tokens)."""
        self.module.train()
        feeds = [batch[k].numpy().astype(np.int64) for k in INPUTS]
        loss = float(self.module(*feeds))
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return loss, label_tokens(feeds[2])

    def eval_loss(self, batch: dict[str, Tensor]) -> float:
        """Mean loss per label token on ``batch`` with the eval graph (no update)."""
        self.module.eval()
        return float(self.module(*[batch[k].numpy().astype(np.int64) for k in INPUTS]))

    def adapter(self) -> dict[str, Tensor]:
        """The current LoRA tensors (fp32 copies), PEFT adapter-file names."""
        return {
            name: torch.from_numpy(np.array(self.state.parameters[onnx_name].data, dtype=np.float32))
            for name, onnx_name in self.lora_names.items()
        }


@dataclass(frozen=True)
class StepBenchmark:
    """One training step on the same batch from the same adapter, ORT vs PyTorch."""

    ort_seconds: float
    torch_seconds: float
    ort_loss: float
    torch_loss: float
    label_tokens: int
    precision: str
    """The PyTorch step's precision (ORT always runs fp32)."""

    @property
    def speedup(self) -> float:
        """PyTorch time / ORT time (> 1: ORT is faster)."""
        return self.torch_seconds / self.ort_seconds


def benchmark_step(
    model: PeftModel,
    batch: dict[str, Tensor],
    folder: Path,
    learning_rate: float,
    precision: str = "fp32",
    repeats: int = 3,
) -> StepBenchmark:
    """Time ONNX Runtime and PyTorch AdamW steps on ``batch`` from ``model``'s current adapter.

    Each engine starts from the same adapter with a fresh AdamW and runs ``1 + repeats``
    steps on the same batch: the first (warm-up: session memory planning, autograd set-up) is
    not timed and gives the reported loss, which should agree across engines to float
    tolerance in fp32; the time is the median of the other ``repeats``. ``model``'s adapter is
    restored afterwards.

    Args:
        model: PEFT model whose artefacts are in ``folder`` (see :func:`build_artifacts`).
        batch: ``input_ids``, ``attention_mask``, ``labels`` (``(B, T)`` int64).
        folder: the artefact folder.
        learning_rate: AdamW learning rate for both.
        precision: ``fp32`` or ``bf16`` (CPU autocast) for the PyTorch step; ORT is fp32.
        repeats: timed steps per engine.
    """
    from edgetune.adapters.lora import get_adapter, set_adapter

    start = get_adapter(model)
    trainer = OrtTrainer(folder, start, learning_rate)
    ort_losses, ort_times = _timed_steps(lambda: trainer.step(batch)[0], repeats)
    torch_step = _torch_stepper(model, batch, learning_rate, precision)
    torch_losses, torch_times = _timed_steps(torch_step, repeats)
    model.eval()
    set_adapter(model, start)
    return StepBenchmark(
        float(np.median(ort_times)),
        float(np.median(torch_times)),
        ort_losses[0],
        torch_losses[0],
        label_tokens(batch["labels"].numpy()),
        precision,
    )


def _timed_steps(step: Callable[[], float], repeats: int) -> tuple[list[float], list[float]]:
    """Run ``1 + repeats`` steps; return every loss and the times of all but the first."""
    losses, times = [], []
    for _ in range(1 + repeats):
        began = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - began)
    return losses, times[1:]


def _torch_stepper(
    model: PeftModel, batch: dict[str, Tensor], learning_rate: float, precision: str
) -> Callable[[], float]:
    """One device-path PyTorch step per call (``client.train.train_local``'s inner loop)."""
    from edgetune.lm import autocast, summed_loss

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    model.train()

    def step() -> float:
        with autocast(precision):
            loss_sum, count = summed_loss(model, batch)
        loss = loss_sum / max(count, 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step
