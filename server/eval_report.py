"""What ``edgetune eval`` shows: the verdict, the per-device table, the plot, the files.

Pure functions of the results dict that ``simulations/evaluate_run.py`` builds::

    {"devices": [name, ...], "variants": ["base", "global", ...],
     "scores": {variant: {"devices": {name: cell}, "overall": cell}}, ...}

where a cell is ``{"rouge_l": {"mean", "low", "high"}, "exact_match": {...},
"token_f1": {...}, "eval_loss": float, "questions": int}``.

    verdict        one line a person can read ("federation beat local-only on k of N devices ...")
    eval_table     fixed-width table: one row per (device, variant), overall last
    plot_eval      eval.png: ROUGE-L per device and overall, one bar per variant, CI whiskers
    write_eval     eval.json, eval.txt (verdict + table) and eval.png in a folder
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgetune import wire
from edgetune.fileio import atomic_write_text

__all__ = ["OVERALL", "VARIANTS", "eval_table", "plot_eval", "verdict", "write_eval"]

VARIANTS = ("base", "global", "local-only", "centralised", "personalised")
"""Every variant, in table order: the base model, the run's global adapter, then the baselines."""
OVERALL = "overall"


def _rouge(results: dict[str, Any], variant: str, device: str | None = None) -> float:
    scores = results["scores"][variant]
    cell = scores["overall"] if device is None else scores["devices"][device]
    return float(cell["rouge_l"]["mean"])


def verdict(results: dict[str, Any]) -> str:
    """The one-line answer to "does federation help?", from mean ROUGE-L.

    With baselines: ``federation beat local-only on k of N devices (mean ROUGE-L +x), reached
    y% of centralised (...)``, where x is the mean over devices of (global - local-only) and
    y = 100 * overall global / overall centralised. Without: the global adapter against the base.
    """
    devices, variants = results["devices"], results["variants"]
    n, glob = len(devices), _rouge(results, "global")
    if "local-only" in variants and "centralised" in variants:
        gains = [_rouge(results, "global", d) - _rouge(results, "local-only", d) for d in devices]
        wins = sum(g > 0 for g in gains)
        central, base = _rouge(results, "centralised"), _rouge(results, "base")
        reached = f"{100 * glob / central:.0f}%" if central > 0 else "n/a (centralised ROUGE-L is 0)"
        line = (
            f"federation beat local-only on {wins} of {n} devices (mean ROUGE-L {sum(gains) / n:+.3f}), "
            f"reached {reached} of centralised (ROUGE-L {glob:.3f} vs {central:.3f}; base {base:.3f})"
        )
        if "personalised" in variants:
            line += f"; personalised {_rouge(results, 'personalised'):.3f}"
        return line
    gains = [_rouge(results, "global", d) - _rouge(results, "base", d) for d in devices]
    return (
        f"the global adapter beat the base model on {sum(g > 0 for g in gains)} of {n} devices "
        f"(ROUGE-L {glob:.3f} vs {_rouge(results, 'base'):.3f}, mean {sum(gains) / n:+.3f}); "
        "add --baselines for local-only and centralised"
    )


def _ci(metric: dict[str, float]) -> str:
    return f"{metric['mean']:.3f} [{metric['low']:.3f}, {metric['high']:.3f}]"


def eval_table(results: dict[str, Any]) -> str:
    """One row per (device, variant), then the overall rows; CIs at the run's confidence level."""
    level = f"{100 * results['settings']['confidence']:.0f}%"
    head = f"{'device':<24} {'variant':<13} {'ROUGE-L [' + level + ' CI]':<24} {'exact match':<24} "
    head += f"{'token F1':<24} {'loss':>7} {'n':>4}"
    out = [head, "-" * len(head)]
    for device in [*results["devices"], OVERALL]:
        for i, variant in enumerate(results["variants"]):
            scores = results["scores"][variant]
            cell = scores["overall"] if device == OVERALL else scores["devices"][device]
            out.append(
                f"{device if i == 0 else '':<24.24} {variant:<13} {_ci(cell['rouge_l']):<24} "
                f"{_ci(cell['exact_match']):<24} {_ci(cell['token_f1']):<24} {cell['eval_loss']:>7.4f} "
                f"{cell['questions']:>4}"
            )
    return "\n".join(out)


def plot_eval(results: dict[str, Any], path: Path) -> Path:
    """``eval.png``: mean ROUGE-L per device and overall, one bar per variant, CI whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*results["devices"], OVERALL]
    variants = results["variants"]
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4))
    for j, variant in enumerate(variants):
        scores = results["scores"][variant]
        cells = [scores["overall"] if g == OVERALL else scores["devices"][g] for g in groups]
        means = [c["rouge_l"]["mean"] for c in cells]
        errors = [
            [m - c["rouge_l"]["low"] for m, c in zip(means, cells, strict=True)],
            [c["rouge_l"]["high"] - m for m, c in zip(means, cells, strict=True)],
        ]
        xs = [i + (j - (len(variants) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, means, width, yerr=errors, capsize=2, label=variant)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    level = f"{100 * results['settings']['confidence']:.0f}%"
    ax.set(ylabel=f"ROUGE-L F1 (mean, {level} CI)", title="Held-out answers: does federation help?")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_eval(results: dict[str, Any], folder: Path) -> list[Path]:
    """Write ``eval.json``, ``eval.txt`` and ``eval.png`` into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, text_path = folder / wire.EVAL_JSON, folder / wire.EVAL_TEXT
    atomic_write_text(json_path, json.dumps(results, indent=1, sort_keys=True))
    atomic_write_text(text_path, results["verdict"] + "\n\n" + eval_table(results) + "\n")
    return [text_path, json_path, plot_eval(results, folder / wire.EVAL_PLOT)]
