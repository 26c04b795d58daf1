"""Evaluation of a distillation run: held-out loss and forward-pass speed, same run, same data.

Held-out loss is the mean next-token cross-entropy per supervised (assistant) token, each
model on its own tokenization of the held-out conversations. Forward speed is tokens per
second of a full forward pass (all positions, full-vocabulary logits) over up to eight
held-out batches, after one warm-up batch, under the run's precision.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from edgetune.chat import Example, collate
from edgetune.lm import autocast, evaluate, pad_id
from edgetune.server.distill.config import DistillConfig

__all__ = ["evaluate_after", "evaluate_before", "forward_speed", "heldout_loss", "parameter_count"]

Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]
HeldOut = dict[str, list[Example]]
"""The held-out conversations tokenized for ``"teacher"`` and for ``"student"``."""


def heldout_loss(model: PreTrainedModel, examples: Sequence[Example], pad: int, batch: int, precision: str) -> float:
    """Mean next-token cross-entropy per supervised token over ``examples`` (the kernel's held-out loop)."""
    return evaluate(model, examples, pad, batch, precision).loss


@torch.no_grad()
def forward_speed(model: PreTrainedModel, examples: Sequence[Example], pad: int, batch: int, precision: str) -> float:
    """Tokens per second of a full forward pass (all positions, full logits), after one warm-up batch."""
    batches = [collate(examples[i : i + batch], pad) for i in range(0, min(len(examples), 8 * batch), batch)]
    with autocast(precision):
        model(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
        start, tokens = time.perf_counter(), 0
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            tokens += int(b["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def evaluate_before(cfg: DistillConfig, teacher: Loaded, student: Loaded, held: HeldOut) -> dict[str, float]:
    """Held-out loss of the teacher and of the untrained student."""
    print(f"distill: held-out loss of teacher and student before training ({len(held['student'])} conversations)")
    teacher_loss = heldout_loss(teacher[0], held["teacher"], pad_id(teacher[1]), cfg.batch_size, cfg.precision)
    student_loss = heldout_loss(student[0], held["student"], pad_id(student[1]), cfg.batch_size, cfg.precision)
    print(f"distill: held-out loss teacher {teacher_loss:.4f}, student before {student_loss:.4f}")
    return {"teacher_heldout_loss": teacher_loss, "student_heldout_loss_before": student_loss}


def evaluate_after(cfg: DistillConfig, teacher: Loaded, student: Loaded, held: HeldOut) -> dict[str, float]:
    """Held-out loss of the trained student; forward speed of teacher and student, and their ratio."""
    print("distill: held-out loss after training; forward speed of teacher and student")
    pad_t, pad_s = pad_id(teacher[1]), pad_id(student[1])
    teacher_speed = forward_speed(teacher[0], held["teacher"], pad_t, cfg.batch_size, cfg.precision)
    student_speed = forward_speed(student[0], held["student"], pad_s, cfg.batch_size, cfg.precision)
    return {
        "student_heldout_loss_after": heldout_loss(student[0], held["student"], pad_s, cfg.batch_size, cfg.precision),
        "teacher_tokens_per_s": teacher_speed,
        "student_tokens_per_s": student_speed,
        "student_speedup": student_speed / teacher_speed,
    }
