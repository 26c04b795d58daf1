"""The audit report of a run: ``report.json`` (every figure) and a self-contained ``report.html``.

build_report   guarantee + uplinks (+ empirical tests, + a control run's) as one dict
summarise      the plain-language summary at the top, from that dict
write_report   report.json and report.html (inline CSS, base64 PNG plots; no network)
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from edgetune import wire
from edgetune.config import ConfigError, from_flat, read_run_config
from edgetune.fileio import atomic_write_text
from edgetune.server.audit.guarantee import describe_guarantee
from edgetune.server.audit.html import render_html
from edgetune.server.metrics import read_metrics
from edgetune.server.uplinks import ALLOWED_VERDICT, read_uplinks

__all__ = ["AuditError", "build_report", "describe_uplinks", "summarise", "write_report"]


class AuditError(RuntimeError):
    """The folder is not a run the audit can read (the message says what is missing)."""


def _read_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    try:
        config = read_run_config(run_dir)
    except ConfigError as err:
        raise AuditError(str(err)) from None
    rows = read_metrics(run_dir)
    if not rows:
        raise AuditError(f"{run_dir}: no {wire.METRICS_FILE}; the run never finished a round")
    return config, rows


def describe_uplinks(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals and the verdict over every recorded reply."""
    flagged = [line for line in lines if line["verdict"] != ALLOWED_VERDICT]
    tensors = sorted(
        {item["name"] for line in lines for r in line["records"] if r["type"] == "array" for item in r["items"]}
    )
    return {
        "recorded": bool(lines),
        "replies": len(lines),
        "devices": sorted({line["device"] for line in lines}),
        "by_kind": dict(Counter(line["kind"] for line in lines)),
        "bytes": sum(line["bytes"] for line in lines),
        "tensor_names": tensors,
        "flagged": len(flagged),
        "offending": [f"round {x['round']}, {x['kind']}, {x['device']}: {o}" for x in flagged for o in x["offending"]],
        "verdict": "no uplink record" if not lines else ALLOWED_VERDICT if not flagged else "flagged",
        "lines": lines,
    }


def _empirical(run_dir: Path, config: dict[str, Any], bound: tuple[float, float] | None, options: dict) -> dict:
    from edgetune.server.audit.empirical import run_empirical  # loads torch and the model only when asked

    return run_empirical(run_dir, from_flat(config), bound, **options)


def build_report(
    run_dir: Path, empirical: bool = False, control_dir: Path | None = None, **options: int
) -> dict[str, Any]:
    """Everything the report shows, as JSON-ready data.

    Args:
        run_dir: The run to audit.
        empirical: Run the empirical tests (canaries if planted, membership inference).
        control_dir: A run with the same settings but DP off, tested the same way for comparison.
        **options: ``references``, ``max_examples``, ``reps`` for the empirical tests.
    """
    run_dir = Path(run_dir)
    config, rows = _read_run(run_dir)
    guarantee = describe_guarantee(config, rows)
    bound = guarantee.get("empirical_bound")
    report: dict[str, Any] = {
        "run": str(run_dir.resolve()),
        "base_model": config.get("model.base"),
        "devices": config.get("federation.num-devices"),
        "guarantee": guarantee,
        "uplinks": describe_uplinks(read_uplinks(run_dir)),
        "empirical": None,
        "control": None,
    }
    as_pair = (bound["epsilon"], bound["delta"]) if bound else None
    if empirical or (run_dir / wire.CANARIES_FILE).is_file():
        report["empirical"] = _empirical(run_dir, config, as_pair, options)
    if control_dir is not None:
        control_config, control_rows = _read_run(Path(control_dir))
        report["control"] = {
            "run": str(Path(control_dir).resolve()),
            "guarantee": describe_guarantee(control_config, control_rows),
            "empirical": _empirical(Path(control_dir), control_config, None, options),
        }
    report["summary"] = summarise(report)
    return report


def _fmt_ci(stats: dict[str, Any], key: str) -> str:
    lo, hi = stats[f"{key}_ci95"]
    return f"{stats[key]:.3f} [95% CI {lo:.3f}-{hi:.3f}]"


