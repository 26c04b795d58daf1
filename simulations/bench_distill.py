"""Distillation benchmark: SmolLM2-135M-Instruct teacher -> depth-pruned half-depth student.

    flock /tmp/edgetune-heavy.lock nice -n 5 .venv/bin/python -m edgetune.simulations.bench_distill
    python -m edgetune.simulations.bench_distill --teacher tiny --student prune:1 \\
        --train-limit 16 --epochs 2 --max-length 512

On the cloud's public prompt set (``edgetune.datasets.public_prompts``, disjoint from the devices'
chatterbot data), one run measures: held-out loss of the teacher, of the pruned student
before distillation and after it; the forward-pass speed (tokens/s) of student and teacher;
the teacher-pass seconds and the seconds of each training epoch (epoch 2+ reads the teacher's
logits from the cache and never runs the teacher; the bench counts teacher calls during
training to show it). Target: the student closes at least half of the gap,
``before - after >= 0.5 * (before - teacher)``. Ends with one JSON line, also written to
``<out>/result.json``; the student folder is left in ``<out>/student``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from edgetune.models import load_base
from edgetune.server.distill.run import DistillConfig, distill, make_student


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="smollm2", help="teacher model spec (default: smollm2)")
    parser.add_argument("--student", default="prune:half", help="student spec (default: prune:half = 15 of 30 layers)")
    parser.add_argument("--loss", default="forward-kl", help="forward-kl | reverse-kl | skew-kl | seq")
    parser.add_argument("--train-limit", type=int, default=256, help="training conversations used (evenly spaced)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the training conversations")
    parser.add_argument("--batch-size", type=int, default=8, help="conversations per step")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    parser.add_argument("--temperature", type=float, default=1.0, help="distillation temperature T")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term")
    parser.add_argument("--max-length", type=int, default=256, help="longest tokenized conversation")
    parser.add_argument("--out", type=Path, default=Path("bench-out/distill"), help="result folder (emptied first)")
    return parser.parse_args()


def main() -> None:
    args = _args()
    shutil.rmtree(args.out / "student", ignore_errors=True)
    shutil.rmtree(args.out / "cache", ignore_errors=True)  # measure the teacher pass, not a warm cache
    cfg = DistillConfig(
        out=args.out / "student",
        teacher=args.teacher,
        student=args.student,
        loss=args.loss,
        train_limit=args.train_limit,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        temperature=args.temperature,
        alpha=args.alpha,
        max_length=args.max_length,
        checkpoint_every=1000,
        cache_dir=args.out / "cache",
    )
    teacher = load_base(cfg.teacher)
    student, shape = make_student(cfg.student, teacher, load_base)
    calls = {"teacher": 0, "during_training": 0, "training": False}

    def on_teacher_call() -> None:
        calls["teacher"] += 1
        calls["during_training"] += int(calls["training"])

    def on_step(step: int) -> None:
        calls["training"] = True

    summary = distill(cfg, teacher, student, shape, on_teacher_call=on_teacher_call, on_step=on_step)
    before, after, ref = (
        summary["student_heldout_loss_before"],
        summary["student_heldout_loss_after"],
        summary["teacher_heldout_loss"],
    )
    closed = (before - after) / (before - ref) if before != ref else float("nan")
    epochs = summary["epoch_seconds"]
    result = {
        "teacher": cfg.teacher,
        "student": cfg.student,
        "layers": shape.get("layers"),
        "loss": cfg.loss,
        "steps": summary["steps"],
        "train_examples": summary["train_examples"],
        "heldout_examples": summary["heldout_examples"],
        "teacher_heldout_loss": ref,
        "student_heldout_loss_before": before,
        "student_heldout_loss_after": after,
        "gap_closed": closed,
        "target_met": bool(closed >= 0.5),
        "teacher_tokens_per_s": summary["teacher_tokens_per_s"],
        "student_tokens_per_s": summary["student_tokens_per_s"],
        "student_speedup": summary["student_speedup"],
        "teacher_pass_seconds": summary["teacher_pass_seconds"],
        "epoch_seconds": epochs,
        "epoch1_with_teacher_seconds": summary["teacher_pass_seconds"] + epochs[0],
        "teacher_calls": calls["teacher"],
        "teacher_calls_during_training": calls["during_training"],
    }
    rows = [
        ("held-out loss, teacher", f"{ref:.4f}"),
        ("held-out loss, pruned student before", f"{before:.4f}"),
        ("held-out loss, student after", f"{after:.4f}"),
        ("share of the gap closed (target >= 0.5)", f"{closed:.3f}"),
        (
            "forward tokens/s teacher / student",
            f"{result['teacher_tokens_per_s']:.0f} / {result['student_tokens_per_s']:.0f}",
        ),
        ("student speed-up", f"{result['student_speedup']:.2f}x"),
        ("teacher pass (cached) seconds", f"{result['teacher_pass_seconds']:.1f}"),
        ("epoch seconds (1 = student only)", ", ".join(f"{s:.1f}" for s in epochs)),
        ("teacher calls (pass / during training)", f"{calls['teacher']} / {calls['during_training']}"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    line = json.dumps(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
