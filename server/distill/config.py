"""Settings of one distillation run (``edgetune distill``), validated where they are made.

The CLI builds a :class:`DistillConfig` from its flags; the error of a bad value names the flag.
Unlike the federated run's config tree (:mod:`edgetune.config`) these settings never travel to a
device: they belong to the cloud node only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from edgetune.config import PRECISIONS, ConfigError

__all__ = ["KL_KINDS", "LOSSES", "DistillConfig"]

KL_KINDS = ("forward-kl", "reverse-kl", "skew-kl")
LOSSES = (*KL_KINDS, "seq")


@dataclass(frozen=True)
class DistillConfig:
    """One distillation run. Validation names the flag and the bad value."""

    out: Path
    """Output folder: the student (Hugging Face format), README.md, distill.json, checkpoints."""
    teacher: str = "smollm2"
    """Teacher model spec as given (recorded in the model card)."""
    student: str = "prune:half"
    """``prune:<layer spec>`` (see :mod:`server.distill.prune`) or a model spec."""
    data: str = "public"
    """``public`` (the cloud's pydoc prompt set) or a chat JSONL file."""
    train_limit: int = 0
    """Use only N training conversations, evenly spaced over the set (0: all of them)."""
    loss: str = "forward-kl"
    """``forward-kl``, ``reverse-kl``, ``skew-kl`` (token level) or ``seq`` (sequence level)."""
    temperature: float = 1.0
    """Softening temperature T of both distributions (token level); sampling temperature (seq)."""
    alpha: float = 0.5
    """Weight of the soft term: loss = alpha T^2 KL + (1 - alpha) CE."""
    skew: float = 0.1
    """Skew l of the skew KL, KL(p || l p + (1 - l) q)."""
    top_k: int = 64
    """Teacher tokens kept per position in the cache (the rest is one bucket)."""
    steps: int = 0
    """Optimizer steps in all; 0 means ``epochs`` full passes over the training examples."""
    epochs: int = 2
    """Passes over the training examples when ``steps`` is 0."""
    batch_size: int = 8
    """Conversations per optimizer step."""
    lr: float = 2e-4
    """Peak AdamW learning rate (full-parameter training of the student)."""
    warmup: int = 10
    """Linear warm-up steps before the cosine decay to 10% of ``lr``."""
    max_length: int = 256
    """Longest tokenized conversation (tokens past it are cut)."""
    precision: str = "bf16"
    """``bf16`` autocast or ``fp32`` for every forward pass."""
    seed: int = 0
    """Seed of the data order and of sampled generations."""
    checkpoint_every: int = 50
    """Write a checkpoint every this many steps (and at the end)."""
    generate: str = "greedy"
    """Sequence level: ``greedy`` or ``sample`` (top-p 0.95 at ``temperature``)."""
    max_new_tokens: int = 128
    """Sequence level: longest teacher answer in tokens."""
    cache_dir: Path | None = None
    """Teacher cache root (default ``<edgetune cache>/distill``)."""
    resume: bool = False
    """Continue from the newest checkpoint in ``out``."""

    def __post_init__(self) -> None:
        checks = [
            (self.loss in LOSSES, "--loss", self.loss, f"one of {LOSSES}"),
            (self.temperature > 0 and math.isfinite(self.temperature), "--temperature", self.temperature, "> 0"),
            (0.0 <= self.alpha <= 1.0, "--alpha", self.alpha, "in [0, 1]"),
            (0.0 <= self.skew < 1.0, "--skew", self.skew, "in [0, 1)"),
            (self.top_k >= 1, "--top-k", self.top_k, ">= 1"),
            (self.train_limit >= 0, "--train-limit", self.train_limit, ">= 0"),
            (self.steps >= 0, "--steps", self.steps, ">= 0"),
            (self.epochs >= 1, "--epochs", self.epochs, ">= 1"),
            (self.batch_size >= 1, "--batch-size", self.batch_size, ">= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "--lr", self.lr, "> 0"),
            (self.warmup >= 0, "--warmup", self.warmup, ">= 0"),
            (self.max_length >= 8, "--max-length", self.max_length, ">= 8"),
            (self.precision in PRECISIONS, "--precision", self.precision, f"one of {PRECISIONS}"),
            (self.checkpoint_every >= 1, "--checkpoint-every", self.checkpoint_every, ">= 1"),
            (self.generate in ("greedy", "sample"), "--generate", self.generate, "greedy or sample"),
            (self.max_new_tokens >= 1, "--max-new-tokens", self.max_new_tokens, ">= 1"),
        ]
        for ok, flag, value, need in checks:
            if not ok:
                raise ConfigError(f"{flag} {value!r}: must be {need}")
