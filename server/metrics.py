"""Per-round metrics: JSON lines in the run folder, a summary table and PNG plots."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgetune.fileio import atomic_write_text
from edgetune.wire import METRICS_FILE, PENDING_FILE

__all__ = [
    "DEVICE_PHASES",
    "PHASES",
    "RoundMetrics",
    "add_phase",
    "append_metrics",
    "plot_run",
    "read_metrics",
    "read_pending",
    "short_round_note",
    "summary_table",
    "time_table",
    "timed_phase",
    "truncate_metrics",
    "write_pending",
]


@dataclass
class RoundMetrics:
    """One line of ``metrics.jsonl``. Round 0 is the initial adapter (evaluation only)."""

    round: int
    version: int
    eval_loss: float | None = None
    train_loss: float | None = None
    replies: int = 0
    rejected: list[str] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    fp32_bytes_up: int = 0
    fp32_bytes_down: int = 0
    aggregation_error: float | None = None
    train_tokens: int = 0
    train_seconds: float = 0.0
    seconds: float = 0.0
    per_device: dict[str, dict[str, float]] = field(default_factory=dict)
    dp_epsilon: float | None = None
    """Cumulative epsilon at dp.delta after this round (None: DP off)."""
    dp_clipped_fraction: float | None = None
    """Share of this round's valid replies whose decoded delta was longer than dp.clip-norm."""
    dp_noise_std: float | None = None
    """Noise standard deviation per coordinate on the aggregated mean: z * C / m."""
    dp_skipped: str | None = None
    """Why a DP round released nothing (under quorum, nobody sampled), else None."""
    dp_sampled: int = 0
    """Devices sampled for training this round (kept for older readers; see ``sampled``)."""
    sampled: int = 0
    """Devices sampled for training this round, before dropouts."""
    robust_rejected: list[str] = field(default_factory=list)
    """Devices whose valid delta the robust aggregator left out (``federation.aggregator``)."""
    robust_clipped: list[str] = field(default_factory=list)
    """Devices whose valid delta the robust aggregator scaled down."""
    dropped_out: list[str] = field(default_factory=list)
    """Simulation: sampled devices the seeded dropout model (``federation.dropout``) took out."""
    wall_seconds: dict[str, float] = field(default_factory=dict)
    """Where the round's time went, by phase (:data:`PHASES`): ``sync``, ``train`` and
    ``evaluate`` summed over the devices' own reports; ``aggregate`` (validation and
    aggregation) and ``io`` (update, checkpoint, adapter, pruning) on the server."""
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    """The same phases in CPU seconds (process time), which a busy machine does not inflate."""
    server_cpu_seconds: float = 0.0
    """CPU seconds of the server process over the whole round (``seconds`` is its wall time)."""
    secagg: dict | None = None
    """Secure aggregation (``server/secagg.py``): k, bits per parameter each way, bytes and
    seconds per stage, dropouts per stage, survivors, wrap-around bound (None: off)."""


DEVICE_PHASES = ("sync", "train", "evaluate")
"""Phases the devices time themselves and report in their replies."""
PHASES = (*DEVICE_PHASES, "aggregate", "io")


def add_phase(m: RoundMetrics, phase: str, wall: float, cpu: float) -> None:
    """Add ``wall`` and ``cpu`` seconds to ``phase`` of round ``m``."""
    m.wall_seconds[phase] = m.wall_seconds.get(phase, 0.0) + wall
    m.cpu_seconds[phase] = m.cpu_seconds.get(phase, 0.0) + cpu


@contextlib.contextmanager
def timed_phase(m: RoundMetrics, phase: str) -> Iterator[None]:
    """Time the ``with`` block (wall and this process's CPU) into ``phase`` of ``m``."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        add_phase(m, phase, time.perf_counter() - wall, time.process_time() - cpu)


def append_metrics(run_dir: Path, m: RoundMetrics) -> None:
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(asdict(m), sort_keys=True) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return lines


def write_pending(run_dir: Path, m: RoundMetrics) -> None:
    """Keep a round's training half until its line is complete (survives a crash)."""
    atomic_write_text(run_dir / PENDING_FILE, json.dumps(asdict(m), sort_keys=True))


