"""Per-conversation losses under a run's final model and under its base model.

The auditor loads the run's base model once with a LoRA adapter attached, then swaps adapter
tensors: the run's final global adapter (``run_dir/adapter``) gives the fine-tuned model; the
version-0 adapter (A from the run seed, B = 0, so B A = 0) gives exactly the base model.
Losses are summed over each conversation's supervised (assistant) tokens, in fp32, in a fixed
order, without gradients.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from tqdm import tqdm

from edgetune import wire
from edgetune.adapters.lora import device_model, init_adapter, model_adapter_shapes, set_adapter
from edgetune.adapters.peft_io import load_adapter
from edgetune.chat import Example, Messages, collate, tokenize_conversation
from edgetune.config import RunConfig
from edgetune.lm import label_logits, label_mask, pad_id

__all__ = ["Losses", "RunModels", "conversation_losses"]


@dataclass(frozen=True)
class Losses:
    """Per-conversation summed loss (nats) and supervised-token count."""

    total: np.ndarray
    tokens: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        """Loss per supervised token."""
        return self.total / np.maximum(self.tokens, 1)


def _batches(examples: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    for start in range(0, len(examples), size):
        yield examples[start : start + size]


@torch.no_grad()
def conversation_losses(
    model: PeftModel, examples: Sequence[Example], pad_id: int, batch_size: int = 16, desc: str = ""
) -> Losses:
    """Summed next-token cross-entropy over each example's labelled tokens."""
    totals, counts = [], []
    batches = _batches(examples, batch_size)
    for chunk in tqdm(batches, total=-(-len(examples) // batch_size), desc=desc, unit="batch", disable=not desc):
        batch = collate(chunk, pad_id)
        logits, labels = label_logits(model, batch)  # (N, V), (N,)
        per_token = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        keep = label_mask(batch)  # (B, T-1), the rows of logits in row-major order
        rows = keep.nonzero()[:, 0]
        totals.append(torch.zeros(len(chunk)).index_add_(0, rows, per_token).numpy())
        counts.append(keep.sum(dim=1).numpy())
    if not totals:
        return Losses(np.zeros(0), np.zeros(0))
    return Losses(np.concatenate(totals).astype(np.float64), np.concatenate(counts).astype(np.int64))


class RunModels:
    """A run's base model with its final adapter or with none, one loaded model shared."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        adapter_dir = Path(run_dir) / wire.ADAPTER_DIR
        if not adapter_dir.is_dir():
            raise FileNotFoundError(f"{run_dir} has no final adapter ({adapter_dir}); did the run complete?")
        self.cfg = cfg
        self.model, self.tokenizer = device_model(cfg.model.base, cfg.lora)
        self.model.eval()
        shapes = model_adapter_shapes(self.model)
        self.base_state = init_adapter(shapes, cfg.seed)
        self.final_state = {**self.base_state, **load_adapter(adapter_dir)}

    def encode(self, conversations: Sequence[Messages]) -> list[Example]:
        """Chat-template each conversation (labels on the assistant turns)."""
        return [tokenize_conversation(self.tokenizer, m, self.cfg.data.max_length) for m in conversations]

    def losses(self, examples: Sequence[Example], which: str, desc: str = "") -> Losses:
        """Losses under ``which`` = ``final`` (fine-tuned) or ``base``."""
        if which not in ("final", "base"):
            raise ValueError(f"which={which!r}: expected 'final' or 'base'")
        set_adapter(self.model, self.final_state if which == "final" else self.base_state)
        return conversation_losses(self.model, examples, pad_id(self.tokenizer), desc=desc)