def _canary_sentence(empirical: dict[str, Any] | None, label: str) -> str | None:
    canaries = (empirical or {}).get("canaries")
    if not canaries:
        return None
    s = canaries["summary"]
    found = "memorisation detected" if s["memorisation_detected"] else "no clear memorisation"
    return (
        f"{label}: planted canaries have mean exposure {s['planted_mean']:.2f} bits vs {s['unplanted_mean']:.2f} for "
        f"never-planted ones (at most {s['max_measurable']:.1f} measurable; AUC {s['auc_planted_vs_unplanted']:.2f}): "
        f"{found}."
    )


def _membership_sentence(empirical: dict[str, Any] | None, label: str) -> str | None:
    m = (empirical or {}).get("membership")
    if not m:
        return None
    loss, cal = m["loss"], m["calibrated"]
    return (
        f"{label}: membership inference on {loss['members']} training vs {loss['non_members']} held-out examples: "
        f"AUC {_fmt_ci(loss, 'auc')} (loss), {_fmt_ci(cal, 'auc')} (calibrated against the base model); "
        f"TPR at 1% FPR {cal['tpr_at_1pct_fpr']:.3f}, at 0.1% FPR {cal['tpr_at_0.1pct_fpr']:.3f} (calibrated)."
    )


def _bound_sentence(report: dict[str, Any]) -> str | None:
    empirical, bound = report.get("empirical"), report["guarantee"].get("empirical_bound")
    if not empirical or not bound:
        return None
    checks = [empirical["membership"][s]["bound"] for s in ("loss", "calibrated")]
    if empirical.get("canaries"):
        checks.append(empirical["canaries"]["summary"]["bound"])
    worst = max(c["empirical_epsilon_lower_bound"] for c in checks)
    if any(c["contradicts"] for c in checks):
        return (
            f"WARNING: the empirical figures CONTRADICT the guarantee: they support epsilon >= {worst:.2f} at 95% "
            f"confidence, above the {bound['epsilon']:.2f} the tests are held to. Treat the guarantee as broken."
        )
    return (
        f"The empirical figures do not contradict the guarantee: the largest epsilon they support (95% confidence) "
        f"is {worst:.2f}, within the {bound['epsilon']:.2f} the tests are held to ({bound['why']})."
    )


def summarise(report: dict[str, Any]) -> list[str]:
    """The plain-language summary: one sentence per finding, most important first."""
    g, up = report["guarantee"], report["uplinks"]
    lines = ["Protected: each device's own conversations. They never leave it; devices send model updates."]
    if g["enabled"]:
        lines.append(
            f"Guarantee: ({g['epsilon'] if g['epsilon'] is not None else g['epsilon_rederived']:.3g}, "
            f"{g['delta']:.3g})-differential privacy, "
            f"{g['relation']}, after {g['rounds']} rounds; {g['accountant'].upper()} accountant, {g['sampling']} "
            f"sampling q={g['sampling_probability']:.3g}, noise multiplier z={g['noise_multiplier']:g}, "
            f"clip norm C={g['clip_norm']:g}."
            + ("" if g["epsilon_matches"] else f" Re-derived here: {g['epsilon_rederived']:.3g} (does not match!).")
        )
    else:
        lines.append("Guarantee: none. DP was off in this run, so there is no formal differential-privacy guarantee.")
    if not up["recorded"]:
        lines.append("Uplinks: this run kept no record of what the devices sent.")
    elif up["flagged"]:
        lines.append(
            f"Uplinks: {up['flagged']} of {up['replies']} replies carried something other than adapter "
            f"deltas and numeric metrics (see 'What left each device')."
        )
    else:
        lines.append(
            f"Uplinks: all {up['replies']} replies from {len(up['devices'])} device(s) carried only adapter "
            f"deltas ({len(up['tensor_names'])} tensor parts) and numeric metrics, {up['bytes']:,} bytes in all."
        )
    for sentence in (
        _canary_sentence(report.get("empirical"), "Canaries"),
        _membership_sentence(report.get("empirical"), "Membership"),
        _bound_sentence(report),
        _canary_sentence((report.get("control") or {}).get("empirical"), "Control run without DP, canaries"),
        _membership_sentence((report.get("control") or {}).get("empirical"), "Control run without DP"),
    ):
        if sentence:
            lines.append(sentence)
    if report.get("empirical") is None:
        lines.append("Empirical tests: not run (not an audit run; use edgetune audit --empirical).")
    return lines


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` to ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / wire.REPORT_JSON, out_dir / wire.REPORT_HTML
    atomic_write_text(json_path, json.dumps(report, indent=2, sort_keys=True, default=str))
    atomic_write_text(html_path, render_html(report))
    return html_path, json_path