def read_pending(run_dir: Path, round_: int) -> RoundMetrics | None:
    """The training half of round ``round_``, if that is what was pending."""
    path = run_dir / PENDING_FILE
    try:
        pending = RoundMetrics(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    return pending if pending.round == round_ else None


def truncate_metrics(run_dir: Path, last_round: int) -> None:
    """Keep only rounds <= ``last_round`` (what a resumed run will not redo)."""
    kept = [m for m in read_metrics(run_dir) if m["round"] <= last_round]
    atomic_write_text(run_dir / METRICS_FILE, "".join(json.dumps(m, sort_keys=True) + "\n" for m in kept))


def short_round_note(m: RoundMetrics | dict) -> str:
    """Why a round closed with fewer valid replies than devices sampled, in one line.

    Example:
        >>> short_round_note({"replies": 2, "sampled": 4, "dropped_out": ["sim-1"], "rejected": ["train, node 3: x"]})
        '2 of 4 sampled devices replied validly (1 dropped out, 1 rejected)'
    """
    get = m.get if isinstance(m, dict) else lambda k, d=None: getattr(m, k, d)
    sampled, replies = get("sampled", 0) or get("dp_sampled", 0), get("replies", 0)
    gone = len(get("dropped_out", []) or [])
    bad = len([r for r in get("rejected", []) or [] if r.startswith("train")])
    missing = max(sampled - replies - gone - bad, 0)
    counts = ((gone, "dropped out"), (bad, "rejected"), (missing, "no reply"))
    parts = [f"{n} {what}" for n, what in counts if n]
    return f"{replies} of {sampled} sampled devices replied validly" + (f" ({', '.join(parts)})" if parts else "")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _fmt_epsilon(m: dict) -> str:
    eps = m.get("dp_epsilon")
    if eps is None:
        return "-"
    return f"{eps:.3f}" + ("*" if m.get("dp_skipped") else "")


def _fmt_secagg(m: dict) -> str:
    bits = (m.get("secagg") or {}).get("bits_up_per_param")
    return "-" if bits is None else f"{bits:.2f}" + ("*" if m["secagg"].get("skipped") else "")


def summary_table(rows: list[dict]) -> str:
    """Held-out loss and bytes per round vs fp32, as a fixed-width text table.

    Under DP an ``epsilon`` column shows the cumulative epsilon after each round; a round
    that released nothing (under quorum) is marked ``*`` and still counts. Under secure
    aggregation an ``sa bits/p`` column shows uplink bits per parameter per device.
    """
    dp = any(m.get("dp_epsilon") is not None for m in rows)
    sa = any(m.get("secagg") for m in rows)
    names = ("round", "eval loss", "train loss", "replies", "up", "down", "fp32 up", "fp32 down", "x fewer")
    names += ("epsilon",) * dp + ("sa bits/p",) * sa
    widths = (5, 9, 10, 7, 9, 9, 9, 9, 8) + (8,) * dp + (9,) * sa
    head = " ".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True))
    out = [head, "-" * len(head)]
    for m in rows:
        ours = m["bytes_up"] + m["bytes_down"]
        ref = m["fp32_bytes_up"] + m["fp32_bytes_down"]
        ratio = f"{ref / ours:.1f}" if ours else ("-" if not ref else "inf")
        ev = f"{m['eval_loss']:.4f}" if m["eval_loss"] is not None else "-"
        tr = f"{m['train_loss']:.4f}" if m["train_loss"] is not None else "-"
        sampled = m.get("sampled") or m.get("dp_sampled", 0)
        short = "!" if m["round"] > 0 and m["replies"] < sampled else ""  # fewer than sampled: see below
        rep = f"{m['replies']}/{sampled}{short}" if m["round"] > 0 else "-"
        out.append(
            f"{m['round']:>5} {ev:>9} {tr:>10} {rep:>7} "
            f"{_fmt_bytes(m['bytes_up']):>9} {_fmt_bytes(m['bytes_down']):>9} "
            f"{_fmt_bytes(m['fp32_bytes_up']):>9} {_fmt_bytes(m['fp32_bytes_down']):>9} {ratio:>8}"
            + (f" {_fmt_epsilon(m):>8}" if dp else "")
            + (f" {_fmt_secagg(m):>9}" if sa else "")
        )
    short_rounds = [m for m in rows if m["round"] > 0 and m["replies"] < (m.get("sampled") or m.get("dp_sampled", 0))]
    out.extend(f"! round {m['round']}: {short_round_note(m)}" for m in short_rounds)
    return "\n".join(out)


