"""The cloud node's distillation run: a student base model learns from a larger teacher.

Stages of :func:`distill` (each prints a line; long ones show a tqdm bar):

1. tokenize the train and held-out conversations with the student's tokenizer;
2. measure the held-out loss of teacher and student before training;
3. teacher pass, cached on disk (:mod:`server.distill.cache`): top-k logits when the two
   tokenizers are the same (token level), or the teacher's own answers to the prompts
   (sequence level, ``loss="seq"``; required when the vocabularies differ);
4. train the student (AdamW, linear warm-up then cosine decay, bf16 autocast), with
   atomic checkpoints every ``checkpoint_every`` steps (:mod:`server.distill.checkpoint`);
5. measure held-out loss and forward speed again, and write the student as a plain Hugging
   Face folder with a model card (:mod:`server.distill.model_card`) and ``distill.json``.

Data order: step ``s`` of a run with ``n`` examples and batch ``B`` takes batch ``s mod
ceil(n / B)`` of epoch ``s // ceil(n / B)``, where each epoch is a permutation drawn from
``numpy.random.default_rng([seed, epoch])``; a resumed run therefore sees the same batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from edgetune.chat import Example, Messages, collate, load_jsonl, tokenize_conversation
from edgetune.config import ConfigError
from edgetune.lm import autocast, label_logits, pad_id
from edgetune.models import cache_root
from edgetune.server.distill.cache import (
    TeacherLogits,
    cache_key,
    load_or_build_generations,
    load_or_build_logits,
    model_fingerprint,
)
from edgetune.server.distill.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from edgetune.server.distill.config import LOSSES, DistillConfig
from edgetune.server.distill.eval import evaluate_after, evaluate_before
from edgetune.server.distill.loss import distill_loss
from edgetune.server.distill.model_card import write_student
from edgetune.server.distill.prune import decoder_layers, parse_keep, prune_layers

__all__ = [
    "LOSSES",
    "PRUNE_PREFIX",
    "DistillConfig",
    "Loaded",
    "distill",
    "load_conversations",
    "make_student",
    "same_vocabulary",
]


PRUNE_PREFIX = "prune:"

Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def same_vocabulary(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers map the same strings to the same ids (token-level KD needs it)."""
    return a.get_vocab() == b.get_vocab()


def load_conversations(data: str, holdout_every: int = 10) -> tuple[list[Messages], list[Messages]]:
    """``(train, held_out)`` from ``public`` or a chat JSONL file (every n-th line held out)."""
    if data == "public":
        from edgetune.datasets.public_prompts import public_prompt_set

        return public_prompt_set(holdout_every=holdout_every)
    conversations = load_jsonl(data)
    if len(conversations) < 2:
        raise ConfigError(f"--data {data}: needs at least 2 conversations (one is held out), got {len(conversations)}")
    n = len(conversations)
    held_ids = {i for i in range(n) if i % holdout_every == holdout_every - 1} or {n - 1}
    train = [c for i, c in enumerate(conversations) if i not in held_ids]
    return train, [conversations[i] for i in sorted(held_ids)]


def _tokenize(tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Messages], max_length: int) -> list[Example]:
    """Tokenized conversations that keep at least one supervised token within ``max_length``."""
    examples = [tokenize_conversation(tokenizer, m, max_length) for m in conversations]
    kept = [e for e in examples if sum(1 for x in e["labels"][1:] if x >= 0) > 0]
    if not kept:
        raise ConfigError(f"--max-length {max_length}: every conversation's prompt fills it; nothing to learn")
    return kept


