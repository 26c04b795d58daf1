"""``edgetune distill``: the cloud node distills a small student base model from a teacher.

edgetune distill --out students/half                       SmolLM2 -> 15-layer pruned student, public data
edgetune distill --student prune:every:3 --loss skew-kl --out students/third
edgetune distill --student path/to/small-model --loss seq --data prompts.jsonl --out students/s
edgetune distill --out students/half --resume              continue after an interruption
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register"]

_FIELD_FLAGS = {  # flag -> (type, help); defaults come from DistillConfig
    "teacher": (str, "teacher model: smollm2 (embedded), tiny, a local HF folder or a .gguf file"),
    "student": (str, "prune:<layers> (half | every:N | first:N | 0,2,4-7,29) made from the teacher, or a model spec"),
    "data": (str, "public (the cloud's prompt set from Python's reference docs) or a chat JSONL file"),
    "train_limit": (int, "use only N training conversations, evenly spaced (0: all)"),
    "loss": (str, "forward-kl | reverse-kl | skew-kl (token level, same tokenizer) | seq (teacher answers)"),
    "temperature": (float, "softening temperature T (token level); sampling temperature (seq with --generate sample)"),
    "alpha": (float, "weight of the soft term: alpha T^2 KL + (1 - alpha) CE"),
    "skew": (float, "skew l of skew-kl: KL(p || l p + (1 - l) q)"),
    "top_k": (int, "teacher tokens cached per position (the rest is one bucket)"),
    "steps": (int, "optimizer steps in all (0: --epochs full passes)"),
    "epochs": (int, "passes over the training conversations when --steps is 0"),
    "batch_size": (int, "conversations per optimizer step"),
    "lr": (float, "peak AdamW learning rate (warm-up, then cosine to lr/10)"),
    "warmup": (int, "linear warm-up steps"),
    "max_length": (int, "longest tokenized conversation"),
    "precision": (str, "bf16 (autocast) or fp32"),
    "seed": (int, "seed of the data order and of sampled teacher answers"),
    "checkpoint_every": (int, "checkpoint every N steps"),
    "generate": (str, "seq: greedy or sample teacher answers"),
    "max_new_tokens": (int, "seq: longest teacher answer in tokens"),
    "cache_dir": (Path, "teacher cache root"),
}

_UNSET_DEFAULTS = {"cache_dir": "~/.cache/edgetune/distill"}
_METAVARS: dict[type, str] = {int: "N", float: "VALUE", Path: "DIR"}  # a str flag shows its own name


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``distill`` to the ``edgetune`` sub-commands."""
    from edgetune.server.distill.config import DistillConfig

    defaults = DistillConfig(out=Path("."))
    parser = sub.add_parser(
        "distill",
        help="distill a small student base model from a teacher (cloud node)",
        description="Token-level (forward / reverse / skew KL on the teacher's cached top-k logits) or "
        "sequence-level (the teacher's answers) distillation. Writes a plain Hugging Face folder with a model "
        "card (README.md) and distill.json; `edgetune simulate --base OUT` uses it as the fleet's base model.",
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="output folder for the student (must be empty)"
    )
    for name, (kind, text) in _FIELD_FLAGS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=kind, metavar=_METAVARS.get(kind, name.upper()),
            help=f"{text} (default: {getattr(defaults, name) or _UNSET_DEFAULTS.get(name, 0)})",
        )  # fmt: skip
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.set_defaults(handler=_cmd_distill)


def _cmd_distill(args: argparse.Namespace) -> int:
    from edgetune.chat import DataError
    from edgetune.models import ModelError, load_base
    from edgetune.server.distill.prune import PruneError
    from edgetune.server.distill.run import DistillConfig, distill, make_student

    given = {name: getattr(args, name) for name in _FIELD_FLAGS if getattr(args, name) is not None}
    cfg = DistillConfig(out=args.out, resume=args.resume, **given)
    try:
        print(f"distill: loading teacher {cfg.teacher}")
        teacher = load_base(cfg.teacher)
        student, shape = make_student(cfg.student, teacher, load_base)
    except (ModelError, PruneError) as err:
        print(f"edgetune: {err}", file=sys.stderr)
        return 2
    try:
        summary = distill(cfg, teacher, student, shape)
    except DataError as err:
        print(f"edgetune: {err}", file=sys.stderr)
        return 2
    print(
        f"distill: held-out loss teacher {summary['teacher_heldout_loss']:.4f}, student before "
        f"{summary['student_heldout_loss_before']:.4f}, after {summary['student_heldout_loss_after']:.4f}; "
        f"student forward {summary['student_speedup']:.2f}x the teacher's speed -> {cfg.out}"
    )
    return 0
