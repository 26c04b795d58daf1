"""The baselines a federated run is judged against, trained on the same data and budget.

    federated_steps  local steps each device trained in the run (from its metrics.jsonl)
    train_adapter    ``client.train.train_local`` from a start state, counting steps and examples
    local_only       each device alone: its own training split, the steps it trained in the run
    centralised      one adapter on the union of all training splits, the run's total steps
    personalised     the run's global adapter plus a few local steps on each device

Every baseline starts where the run started (A from the run seed, B = 0; ``init_adapter``)
except ``personalised``, which starts from the global adapter, and all use the run's batch
size, learning rate and precision. Local-only and centralised train with one AdamW optimizer
over all their steps (the run restarts it every round). Batches come from
``edgetune.chat.iterate_batches`` with a seed derived from (run seed, baseline, device), so a
rerun repeats exactly. The PyTorch engine trains every baseline.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from peft import PeftModel
from tqdm import tqdm

from edgetune.adapters.lora import get_adapter, set_adapter
from edgetune.chat import Batch, Example, iterate_batches
from edgetune.client.train import train_local
from edgetune.config import RunConfig
from edgetune.datasets.devices import TokenizedDevice
from edgetune.types import StateDict

__all__ = [
    "Trained",
    "baseline_seed",
    "centralised",
    "federated_steps",
    "local_only",
    "personalised",
    "train_adapter",
]


@dataclass(frozen=True)
class Trained:
    """An adapter a baseline trained, and exactly what it consumed."""

    state: StateDict
    steps: int
    """Optimizer steps taken."""
    examples: int
    """Training conversations drawn over all steps (with repetition across epochs)."""
    loss: float
    """Mean training loss per label token over the steps (nan with no steps)."""


def baseline_seed(run_seed: int, baseline: str, name: str) -> int:
    """The data-order seed of one baseline on one device (or ``"*"`` for the pooled data)."""
    return int.from_bytes(hashlib.sha256(repr((run_seed, baseline, name)).encode()).digest()[:8], "little")


def federated_steps(rows: Sequence[dict], num_devices: int, local_steps: int) -> list[int]:
    """Local steps each simulated device trained in a run: ``local_steps`` per accepted reply.

    Device ``i`` is ``sim-i`` in ``metrics.jsonl``; a round counts for it when its training
    reply was accepted (its ``per_device`` entry has a ``train_loss``).
    """
    counts = [0] * num_devices
    for row in rows:
        for device, values in row.get("per_device", {}).items():
            index = device.removeprefix("sim-")
            if "train_loss" in values and index.isdigit() and int(index) < num_devices:
                counts[int(index)] += local_steps
    return counts


def _counted(batches: Iterator[Batch], tally: list[int]) -> Iterator[Batch]:
    """Pass batches through, adding one step and the batch's rows to ``tally``."""
    for batch in batches:
        tally[0] += 1
        tally[1] += int(batch["input_ids"].shape[0])
        yield batch


def train_adapter(
    model: PeftModel,
    start: StateDict,
    examples: Sequence[Example],
    steps: int,
    cfg: RunConfig,
    seed: int,
    pad_id: int,
    desc: str = "",
) -> Trained:
    """``steps`` local AdamW steps of ``cfg.train`` from ``start`` on ``examples``.

    A non-empty ``desc`` labels a progress bar over the steps (on the console's stderr).

    Raises:
        ValueError: ``steps`` is negative, or ``examples`` is empty while ``steps`` > 0.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps == 0:
        return Trained({k: v.clone() for k, v in start.items()}, 0, 0, float("nan"))
    set_adapter(model, start)
    tally = [0, 0]
    batches = _counted(iterate_batches(examples, cfg.train.batch_size, steps, seed, pad_id), tally)
    bar = tqdm(batches, total=steps, desc=desc, unit="step", leave=False, disable=not desc)
    stats = train_local(model, iter(bar), dataclasses.replace(cfg.train, local_steps=steps))
    bar.close()
    return Trained(get_adapter(model), tally[0], tally[1], stats.loss)


def local_only(
    model: PeftModel, device: TokenizedDevice, steps: int, start: StateDict, cfg: RunConfig, pad_id: int
) -> Trained:
    """One device trains alone on its own training split for ``steps`` steps."""
    seed = baseline_seed(cfg.seed, "local-only", device.name)
    return train_adapter(model, start, device.train, steps, cfg, seed, pad_id, f"local-only {device.name}")


def centralised(
    model: PeftModel, devices: Sequence[TokenizedDevice], steps: int, start: StateDict, cfg: RunConfig, pad_id: int
) -> Trained:
    """One adapter on the union of every device's training split (device order), ``steps`` steps."""
    pooled = [example for device in devices for example in device.train]
    seed = baseline_seed(cfg.seed, "centralised", "*")
    return train_adapter(model, start, pooled, steps, cfg, seed, pad_id, "centralised")


def personalised(
    model: PeftModel, device: TokenizedDevice, steps: int, global_state: StateDict, cfg: RunConfig, pad_id: int
) -> Trained:
    """The global adapter fine-tuned for ``steps`` more steps on one device's training split."""
    seed = baseline_seed(cfg.seed, "personalised", device.name)
    return train_adapter(model, global_state, device.train, steps, cfg, seed, pad_id, f"personalised {device.name}")
