"""Retrieval-augmented device examples: every question gets its top-k chunks as context.

    context_messages      a conversation with a system "Context:" block first (also `rag ask`)
    fit_context           as many retrieved chunks as fit the token budget, the last one cut
    device_index          the device's own index: the one in its storage folder, or, for a
                          simulated device with none yet, built there from its documents
    rag_tokenized_device  the device's train and held-out examples, each augmented
    answer_question       a greedy chat answer with (or without) retrieved context (`rag ask`)

Only the prompt changes: labels stay on the assistant turns, so the loss is measured on the
same tokens with RAG on and off. Held-out examples are augmented as well, because a device
that trains with context also answers with it; with ``rag.documents=answers`` a training
example never retrieves its own answer, so both splits see related answers only.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from edgetune.chat import IGNORE_INDEX, Example, Messages, pack, tokenize_conversation
from edgetune.client.rag import Hit, RagIndex, RagIndexError
from edgetune.config import RunConfig
from edgetune.datasets.devices import TokenizedDevice, device_conversations

__all__ = [
    "CONTEXT_HEADER",
    "answer_question",
    "context_messages",
    "device_index",
    "fit_context",
    "rag_tokenized_device",
]

CONTEXT_HEADER = "Answer the user's question. This context from the user's own documents may help:"
_MARGIN = 4  # tokens kept free for merges at the context's edges


def context_messages(messages: Messages, texts: list[str]) -> Messages:
    """``messages`` with a system message holding ``texts`` as a numbered context block first.

    An existing system message keeps its text, followed by the block.
    """
    block = "\n\n".join([CONTEXT_HEADER, *(f"[{i}] {t}" for i, t in enumerate(texts, start=1))])
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{block}"}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]


def _num_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_context(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, texts: list[str], max_length: int, max_context: int
) -> Messages:
    """:func:`context_messages` with as many of ``texts`` (best first) as fit.

    The context may take at most ``max_context`` tokens and never the tokens the rest of the
    conversation needs within ``max_length``; a chunk that does not fit whole is cut to the
    tokens left, and nothing comes after it.
    """
    rendered = tokenizer.apply_chat_template(context_messages(messages, []), tokenize=False)
    budget = min(max_context, max_length - _num_tokens(tokenizer, rendered)) - _MARGIN
    kept: list[str] = []
    for text in texts:
        numbered = f"\n\n[{len(kept) + 1}] "
        left = budget - _num_tokens(tokenizer, numbered)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if left <= 0:
            break
        if len(ids) > left:
            kept.append(tokenizer.decode(ids[:left]).strip())
            break
        kept.append(text)
        budget = left - len(ids)
    return context_messages(messages, [t for t in kept if t])


def device_index(cfg: RunConfig, storage_root: Path, data_path: str, index: int) -> RagIndex:
    """The device's index in ``<storage_root>/rag``, built there first if the device is simulated.

    Raises:
        RagIndexError: a real device (one with its own ``data-path``) has no index yet.
    """
    if RagIndex.exists(storage_root):
        return RagIndex.open(storage_root)
    if data_path:
        raise RagIndexError(
            f"rag.enabled is true but the device has no index in {RagIndex.folder_of(storage_root)}; "
            f"build it with `edgetune rag build DOCS --device-dir {storage_root}`"
        )
    from edgetune.client.documents import device_documents

    conv = device_conversations(cfg.data, data_path, index, cfg.federation.num_devices, cfg.seed)
    docs = device_documents(cfg.rag.documents, conv, index, cfg.federation.num_devices)
    rag = RagIndex.open(storage_root, cfg.rag.chunk_size, cfg.rag.chunk_overlap)
    report = rag.sync_texts(docs)
    logging.getLogger(__name__).info("%s: indexed %d documents, %d chunks", storage_root, len(docs), report.embedded)
    return rag


def rag_tokenized_device(
    cfg: RunConfig,
    data_path: str,
    index: int,
    storage_root: Path,
    tokenizer: PreTrainedTokenizerBase,
    canary_file: str = "",
) -> TokenizedDevice:
    """The device's examples with retrieved context (recomputed when its index changes).

    Args:
        cfg: The run config (``rag`` and ``data`` sections).
        data_path: A real device's JSONL file ("" for a simulated device).
        index: The device's partition index (simulation).
        storage_root: The device's storage folder (its index is in ``rag/`` there).
        tokenizer: The base model's tokenizer.
        canary_file: An audit run's canaries (``edgetune.datasets.devices.canary_file_for``), planted in
            the training split as without RAG.
    """
    rag = device_index(cfg, storage_root, data_path, index)
    return _augmented(cfg, data_path, index, tokenizer, canary_file, rag.folder, int(rag.manifest["generation"]))


@functools.cache
def _augmented(
    cfg: RunConfig,
    data_path: str,
    index: int,
    tokenizer: PreTrainedTokenizerBase,
    canary_file: str,
    folder: Path,
    generation: int,
) -> TokenizedDevice:
    from edgetune.client.documents import answer_source

    conv = device_conversations(cfg.data, data_path, index, cfg.federation.num_devices, cfg.seed)
    planted = _planted(canary_file, index)
    train, heldout = conv.train + planted, conv.heldout[: cfg.data.max_eval_examples]
    rag = RagIndex.open(folder.parent)
    own_answers = not data_path and cfg.rag.documents == "answers"
    questions = [_question(m) for m in train + heldout]
    exclude = [answer_source(i) if own_answers else None for i in range(len(conv.train))]
    exclude += [None] * (len(planted) + len(heldout))
    hits = rag.search(questions, cfg.rag.top_k, exclude)
    n = len(train)
    return TokenizedDevice(
        conv.name, _encode(tokenizer, train, hits[:n], cfg), _encode(tokenizer, heldout, hits[n:], cfg)
    )


def _encode(
    tokenizer: PreTrainedTokenizerBase, items: list[Messages], found: list[list[Hit]], cfg: RunConfig
) -> list[Example]:
    """Conversations with their retrieved context, tokenized as ``tokenized_device`` does."""
    examples = []
    for messages, hits in zip(items, found, strict=True):
        texts = [h.chunk.text for h in hits]
        augmented = fit_context(tokenizer, messages, texts, cfg.data.max_length, cfg.rag.max_context_tokens)
        examples.append(tokenize_conversation(tokenizer, augmented, cfg.data.max_length))
    examples = [e for e in examples if any(label != IGNORE_INDEX for label in e["labels"])]
    return pack(examples, cfg.data.max_length) if cfg.data.packing else examples


def _planted(canary_file: str, index: int) -> list[Messages]:
    if not canary_file:
        return []
    from edgetune.datasets.devices import planted_canaries  # audit runs only

    return planted_canaries(canary_file, index)


def _question(messages: Messages) -> str:
    """The first user turn: what the device retrieves context for."""
    return next(m["content"] for m in messages if m["role"] == "user")


def answer_question(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    context: list[str] | None,
    max_context_tokens: int,
    max_new_tokens: int,
) -> str:
    """Greedy answer to ``question`` with the chat template, with the ``context`` texts if given.

    Args:
        model: The base model (with a PEFT adapter, if any), in eval mode.
        tokenizer: Its tokenizer.
        question: The user's question.
        context: Retrieved texts, best first (None: no context block, the plain chat).
        max_context_tokens: Token cap on the context block.
        max_new_tokens: Bound on the answer's length.
    """
    messages: Messages = [{"role": "user", "content": question}]
    if context is not None:
        messages = fit_context(tokenizer, messages, context, 1 << 30, max_context_tokens)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    input_ids = torch.tensor([ids["input_ids"]], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip()
