"""Local training and evaluation of the adapter on one device's examples.

One base model per process: :func:`device_model` is cached, so every virtual device a
simulation process serves reuses the same weights and only swaps adapter tensors in.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from edgetune.adapters.lora import attach_lora
from edgetune.client.data import collate
from edgetune.config import LoraConfig, TrainConfig
from edgetune.models import load_base

__all__ = ["StepStats", "autocast", "device_model", "evaluate", "summed_loss", "train_local"]


@dataclass(frozen=True)
class StepStats:
    """What a call of :func:`train_local` or :func:`evaluate` measured."""

    loss: float
    """Mean cross-entropy per label token."""
    tokens: int
    """Label tokens processed (the loss is averaged over these)."""
    seen_tokens: int
    """All tokens processed, prompt included (what throughput counts)."""
    seconds: float


@functools.cache
def device_model(base: str, lora: LoraConfig, quantize: str = "none") -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The process-wide base model (``quantize``: model.quantize) with an adapter attached (loaded once)."""
    model, tokenizer = load_base(base, quantize)
    return attach_lora(model, lora), tokenizer


def autocast(precision: str) -> contextlib.AbstractContextManager[None]:
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def summed_loss(model: PeftModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over label tokens, and their count.

    The LM head runs only on positions that have a label: with a 49k vocabulary it is a
    large share of the compute, and most positions (system prompt, question) carry none.
    """
    causal_lm = model.get_base_model()
    hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    keep = labels != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep]).float()  # (N, V)
    loss = torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum")
    return loss, int(keep.sum())


def train_local(model: PeftModel, batches: Iterator[dict[str, torch.Tensor]], cfg: TrainConfig) -> StepStats:
    """Run ``cfg.local_steps`` AdamW steps on the trainable adapter tensors.

    The optimizer is fresh each round (devices keep no optimizer state between rounds).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    model.train()
    total_loss, total_tokens, seen, start = 0.0, 0, 0, time.perf_counter()
    for _, batch in zip(range(cfg.local_steps), batches, strict=False):
        with autocast(cfg.precision):
            loss_sum, n = summed_loss(model, batch)
        (loss_sum / max(n, 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total_loss += loss_sum.item()
        total_tokens += n
        seen += int(batch["attention_mask"].sum())
    model.eval()
    return StepStats(total_loss / max(total_tokens, 1), total_tokens, seen, time.perf_counter() - start)


@torch.no_grad()
def evaluate(
    model: PeftModel, examples: Iterable[dict[str, list[int]]], pad_id: int, batch_size: int, precision: str
) -> StepStats:
    """Token-weighted mean loss over ``examples`` (no gradient, fixed order)."""
    items = list(examples)
    total_loss, total_tokens, seen, start = 0.0, 0, 0, time.perf_counter()
    for i in range(0, len(items), batch_size):
        batch = collate(items[i : i + batch_size], pad_id)
        with autocast(precision):
            loss_sum, n = summed_loss(model, batch)
        total_loss += float(loss_sum)
        total_tokens += n
        seen += int(batch["attention_mask"].sum())
    loss = total_loss / total_tokens if total_tokens else math.nan
    return StepStats(loss, total_tokens, seen, time.perf_counter() - start)
