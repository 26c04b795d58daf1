"""The model card (README.md) of a distilled student folder.

It records what a fleet operator needs to trust the student as a base model: the teacher,
the student's shape (layers kept, parameters), the data recipe, the loss and its
hyperparameters, and the evaluation figures of the run that made it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from edgetune.fileio import atomic_write_text
from edgetune.server.distill.checkpoint import CHECKPOINTS_DIR
from edgetune.server.distill.config import DistillConfig
from edgetune.server.distill.eval import parameter_count

__all__ = ["SUMMARY_FILE", "render_model_card", "write_student"]

SUMMARY_FILE = "distill.json"

Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def _table(rows: Mapping[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    lines.extend(f"| {key} | {value} |" for key, value in rows.items())
    return "\n".join(lines)


def _figure(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render_model_card(
    *,
    teacher: str,
    shape: Mapping[str, Any],
    data: Mapping[str, Any],
    loss: Mapping[str, Any],
    evaluation: Mapping[str, Any],
) -> str:
    """Markdown text of the card, one section per argument.

    Args:
        teacher: The teacher's model spec as given on the command line.
        shape: Student facts: ``origin``, ``layers``, ``layers kept``, ``parameters`` ...
        data: Data recipe: source, examples, held-out examples, max length ...
        loss: Loss kind and hyperparameters (T, alpha, skew, top-k, steps, lr ...).
        evaluation: Figures: held-out losses, forward speed, timings.

    Returns:
        The README.md text (ends with a newline).
    """
    sections = [
        "---\nlibrary_name: transformers\ntags: [edgetune, distillation, llama]\n---",
        "# Distilled student (edgetune)",
        "Made by `edgetune distill`: a small base model for the federated fleet, distilled on the "
        "cloud node from a larger teacher on public data only (no device data).",
        f"## Teacher\n\n`{teacher}`",
        "## Student\n\n" + _table({k: _figure(v) for k, v in shape.items()}),
        "## Data\n\n" + _table({k: _figure(v) for k, v in data.items()}),
        "## Loss and hyperparameters\n\n" + _table({k: _figure(v) for k, v in loss.items()}),
        "## Evaluation (held-out split, same run)\n\n" + _table({k: _figure(v) for k, v in evaluation.items()}),
        "## Use\n\n```\nedgetune simulate --base <this folder>\nedgetune export --base <this folder>\n```",
    ]
    return "\n\n".join(sections) + "\n"


def write_student(cfg: DistillConfig, teacher: Loaded, student: Loaded, summary: dict[str, Any]) -> None:
    """Save the plain Hugging Face folder, its model card and summary, then drop the checkpoints."""
    student[0].save_pretrained(cfg.out)
    student[1].save_pretrained(cfg.out)
    source = (
        "public (pydoc_data.topics reference texts, every 10th chunk held out)" if cfg.data == "public" else cfg.data
    )
    card = render_model_card(
        teacher=cfg.teacher,
        shape={
            **summary["shape"],
            "parameters": parameter_count(student[0]),
            "teacher parameters": parameter_count(teacher[0]),
        },
        data={
            "source": source,
            "train conversations": summary["train_examples"],
            "held-out conversations": summary["heldout_examples"],
            "max length (tokens)": cfg.max_length,
        },
        loss=_loss_rows(cfg, summary["steps"]),
        evaluation={
            "teacher held-out loss": summary["teacher_heldout_loss"],
            "student held-out loss before": summary["student_heldout_loss_before"],
            "student held-out loss after": summary["student_heldout_loss_after"],
            "teacher forward tokens/s": f"{summary['teacher_tokens_per_s']:.0f}",
            "student forward tokens/s": f"{summary['student_tokens_per_s']:.0f}",
            "student speed-up": f"{summary['student_speedup']:.2f}x",
            "teacher pass seconds (cached after)": f"{summary['teacher_pass_seconds']:.1f}",
            "epoch seconds": ", ".join(f"{s:.1f}" for s in summary["epoch_seconds"]),
        },
    )
    atomic_write_text(cfg.out / "README.md", card)
    atomic_write_text(cfg.out / SUMMARY_FILE, json.dumps(summary, indent=2))
    shutil.rmtree(cfg.out / CHECKPOINTS_DIR, ignore_errors=True)


def _loss_rows(cfg: DistillConfig, steps: int) -> dict[str, Any]:
    rows: dict[str, Any] = {"loss": cfg.loss}
    if cfg.loss == "seq":
        rows.update({"teacher answers": cfg.generate, "max new tokens": cfg.max_new_tokens})
        if cfg.generate == "sample":
            rows["sampling temperature"] = cfg.temperature
    else:
        rows.update(
            {
                "formula": "alpha T^2 KL + (1 - alpha) CE",
                "temperature T": cfg.temperature,
                "alpha": cfg.alpha,
                "teacher top-k": cfg.top_k,
            }
        )
        if cfg.loss == "skew-kl":
            rows["skew"] = cfg.skew
    rows.update(
        {
            "steps": steps,
            "batch size": cfg.batch_size,
            "peak lr (AdamW)": cfg.lr,
            "warm-up steps": cfg.warmup,
            "precision": cfg.precision,
            "seed": cfg.seed,
        }
    )
    return rows
