"""Distillation checkpoints: student weights, AdamW state, step and RNG, without pickle.

A checkpoint is a folder ``<out>/checkpoints/step-<n>/`` holding

    student.safetensors    the student's state dict (fp32)
    optimizer.safetensors  AdamW tensors, keyed ``"<param index>.<name>"`` (exp_avg, exp_avg_sq, step)
    state.json             the step, the optimizer's param groups, the run's fingerprint, the
                           loss history, and the torch RNG state (as a list of bytes)

It is written as ``step-<n>.tmp`` and renamed into place, so a folder named ``step-<n>``
is always complete; older checkpoints are removed after the new one is in place. The data
order needs no saving: epoch ``e`` shuffles with ``numpy.random.default_rng([seed, e])``.
Loading reads only safetensors and JSON (never ``torch.load``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgetune.fileio import atomic_save, atomic_write_text, load_tensors

__all__ = ["CHECKPOINTS_DIR", "Checkpoint", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

CHECKPOINTS_DIR = "checkpoints"
_PREFIX = "step-"


@dataclass
class Checkpoint:
    """What a resumed run needs besides its config."""

    step: int
    fingerprint: str
    """Hash of the run's config and data; a resume with a different one is refused."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per-step training figures so far (loss, kl, ce, seconds)."""
    figures: dict[str, float] = field(default_factory=dict)
    """Evaluation figures measured before training (so a resumed run can report them)."""


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().clone()
        for index, slots in state["state"].items()
        for name, value in slots.items()
        if isinstance(value, torch.Tensor)
    }
    return tensors, state["param_groups"]


def save_checkpoint(
    out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Checkpoint
) -> Path:
    """Write checkpoint ``step-<n>`` atomically and remove the older ones.

    Returns:
        The checkpoint folder.
    """
    root = out / CHECKPOINTS_DIR
    final = root / f"{_PREFIX}{checkpoint.step:07d}"
    tmp = root / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_save({k: v.detach().clone() for k, v in model.state_dict().items()}, tmp / "student.safetensors")
    tensors, groups = _optimizer_tensors(optimizer)
    atomic_save(tensors, tmp / "optimizer.safetensors")
    meta = {
        "step": checkpoint.step,
        "fingerprint": checkpoint.fingerprint,
        "history": checkpoint.history,
        "figures": checkpoint.figures,
        "param_groups": groups,
        "torch_rng": torch.get_rng_state().tolist(),
    }
    atomic_write_text(tmp / "state.json", json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in root.glob(f"{_PREFIX}*"):
        if old != final and not old.name.endswith(".tmp"):
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder under ``out``, or None."""
    folders = sorted(p for p in (out / CHECKPOINTS_DIR).glob(f"{_PREFIX}*") if not p.name.endswith(".tmp"))
    return folders[-1] if folders else None


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Checkpoint:
    """Restore the student, the optimizer and the torch RNG from ``folder``.

    Raises:
        ValueError: a file is missing or corrupt, or the tensors do not fit the model.
    """
    meta = json.loads((folder / "state.json").read_text())
    model.load_state_dict(load_tensors(folder / "student.safetensors"), strict=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_tensors(folder / "optimizer.safetensors").items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    return Checkpoint(
        step=meta["step"], fingerprint=meta["fingerprint"], history=meta["history"], figures=meta["figures"]
    )
