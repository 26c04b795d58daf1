"""Language-model helpers every side uses: the label-position loss, held-out evaluation, autocast.

The loss convention is one everywhere (device training, held-out evaluation, distillation,
the privacy audit, ONNX Runtime training artefacts): position t predicts token t + 1, only
positions whose next token carries a label (not ``IGNORE_INDEX``) count, and the LM head runs
on those positions only. With a 49k vocabulary the head is a large share of the compute and
most positions (system prompt, question) carry no label.

Example:
    >>> loss_sum, n = summed_loss(model, collate(examples, pad_id(tokenizer)))
    >>> (loss_sum / n).backward()
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from edgetune.chat import IGNORE_INDEX, Batch, Example, collate, pack_rows
from edgetune.types import Precision

__all__ = [
    "StepStats",
    "autocast",
    "causal_lm",
    "evaluate",
    "label_logits",
    "label_mask",
    "pad_id",
    "summed_cross_entropy",
    "summed_loss",
]


@dataclass(frozen=True)
class StepStats:
    """What a pass of training or evaluation measured."""

    loss: float
    """Mean cross-entropy per label token."""
    tokens: int
    """Label tokens processed (the loss is averaged over these)."""
    seen_tokens: int
    """All tokens processed, prompt included (what throughput counts)."""
    seconds: float


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id written into padding: the tokenizer's pad token, else its EOS, else 0.

    Padding never reaches the loss (its labels are ``IGNORE_INDEX`` and its attention mask is 0),
    so any id is correct; this rule only makes every caller pick the same one.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def autocast(precision: Precision) -> contextlib.AbstractContextManager[None]:
    """bf16 CPU autocast for ``bf16``; nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def label_mask(batch: Batch) -> Tensor:
    """``(B, T-1)`` bool: position t has a label for token t + 1."""
    return batch["labels"][:, 1:] != IGNORE_INDEX


def _label_rows(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor, nn.Module]:
    """The decoder's last hidden state at the labelled positions (N, H), their labels (N,), the head."""
    lm: Any = causal_lm(model)  # a Hugging Face causal LM: .model (the decoder) and .lm_head
    packed = "position_ids" in batch  # pack_rows: the mask comes from the positions
    where = {"position_ids": batch["position_ids"]} if packed else {"attention_mask": batch["attention_mask"]}
    decoder = lm.model(input_ids=batch["input_ids"], use_cache=False, **where)
    keep = label_mask(batch)  # (B, T-1)
    return decoder.last_hidden_state[:, :-1][keep], batch["labels"][:, 1:][keep], lm.lm_head


def label_logits(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Logits at the labelled positions of a batch, and the labels they predict.

    Rows are in row-major order (example by example, left to right), as ``label_mask(batch)``
    selects them; the LM head runs only on those rows.

    Returns:
        ``(logits (N, V), labels (N,))``, logits in the compute dtype.
    """
    hidden, labels, head = _label_rows(model, batch)
    return head(hidden), labels


HEAD_CHUNK_ROWS = 64
"""Rows of the LM head and its loss computed at once by ``summed_loss(..., chunked=True)``."""

CE_CHUNK_ROWS = 16
"""Rows of logits :func:`summed_cross_entropy` takes through fp32 at once: 3 MB at SmolLM2's
49k vocabulary, so each row's passes stay in the CPU's cache (8 to 32 measured alike)."""


class _SummedCrossEntropy(torch.autograd.Function):
    """``cross_entropy(logits.float(), labels, reduction="sum")`` with its gradient made in the
    forward pass, ``CE_CHUNK_ROWS`` rows at a time.

    PyTorch's composite makes six passes over the (N, V) logits, each through memory: the fp32
    copy, log-softmax, and in the backward pass a zero-filled one-hot, log-softmax's backward
    and the cast back. Here each chunk of rows goes once through fp32 log-softmax, whose
    ``exp`` minus the one-hot is the gradient (``softmax - onehot``), stored in the logits'
    dtype: bf16 logits rounded the same way on PyTorch's path (its cast back). The backward
    pass only scales it by the incoming gradient, in place (a second backward through the
    same graph is refused: the saved gradient was modified). It is kept as a saved tensor,
    so activation checkpointing drops it and recomputes it like any other.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor) -> Tensor:
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        with torch.autocast(logits.device.type, enabled=False):
            for start in range(0, len(labels), CE_CHUNK_ROWS):
                rows = slice(start, start + CE_CHUNK_ROWS)
                log_p = torch.log_softmax(logits[rows].float(), dim=-1)
                targets = labels[rows, None]
                total -= log_p.gather(1, targets).sum()
                if grad is not None:
                    probs = log_p.exp_()
                    probs.scatter_add_(1, targets, probs.new_full(targets.shape, -1.0))
                    grad[rows] = probs
        if grad is not None:
            ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad.mul_(float(grad_total)), None


def summed_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross-entropy of ``logits`` (N, V) against ``labels`` (N,), in fp32.

    The same value and gradient as ``cross_entropy(logits.float(), labels, reduction="sum")``
    (labels must all be real tokens: ``IGNORE_INDEX`` rows are dropped before the head), at a
    third of its CPU time on bf16 logits and two thirds on fp32 ones (650 rows of SmolLM2's
    vocabulary); see :class:`_SummedCrossEntropy`. Traced, exported or compiled it is PyTorch's
    composite (the ONNX Runtime training graph holds that).
    """
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
    return _SummedCrossEntropy.apply(logits, labels)


def summed_loss(model: nn.Module, batch: Batch, chunked: bool = False) -> tuple[Tensor, int]:
    """Sum of next-token cross-entropy over the labelled positions, and their count.

    ``chunked`` (training with ``train.checkpointing=on``): the head and the loss run
    ``HEAD_CHUNK_ROWS`` rows at a time and are recomputed in the backward pass, so the
    (N, vocab) logits, their fp32 copy and their gradient never exist whole (about 300 MB at
    SmolLM2's 49k vocabulary and 448 label rows). The same sum, added in another order.
    """
    if not chunked:
        logits, labels = label_logits(model, batch)
        return summed_cross_entropy(logits, labels), int(labels.numel())
    hidden, labels, head = _label_rows(model, batch)

    def head_loss(rows: Tensor, targets: Tensor) -> Tensor:
        return summed_cross_entropy(head(rows), targets)

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(labels), HEAD_CHUNK_ROWS):
        rows = slice(start, start + HEAD_CHUNK_ROWS)
        total = total + torch.utils.checkpoint.checkpoint(head_loss, hidden[rows], labels[rows], use_reentrant=False)
    return total, int(labels.numel())


@torch.no_grad()
def evaluate(
    model: nn.Module, examples: Iterable[Example], pad: int, batch_size: int, precision: Precision
) -> StepStats:
    """The held-out loop: token-weighted mean loss over ``examples`` (no gradient, fixed order)."""
    items: Sequence[Example] = list(examples)
    total_loss, total_tokens, seen, start = 0.0, 0, 0, time.perf_counter()
    for i in range(0, len(items), batch_size):
        batch = collate(items[i : i + batch_size], pad)
        with autocast(precision):
            loss_sum, n = summed_loss(model, pack_rows(batch))
        total_loss += float(loss_sum)
        total_tokens += n
        seen += int(batch["attention_mask"].sum())
    loss = total_loss / total_tokens if total_tokens else math.nan
    return StepStats(loss, total_tokens, seen, time.perf_counter() - start)
