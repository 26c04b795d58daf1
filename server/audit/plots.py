"""The audit report's figures, each rendered to PNG bytes (the HTML inlines them as base64).

Every function takes sections of ``report.json`` and returns ``None`` when it has nothing to
draw, so the report shows a figure only where there is data behind it.
"""

from __future__ import annotations

import io
import math
from typing import Any

__all__ = ["canary_plot", "clipping_plot", "epsilon_plot", "roc_plot"]


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 3.6))


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _rounds_plot(guarantee: dict[str, Any], key: str, ylabel: str, title: str) -> bytes | None:
    if not guarantee.get("enabled"):
        return None
    per = guarantee["per_round"]
    points = [(r, v) for r, v in zip(per["round"], per[key], strict=True) if v is not None]
    if not points:
        return None
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure()
    ax.plot(*zip(*points, strict=True), "o-")
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    ax.set_ylim(bottom=0, top=1.05 if key == "clipped_fraction" else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return _png(fig)


def epsilon_plot(guarantee: dict[str, Any]) -> bytes | None:
    """Cumulative epsilon after each round."""
    return _rounds_plot(guarantee, "epsilon", f"epsilon at delta={guarantee.get('delta')}", "Privacy budget spent")


def clipping_plot(guarantee: dict[str, Any]) -> bytes | None:
    """Share of each round's replies whose delta was clipped."""
    return _rounds_plot(guarantee, "clipped_fraction", "fraction of replies clipped", "Clipping per round")


def canary_plot(runs: dict[str, dict[str, Any] | None]) -> bytes | None:
    """Exposure of planted vs never-planted canaries, one pair of columns per run."""
    runs = {name: c for name, c in runs.items() if c}
    if not runs:
        return None
    fig, ax = _figure()
    ticks, labels = [], []
    for i, (name, canaries) in enumerate(runs.items()):
        for j, (kind, colour) in enumerate((("planted", "tab:red"), ("unplanted", "tab:blue"))):
            x = 3 * i + j
            values = [c["exposure"] for c in canaries[kind]]
            ax.scatter([x] * len(values), values, color=colour, alpha=0.7, label=kind if i == 0 else None)
            ax.hlines(sum(values) / len(values), x - 0.3, x + 0.3, color="black")
            ticks.append(x)
            labels.append(f"{name}\n{kind}")
        ax.axhline(canaries["summary"]["max_measurable"], color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set(ylabel="exposure (bits)", title="Canary exposure (bar: mean; dotted: most measurable)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def roc_plot(runs: dict[str, dict[str, Any] | None], bound: dict[str, Any] | None) -> bytes | None:
    """Membership-inference ROC curves (log-log), with the DP bound TPR = e^eps FPR + delta."""
    runs = {name: m for name, m in runs.items() if m}
    if not runs:
        return None
    fig, ax = _figure()
    for (name, membership), style in zip(runs.items(), ("-", "--", ":"), strict=False):
        for score in ("loss", "calibrated"):
            roc = membership[score]["roc"]
            ax.plot(roc["fpr"], roc["tpr"], style, label=f"{name}, {score} (AUC {membership[score]['auc']:.2f})")
    floor = 1e-3
    grid = [floor * (1 / floor) ** (i / 100) for i in range(101)]
    if bound is not None:
        eps, delta = bound["epsilon"], bound["delta"]
        ax.plot(grid, [min(1.0, math.exp(min(eps, 700)) * f + delta) for f in grid], "k-", lw=2, label="DP bound")
    ax.plot(grid, grid, color="grey", lw=0.8, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1.05), xlabel="false-positive rate")
    ax.set(ylabel="true-positive rate", title="Membership inference ROC")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return _png(fig)
