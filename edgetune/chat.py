"""Device-side training data: chat conversations in, padded tensor batches out.

This module owns the path from a device's conversation file to the batches that the local
LoRA training loop consumes:

1. ``load_jsonl`` reads and validates conversations, one JSON object per line.
2. ``tokenize_conversation`` renders a conversation with the tokenizer's chat template and
   builds ``labels`` that supervise only the assistant turns.
3. ``pack`` (optional) concatenates tokenized examples into fixed-size blocks.
4. ``collate`` and ``iterate_batches`` right-pad examples into ``(B, T)`` tensors.
5. ``pack_rows`` (the training and evaluation step) lays a batch's examples end to end in
   fewer rows, so that padding costs no work; exact, unlike ``pack``.

Label convention: ``labels[t]`` is either ``input_ids[t]`` (the model shifts internally, as
Hugging Face causal LMs do) or ``IGNORE_INDEX`` (-100) where no loss is taken. For each
assistant turn the supervised span is the assistant content plus its end-of-turn token (the
tokenizer's EOS, ``<|im_end|>`` for ChatML). Template glue after that token, such as ChatML's
trailing newline, is not supervised: generation stops at the end-of-turn token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "ROLES",
    "Batch",
    "ChatTemplateError",
    "DataError",
    "Example",
    "Messages",
    "collate",
    "count_label_tokens",
    "iterate_batches",
    "load_jsonl",
    "pack",
    "pack_rows",
    "tokenize_conversation",
]

Messages = list[dict[str, str]]
"""One conversation: ``[{"role": "user", "content": "hi"}, {"role": "assistant", ...}]``."""

Example = dict[str, list[int]]
"""One tokenized example: ``input_ids`` and ``labels`` of equal length."""

Batch = dict[str, Tensor]
"""Collated batch: ``input_ids``, ``labels`` and ``attention_mask``, each ``(B, T)`` long.

A packed batch (:func:`pack_rows`) also has ``position_ids``; its ``attention_mask`` then
only marks real tokens and is not given to the model."""

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file, line and problem."""


class ChatTemplateError(ValueError):
    """The chat template renders turns in a way that hides where an assistant turn starts."""


