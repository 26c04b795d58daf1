"""The teacher's side of distillation, computed once and cached on disk.

Token level: for every training example, the teacher's top-k log-probabilities (fp16, at the
distillation temperature) and their token ids (int32) at each supervised position, in
safetensors shards of ``SHARD`` examples (``logits-00000.safetensors`` with keys
``"<example>.logp"`` and ``"<example>.index"``, each ``(positions, k)``).

Sequence level: the teacher's responses to every prompt, as ``generations.jsonl`` in the
chat format of :func:`edgetune.chat.load_jsonl`.

A cache lives in ``<cache dir>/<key>/``, where the key hashes everything the contents depend
on (the teacher's identity, the examples' token ids, k, T, precision, generation settings),
so a changed input never reads a stale cache. Shards are written atomically and a shard
already on disk is not recomputed: an interrupted caching pass resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from edgetune.chat import IGNORE_INDEX, Example, Messages, collate, load_jsonl
from edgetune.fileio import atomic_save, atomic_write_text, load_tensors
from edgetune.lm import autocast, label_logits
from edgetune.server.distill.loss import teacher_topk

__all__ = [
    "SHARD",
    "TeacherLogits",
    "cache_key",
    "load_or_build_generations",
    "load_or_build_logits",
    "model_fingerprint",
]

SHARD = 64
GENERATIONS_FILE = "generations.jsonl"

TeacherLogits = list[tuple[Tensor, Tensor]]
"""Per example: ``(logp (n, k) fp16, index (n, k) int32)`` for its n supervised positions."""


def model_fingerprint(model: PreTrainedModel) -> str:
    """A short hash of a model's config and a few of its weights (cheap, not cryptographic)."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for tensor in (model.get_input_embeddings().weight[:4], model.get_output_embeddings().weight[-4:]):
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(**parts: object) -> str:
    """Hash of the JSON of ``parts`` (token id lists included), 16 hex digits."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _positions(example: Example) -> int:
    return sum(1 for label in example["labels"][1:] if label != IGNORE_INDEX)


@torch.no_grad()
def _teacher_batch(
    teacher: PreTrainedModel,
    examples: Sequence[Example],
    offset: int,
    pad_id: int,
    k: int,
    temperature: float,
    precision: str,
) -> dict[str, Tensor]:
    """Top-k teacher log-probs of one batch, keyed ``"<offset + i>.logp"`` / ``".index"``."""
    with autocast(precision):
        logits, _ = label_logits(teacher, collate(examples, pad_id))
    logp, index = teacher_topk(logits, k, temperature)
    counts = [_positions(e) for e in examples]
    tensors: dict[str, Tensor] = {}
    for i, (lp, ix) in enumerate(zip(logp.split(counts), index.split(counts), strict=True)):
        tensors[f"{offset + i}.logp"] = lp.to(torch.float16)
        tensors[f"{offset + i}.index"] = ix.to(torch.int32)
    return tensors


def load_or_build_logits(
    teacher: PreTrainedModel,
    examples: Sequence[Example],
    folder: Path,
    *,
    pad_id: int,
    k: int,
    temperature: float,
    precision: str,
    batch_size: int,
    on_build: Callable[[], None] | None = None,
) -> TeacherLogits:
    """The teacher's top-k log-probabilities for every example, from ``folder`` or computed.

    Args:
        teacher: The teacher (only called for shards missing from ``folder``).
        examples: Tokenized training examples (their order is the cache's order).
        folder: The cache folder for this key (see :func:`cache_key`).
        pad_id: Padding token id.
        k: Kept tokens per position.
        temperature: Distillation temperature ``T``.
        precision: ``bf16`` or ``fp32`` (teacher forward).
        batch_size: Examples per teacher forward pass.
        on_build: Called once per teacher forward pass (tests count calls).

    Returns:
        Per example ``(logp, index)``, fp16 and int32, each ``(positions, min(k, V))``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    out: TeacherLogits = []
    shards = range(0, len(examples), SHARD)
    for start in tqdm(shards, desc="teacher logits", unit="shard", leave=False):
        path = folder / f"logits-{start // SHARD:05d}.safetensors"
        chunk = examples[start : start + SHARD]
        if not path.is_file():
            tensors: dict[str, Tensor] = {}
            for b in range(0, len(chunk), batch_size):
                tensors.update(_teacher_batch(teacher, chunk[b : b + batch_size], b, pad_id, k, temperature, precision))
                if on_build is not None:
                    on_build()
            atomic_save(tensors, path)
        stored = load_tensors(path)
        out.extend((stored[f"{i}.logp"], stored[f"{i}.index"]) for i in range(len(chunk)))
    return out


@torch.no_grad()
def _generate(
    teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: Messages, max_new_tokens: int, sample: bool
) -> str:
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    options = {"do_sample": True, "top_p": 0.95} if sample else {"do_sample": False}
    out = teacher.generate(
        **ids,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **options,
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def load_or_build_generations(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Messages],
    folder: Path,
    *,
    max_new_tokens: int,
    sample: bool,
    seed: int,
    on_build: Callable[[], None] | None = None,
) -> list[Messages]:
    """The conversations with their last assistant turn rewritten by the teacher.

    The prompt is everything before the last assistant turn; the teacher answers it (greedy,
    or sampled with top-p 0.95 from a generator seeded with ``seed``). Results are written
    to ``folder / generations.jsonl`` and read from there on later calls.

    Returns:
        One conversation per input: prompt turns plus ``{"role": "assistant", "content": answer}``.
    """
    path = folder / GENERATIONS_FILE
    if path.is_file():
        return load_jsonl(path)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Messages] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for messages in tqdm(conversations, desc="teacher generations", unit="prompt", leave=False):
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = messages[:last]
            answer = _generate(teacher, tokenizer, prompt, max_new_tokens, sample)
            if on_build is not None:
                on_build()
            written.append([*prompt, {"role": "assistant", "content": answer or "."}])
    atomic_write_text(path, "".join(json.dumps({"messages": m}) + "\n" for m in written))
    return written