def _lr_at(step: int, total: int, cfg: DistillConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then cosine decay to ``lr / 10``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(total - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Example ids of step ``step`` (see the module docstring for the order)."""
    per_epoch = math.ceil(n / batch_size)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[position * batch_size : (position + 1) * batch_size].tolist()


def _step_loss(
    student: PreTrainedModel,
    examples: Sequence[Example],
    ids: list[int],
    teacher: TeacherLogits | None,
    cfg: DistillConfig,
    pad_id: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    with autocast(cfg.precision):
        logits, labels = label_logits(student, collate([examples[i] for i in ids], pad_id))
    if teacher is None:
        ce = torch.nn.functional.cross_entropy(logits.float(), labels)
        return ce, {"loss": ce.item(), "ce": ce.item()}
    logp = torch.cat([teacher[i][0] for i in ids])
    index = torch.cat([teacher[i][1] for i in ids])
    loss, kl, ce = distill_loss(
        logits, labels, logp, index, kind=cfg.loss, temperature=cfg.temperature, alpha=cfg.alpha, skew=cfg.skew
    )
    return loss, {"loss": loss.item(), "kl": kl.item(), "ce": ce.item()}


def _train(
    student: PreTrainedModel,
    examples: Sequence[Example],
    teacher: TeacherLogits | None,
    cfg: DistillConfig,
    pad_id: int,
    state: Checkpoint,
    optimizer: torch.optim.Optimizer,
    total: int,
    on_step: Callable[[int], None] | None,
) -> None:
    student.train()
    bar = tqdm(range(state.step, total), initial=state.step, total=total, desc="distill", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, total, cfg)
        start = time.perf_counter()
        loss, figures = _step_loss(
            student, examples, batch_indices(step, len(examples), cfg.batch_size, cfg.seed), teacher, cfg, pad_id
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.history.append({**figures, "seconds": time.perf_counter() - start})
        state.step = step + 1
        bar.set_postfix(loss=f"{figures['loss']:.3f}")
        if state.step % cfg.checkpoint_every == 0 or state.step == total:
            save_checkpoint(cfg.out, student, optimizer, state)
        if on_step is not None:
            on_step(state.step)
    student.eval()


def _teacher_targets(
    cfg: DistillConfig,
    teacher: Loaded,
    student_tok: PreTrainedTokenizerBase,
    train: list[Messages],
    on_teacher_call: Callable[[], None] | None,
) -> tuple[list[Example], TeacherLogits | None, float]:
    """Training examples and (token level) cached teacher logits, and the seconds it took."""
    start = time.perf_counter()
    root = cfg.cache_dir or cache_root() / "distill"
    if cfg.loss == "seq":
        key = cache_key(
            kind="seq",
            teacher=model_fingerprint(teacher[0]),
            data=train,
            generate=cfg.generate,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed,
        )
        conversations = load_or_build_generations(
            teacher[0],
            teacher[1],
            train,
            root / key,
            max_new_tokens=cfg.max_new_tokens,
            sample=cfg.generate == "sample",
            seed=cfg.seed,
            on_build=on_teacher_call,
        )
        return _tokenize(student_tok, conversations, cfg.max_length), None, time.perf_counter() - start
    examples = _tokenize(student_tok, train, cfg.max_length)
    key = cache_key(
        kind="logits",
        teacher=model_fingerprint(teacher[0]),
        ids=[e["input_ids"] for e in examples],
        top_k=cfg.top_k,
        temperature=cfg.temperature,
        precision=cfg.precision,
        max_length=cfg.max_length,
    )
    logits = load_or_build_logits(
        teacher[0],
        examples,
        root / key,
        pad_id=pad_id(student_tok),
        k=cfg.top_k,
        temperature=cfg.temperature,
        precision=cfg.precision,
        batch_size=cfg.batch_size,
        on_build=on_teacher_call,
    )
    return examples, logits, time.perf_counter() - start


def make_student(spec: str, teacher: Loaded, load: Callable[[str], Loaded]) -> tuple[Loaded, dict[str, Any]]:
    """The student for ``spec``: ``prune:<layers>`` of the teacher, or a model loaded with ``load``.

    Returns:
        ``((model, tokenizer), shape)`` where ``shape`` holds the facts the model card records.
    """
    n_teacher = len(decoder_layers(teacher[0]))
    if spec.startswith(PRUNE_PREFIX):
        keep = parse_keep(spec.removeprefix(PRUNE_PREFIX), n_teacher)
        shape = {
            "origin": f"depth-pruned teacher ({spec})",
            "layers": f"{len(keep)} of {n_teacher}",
            "layers kept": ",".join(map(str, keep)),
        }
        return (prune_layers(teacher[0], keep), teacher[1]), shape
    model, tokenizer = load(spec)
    shape = {"origin": f"given model {spec}", "layers": str(len(decoder_layers(model))), "teacher layers": n_teacher}
    return (model, tokenizer), shape


def _check_out(cfg: DistillConfig) -> None:
    if cfg.out.exists() and not cfg.out.is_dir():
        raise ConfigError(f"--out {cfg.out}: exists and is not a folder")
    if not cfg.resume and cfg.out.is_dir() and any(cfg.out.iterdir()):
        raise ConfigError(f"--out {cfg.out}: folder is not empty (pass --resume to continue a run there)")


def _epoch_seconds(history: list[dict[str, float]], per_epoch: int) -> list[float]:
    return [sum(h["seconds"] for h in history[i : i + per_epoch]) for i in range(0, len(history), per_epoch)]


def _start_state(
    cfg: DistillConfig, student: PreTrainedModel, optimizer: torch.optim.Optimizer, fingerprint: str
) -> Checkpoint | None:
    """The checkpoint to resume from (weights and optimizer restored), or None for a fresh start."""
    folder = latest_checkpoint(cfg.out) if cfg.resume else None
    if folder is None:
        if cfg.resume:
            print(f"distill: no checkpoint in {cfg.out}; starting from step 0")
        return None
    state = load_checkpoint(folder, student, optimizer)
    if state.fingerprint != fingerprint:
        raise ConfigError(
            f"--resume {cfg.out}: its checkpoint was made with other settings or data "
            f"(fingerprint {state.fingerprint}, now {fingerprint}); use the same flags or a new --out"
        )
    print(f"distill: resuming from step {state.step} ({folder.name})")
    return state


def distill(
    cfg: DistillConfig,
    teacher: Loaded,
    student: Loaded,
    shape: dict[str, Any],
    *,
    on_teacher_call: Callable[[], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the stages of the module docstring and write the student folder ``cfg.out``.

    Args:
        cfg: The run's settings.
        teacher: Teacher model (eval mode, not modified) and tokenizer.
        student: Student model (trained in place) and tokenizer.
        shape: Student facts for the model card (origin, layers kept ...).
        on_teacher_call: Called once per teacher forward / generation (tests count them).
        on_step: Called after every optimizer step with the number of steps done.

    Returns:
        The summary written to ``distill.json``: figures, timings and settings.

    Raises:
        ConfigError: token-level loss with different vocabularies, a non-empty ``out``
            without ``resume``, or a checkpoint made with other settings.
    """
    token_level = cfg.loss != "seq"
    if token_level and not same_vocabulary(teacher[1], student[1]):
        raise ConfigError(
            f"--loss {cfg.loss}: teacher and student tokenizers differ ({len(teacher[1])} vs {len(student[1])} "
            "tokens), so their distributions cannot be compared token by token; use --loss seq"
        )
    _check_out(cfg)
    train, held_out = load_conversations(cfg.data)
    if 0 < cfg.train_limit < len(train):
        train = [train[i * len(train) // cfg.train_limit] for i in range(cfg.train_limit)]
    held = {
        "teacher": _tokenize(teacher[1], held_out, cfg.max_length),
        "student": _tokenize(student[1], held_out, cfg.max_length),
    }
    optimizer = torch.optim.AdamW(student[0].parameters(), lr=cfg.lr, weight_decay=0.0)
    resumable = {k: v for k, v in asdict(cfg).items() if k not in ("out", "resume", "cache_dir", "checkpoint_every")}
    fingerprint = cache_key(settings=resumable, teacher=model_fingerprint(teacher[0]), train=train)
    state = _start_state(cfg, student[0], optimizer, fingerprint)
    if state is None:
        state = Checkpoint(step=0, fingerprint=fingerprint, figures=evaluate_before(cfg, teacher, student, held))
    print(f"distill: teacher pass ({'generations' if cfg.loss == 'seq' else f'top-{cfg.top_k} logits'}, cached)")
    examples, logits, teacher_seconds = _teacher_targets(cfg, teacher, student[1], train, on_teacher_call)
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = cfg.steps or cfg.epochs * per_epoch
    print(f"distill: training {total} steps ({len(examples)} conversations, batch {cfg.batch_size}, {cfg.loss})")
    _train(student[0], examples, logits, cfg, pad_id(student[1]), state, optimizer, total, on_step)
    summary = {
        **state.figures,
        **evaluate_after(cfg, teacher, student, held),
        "teacher_pass_seconds": teacher_seconds,
        "epoch_seconds": _epoch_seconds(state.history, per_epoch),
        "steps": total,
        "train_examples": len(examples),
        "heldout_examples": len(held["student"]),
        "final_train_loss": state.history[-1]["loss"] if state.history else math.nan,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "shape": shape,
    }
    write_student(cfg, teacher, student, summary)
    return summary