def _messages_problem(messages: Any) -> str | None:
    """Return what is wrong with a conversation, or None if it is well formed."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            return f"message {i} must be an object with exactly 'role' and 'content' keys"
        if message["role"] not in ROLES:
            return f"message {i} has unknown role {message['role']!r}; expected one of {ROLES}"
        if not isinstance(message["content"], str):
            kind = type(message["content"]).__name__
            return f"message {i} content must be a string, got {kind}"
    if messages[0]["role"] == "assistant":
        return "conversation starts with an assistant turn; it needs a prompt before it"
    if not any(m["role"] == "assistant" for m in messages):
        return "conversation has no assistant turn to learn from"
    return None


def _parse_line(line: str, where: str) -> Messages:
    """Turn one JSONL line into a conversation; ``where`` (``"path:line"``) prefixes errors."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if keys == {"messages"}:
        messages = record["messages"]
    elif keys == {"prompt", "response"}:
        for key in ("prompt", "response"):
            if not isinstance(record[key], str):
                kind = type(record[key]).__name__
                raise DataError(f"{where}: {key!r} must be a string, got {kind}")
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    else:
        expected = "exactly ['messages'] or ['prompt', 'response']"
        raise DataError(f"{where}: keys {sorted(keys)}; expected {expected}")
    problem = _messages_problem(messages)
    if problem is not None:
        raise DataError(f"{where}: {problem}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def load_jsonl(path: str | Path) -> list[Messages]:
    """Read conversations from a JSON Lines file.

    Each non-blank line is either ``{"messages": [{"role": ..., "content": ...}, ...]}`` or
    ``{"prompt": str, "response": str}`` (read as a user turn and an assistant turn). No other
    keys are accepted, so a misspelt key fails loudly instead of being ignored.

    Args:
        path: The ``.jsonl`` file.

    Returns:
        The conversations in file order.

    Raises:
        DataError: The file is missing, unreadable as UTF-8, holds no conversations, or a line
            is invalid JSON, has the wrong keys, a non-string content, an unknown role, starts
            with an assistant turn or has no assistant turn. The message reads
            ``"<path>:<line>: <problem>"`` with 1-based line numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    conversations: list[Messages] = []
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a BOM
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({err.reason})") from None
            if line.strip():
                conversations.append(_parse_line(line, f"{path}:{lineno}"))
    if not conversations:
        raise DataError(f"{path}: file holds no conversations")
    return conversations


def _encode_chat(tokenizer: PreTrainedTokenizerBase, messages: Messages, add_generation_prompt: bool) -> list[int]:
    """Token ids of the rendered chat, whatever container ``apply_chat_template`` returns."""
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    if isinstance(out, Mapping):  # BatchEncoding, should return_dict be ignored
        out = out["input_ids"]
    ids = out.tolist() if hasattr(out, "tolist") else out
    return [int(t) for t in ids]  # type: ignore[arg-type]


def _span_from_text(tokenizer: PreTrainedTokenizerBase, messages: Messages, i: int) -> tuple[int, int]:
    """Fallback for assistant turn ``i``: find it by characters, map to tokens via offsets.

    Needed when tokens merge across the turn boundary (for example a generation prompt that
    ends in a space); the token that straddles the boundary is supervised.
    """

    def render(turns: Messages, add_generation_prompt: bool = False) -> str:
        return str(tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt, tokenize=False))

    text = render(messages)
    prefix = render(messages[:i], add_generation_prompt=True)
    through = render(messages[: i + 1])
    if not (through.startswith(prefix) and text.startswith(through)):
        raise ChatTemplateError(
            f"chat template does not render assistant turn {i} as an extension of the "
            "conversation before it, so its tokens cannot be located"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(f"assistant turn {i} needs token offsets; use a fast tokenizer")
    # The same call apply_chat_template makes, so these ids are the conversation's ids.
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    chosen = [t for t, (a, b) in enumerate(offsets) if a < len(through) and b > len(prefix)]
    return (chosen[0], chosen[-1] + 1) if chosen else (0, 0)


def _assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: Messages, ids: list[int]) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of the assistant turns within ``ids``."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _encode_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = _encode_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if through[: len(prefix)] == prefix and ids[: len(through)] == through:
            spans.append((len(prefix), len(through)))
        else:
            spans.append(_span_from_text(tokenizer, messages, i))
    return spans


def _end_of_turn(ids: list[int], start: int, end: int, eos_id: int | None) -> int:
    """Cut a span just after its last end-of-turn token, dropping template glue after it."""
    for t in range(end - 1, start - 1, -1):
        if ids[t] == eos_id:
            return t + 1
    return end


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: Messages, max_length: int) -> Example:
    """Tokenize a conversation with its chat template, supervising only assistant turns.

    For assistant turn ``i`` the span is ``len(ids(messages[:i] + generation prompt))`` up to
    ``len(ids(messages[:i + 1]))``, cut after the tokenizer's EOS (the end-of-turn token) if
    it occurs in the span. Where those token ids are not prefixes of each other (tokens merge
    across the boundary), the turn is located in the rendered text and mapped to tokens by
    offsets instead. Example with ChatML::

        <|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\nhello<|im_end|>\\n
        labels supervise:                                          hello<|im_end|>

    Args:
        tokenizer: A tokenizer with a ``chat_template``.
        messages: The conversation; it must contain an assistant turn and not start with one.
        max_length: Keep at most this many tokens (truncating from the right). A conversation
            whose prompt alone fills ``max_length`` comes back with no supervised token.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length, labels ``IGNORE_INDEX``
        outside assistant spans.

    Raises:
        ValueError: ``max_length`` is below 1 or the conversation is malformed.
        ChatTemplateError: The template renders an assistant turn so that the text before it
            is not a prefix of the text through it (for example it rewrites history).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    problem = _messages_problem(messages)
    if problem is not None:
        raise ValueError(f"malformed conversation: {problem}")
    ids = _encode_chat(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in _assistant_spans(tokenizer, messages, ids):
        end = _end_of_turn(ids, start, end, tokenizer.eos_token_id)
        labels[start:end] = ids[start:end]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def _checked_length(example: Example) -> int:
    """Length of an example, verifying that ``input_ids`` and ``labels`` agree."""
    n, m = len(example["input_ids"]), len(example["labels"])
    if n != m:
        raise ValueError(f"example has {n} input_ids but {m} labels")
    return n


def pack(examples: Sequence[Example], block_size: int) -> list[Example]:
    """Concatenate examples and cut the stream into blocks of exactly ``block_size`` tokens.

    Labels travel with their tokens, so supervision is unchanged. The last partial block is
    dropped unless it is the only block; e.g. lengths [3, 4] with ``block_size=3`` give two
    blocks and drop one token, while [2] gives one block of 2.

    Args:
        examples: Tokenized examples.
        block_size: Tokens per block, at least 1.

    Returns:
        The blocks; empty if there are no tokens.

    Raises:
        ValueError: ``block_size`` is below 1 or an example's fields differ in length.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    for example in examples:
        _checked_length(example)
    ids = list(chain.from_iterable(e["input_ids"] for e in examples))
    labels = list(chain.from_iterable(e["labels"] for e in examples))
    if len(ids) <= block_size:
        return [{"input_ids": ids, "labels": labels}] if ids else []
    starts = range(0, len(ids) - block_size + 1, block_size)
    return [{"input_ids": ids[s : s + block_size], "labels": labels[s : s + block_size]} for s in starts]


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad examples to the longest one.

    Args:
        examples: At least one tokenized example.
        pad_id: Token id written into padding positions of ``input_ids``.

    Returns:
        ``input_ids``, ``labels`` (``IGNORE_INDEX`` on padding) and ``attention_mask`` (1 on
        real tokens), each a ``(B, T)`` long tensor with ``T`` the longest example.

    Raises:
        ValueError: ``examples`` is empty or an example's fields differ in length.
    """
    if not examples:
        raise ValueError("collate needs at least one example, got none")
    lengths = [_checked_length(e) for e in examples]
    shape = (len(examples), max(lengths))
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for row, (example, n) in enumerate(zip(examples, lengths, strict=True)):
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack_rows(batch: Batch) -> Batch:
    """The batch's examples laid end to end in as few rows of its width as hold them.

    Rows are filled first fit, longest example first. Exact: each example keeps its positions
    (``position_ids`` restart at 0), attends only within itself (given ``position_ids`` and
    no ``attention_mask``, transformers builds the block-diagonal causal mask), and its first
    token, which no position predicts in the padded batch either, gets no label. The room
    left at a row's end holds token 0, which no real token attends to (it comes after them).

    Returns:
        The packed batch, or ``batch`` itself when packing would save no row.
    """
    lengths = [int(n) for n in batch["attention_mask"].sum(1)]
    width = int(batch["input_ids"].shape[1])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if fits is None:
            rows.append([i])
            room.append(width - lengths[i])
        else:
            rows[fits].append(i)
            room[fits] -= lengths[i]
    if len(rows) == len(lengths):
        return batch
    shape = (len(rows), width)  # the first row holds the longest example, as wide as the batch
    packed = {
        "input_ids": torch.zeros(shape, dtype=torch.long),
        "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros(shape, dtype=torch.long),
        "position_ids": torch.zeros(shape, dtype=torch.long),
    }
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = lengths[i]
            packed["input_ids"][r, at : at + n] = batch["input_ids"][i, :n]
            packed["labels"][r, at + 1 : at + n] = batch["labels"][i, 1:n]
            packed["attention_mask"][r, at : at + n] = 1
            packed["position_ids"][r, at : at + n] = torch.arange(n)
            at += n
        packed["position_ids"][r, at:] = torch.arange(n, n + width - at)  # the last example's run continues
    return packed


def _batch_indices(n: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """Index lists for ``steps`` batches drawn from back-to-back shuffled epochs."""
    if n <= batch_size:
        for _ in range(steps):
            yield list(range(n))
        return
    rng = np.random.default_rng(seed)
    pending: list[int] = []
    for _ in range(steps):
        while len(pending) < batch_size:
            pending.extend(rng.permutation(n).tolist())
        yield pending[:batch_size]
        pending = pending[batch_size:]


def iterate_batches(
    examples: Sequence[Example], batch_size: int, steps: int, seed: int, pad_id: int
) -> Iterator[Batch]:
    """Yield exactly ``steps`` collated batches, reshuffling every epoch.

    Batches are consecutive chunks of an endless stream of epochs, each a fresh permutation
    from ``numpy.random.default_rng(seed)``: every batch is full and may straddle two epochs.
    With no more examples than ``batch_size``, every batch holds all of them.

    Args:
        examples: Tokenized examples.
        batch_size: Examples per batch, at least 1.
        steps: Number of batches to yield, at least 0.
        seed: Seed of the shuffle; the same seed gives the same batches.
        pad_id: Padding token id passed to ``collate``.

    Returns:
        An iterator over batches as returned by ``collate``.

    Raises:
        ValueError: ``examples`` is empty, ``batch_size`` is below 1 or ``steps`` below 0;
            raised at call time, not on first iteration.
    """
    if not examples:
        raise ValueError("iterate_batches needs at least one example, got none")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if steps < 0:
        raise ValueError(f"steps must be at least 0, got {steps}")
    chunks = _batch_indices(len(examples), batch_size, steps, seed)
    return (collate([examples[i] for i in chunk], pad_id) for chunk in chunks)


def count_label_tokens(batch: Mapping[str, Tensor | Sequence[int]]) -> int:
    """Number of supervised tokens (labels other than ``IGNORE_INDEX``) in a batch or example."""
    return int((torch.as_tensor(batch["labels"]) != IGNORE_INDEX).sum())