def time_table(rows: list[dict]) -> str:
    """Wall and CPU seconds per phase over the whole run, with each phase's share of the wall.

    Device phases are sums over devices (in simulation they run one after another on the
    same cores); rows written before phases were timed contribute nothing.
    """
    wall = {p: sum(m.get("wall_seconds", {}).get(p, 0.0) for m in rows) for p in PHASES}
    cpu = {p: sum(m.get("cpu_seconds", {}).get(p, 0.0) for m in rows) for p in PHASES}
    total = sum(wall.values())
    out = [f"{'phase':>9} {'wall s':>9} {'cpu s':>9} {'share':>6}", "-" * 36]
    for p in PHASES:
        share = f"{wall[p] / total:.1%}" if total else "-"
        out.append(f"{p:>9} {wall[p]:9.2f} {cpu[p]:9.2f} {share:>6}")
    rounds_wall = sum(m.get("seconds", 0.0) for m in rows)
    server_cpu = sum(m.get("server_cpu_seconds", 0.0) for m in rows)
    out.append(f"{'rounds':>9} {rounds_wall:9.2f} {server_cpu:9.2f}   (round wall; server process CPU)")
    return "\n".join(out)


def plot_run(run_dir: Path) -> list[Path]:
    """Write ``loss.png`` (held-out and train loss per round), ``bytes.png`` and, for DP runs,
    ``privacy.png`` (epsilon and clipped fraction per round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = read_metrics(run_dir)
    rounds = [m["round"] for m in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ev = [(m["round"], m["eval_loss"]) for m in rows if m["eval_loss"] is not None]  # federation.eval-every
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="held-out loss (mean over devices)")
    tr = [(m["round"], m["train_loss"]) for m in rows if m["train_loss"] is not None]
    if tr:
        ax.plot(*zip(*tr, strict=True), "s--", label="local train loss")
    ax.set(xlabel="round", ylabel="loss per assistant token", title="Federated LoRA: loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    loss_png = run_dir / "loss.png"
    fig.savefig(loss_png, dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.2
    for i, (key, label) in enumerate(
        [
            ("bytes_up", "up (ours)"),
            ("fp32_bytes_up", "up (fp32)"),
            ("bytes_down", "down (ours)"),
            ("fp32_bytes_down", "down (fp32)"),
        ]
    ):
        bars = [(r + (i - 1.5) * width, m[key]) for r, m in zip(rounds, rows, strict=True) if m[key] > 0]
        if bars:
            ax.bar(*zip(*bars, strict=True), width, label=label)
    ax.set_yscale("log")
    positive = [m[k] for m in rows for k in ("bytes_up", "fp32_bytes_up", "bytes_down", "fp32_bytes_down") if m[k] > 0]
    if positive:
        ax.set_ylim(bottom=min(positive) / 4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="round", ylabel="bytes (log scale)", title="Bytes moved per round")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    bytes_png = run_dir / "bytes.png"
    fig.savefig(bytes_png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    privacy_png = _plot_privacy(rows, run_dir / "privacy.png")
    return [loss_png, bytes_png] + ([privacy_png] if privacy_png else [])


def _plot_privacy(rows: list[dict], path: Path) -> Path | None:
    """``privacy.png``: cumulative epsilon and the clipped fraction per round (DP runs only)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    eps = [(m["round"], m["dp_epsilon"]) for m in rows if m.get("dp_epsilon") is not None]
    if not eps:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*eps, strict=True), "o-", color="tab:red", label="epsilon (cumulative)")
    ax.set(xlabel="round", ylabel="epsilon", title="Differential privacy per round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    clipped = [(m["round"], m["dp_clipped_fraction"]) for m in rows if m.get("dp_clipped_fraction") is not None]
    if clipped:
        frac = ax.twinx()
        frac.bar(*zip(*clipped, strict=True), 0.4, alpha=0.3, color="tab:blue", label="replies clipped")
        frac.set(ylabel="fraction of replies clipped", ylim=(0, 1.05))
        frac.legend(loc="lower right")
    ax.legend(loc="upper left")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
