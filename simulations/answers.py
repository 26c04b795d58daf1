"""Generated answers on a device's held-out questions, scored against the references.

    heldout_questions   a conversation -> (prompt turns, reference = its last assistant turn)
    generate_ids        greedy, bounded-length, batched (left-padded) generation
    generate_answers    the same, decoded to text
    score_variant       one adapter state on one device: answers, their scores, held-out loss

The held-out loss is the project's own held-out loop (``client.train.evaluate``) over the same
examples a run evaluates each round, so it matches the run's ``eval_loss`` for the same adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from edgetune.adapters.lora import set_adapter
from edgetune.chat import Messages
from edgetune.datasets.devices import TokenizedDevice
from edgetune.lm import autocast, evaluate, pad_id
from edgetune.server.answer_metrics import score_answers

__all__ = ["Question", "generate_answers", "generate_ids", "heldout_questions", "score_variant"]


@dataclass(frozen=True)
class Question:
    """A held-out question: the turns before the last assistant turn, and that turn's text."""

    prompt: Messages
    reference: str


def heldout_questions(conversations: Sequence[Messages]) -> list[Question]:
    """One question per conversation: everything before its last assistant turn is the prompt.

    Example: ``[user "hi", assistant "hello", user "how are you", assistant "fine"]`` gives
    the prompt of the first three turns and the reference ``"fine"``.
    """
    questions = []
    for messages in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        questions.append(Question(prompt=list(messages[:last]), reference=messages[last]["content"]))
    return questions


def _left_padded(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``(B, T)`` input ids and attention mask, padding on the left so every row ends at T."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


@torch.no_grad()
def generate_ids(
    model: PeftModel | torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    max_new_tokens: int,
    batch_size: int,
    precision: str = "fp32",
    max_prompt_tokens: int = 256,
) -> list[list[int]]:
    """Greedy new token ids for chat prompts, ``batch_size`` prompts per ``generate`` call.

    Each prompt goes through the chat template with the assistant's generation prompt, is cut
    to its last ``max_prompt_tokens`` tokens, and is left-padded within its batch (so the new
    tokens of every row start at the same position). A row stops at the tokenizer's EOS (the
    end-of-turn token, kept) or after ``max_new_tokens``; padding after it is dropped.

    Raises:
        ValueError: ``max_new_tokens`` or ``batch_size`` is below 1.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must both be >= 1")
    pad = pad_id(tokenizer)
    encoded = [
        list(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for p in prompts
    ]
    model.eval()
    rows: list[list[int]] = []
    for start in range(0, len(encoded), batch_size):
        batch = _left_padded([ids[-max_prompt_tokens:] for ids in encoded[start : start + batch_size]], pad)
        with autocast(precision):
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():  # (B, <= max_new_tokens)
            end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            rows.append(row[:end])
    return rows


def generate_answers(
    model: PeftModel | torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    max_new_tokens: int,
    batch_size: int,
    precision: str = "fp32",
    max_prompt_tokens: int = 256,
) -> list[str]:
    """:func:`generate_ids` decoded, special tokens dropped, surrounding white space stripped."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, batch_size, precision, max_prompt_tokens)
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def score_variant(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    state: dict[str, torch.Tensor],
    questions: Sequence[Question],
    tokenized: TokenizedDevice,
    *,
    max_new_tokens: int,
    batch_size: int,
    loss_batch_size: int,
    precision: str,
    max_prompt_tokens: int,
) -> dict[str, Any]:
    """Answers and scores of adapter ``state`` on one device's held-out questions.

    ``batch_size`` questions go into each ``generate`` call; the held-out loss batches
    ``loss_batch_size`` examples, as the run's own evaluation does (``train.batch-size``).

    Returns:
        ``{"answers": [...], "rouge_l": [...], "exact_match": [...], "token_f1": [...],
        "eval_loss": float, "eval_tokens": int}``; the score lists align with ``questions``.
    """
    set_adapter(model, state)
    answers = generate_answers(
        model, tokenizer, [q.prompt for q in questions], max_new_tokens, batch_size, precision, max_prompt_tokens
    )
    loss = evaluate(model, tokenized.heldout, pad_id(tokenizer), loss_batch_size, precision)
    return {
        "answers": answers,
        **score_answers(answers, [q.reference for q in questions]),
        "eval_loss": loss.loss,
        "eval_tokens": loss.tokens,
    }
