"""``report.html``: one self-contained page (inline CSS, plots as base64 PNG data URIs).

Sections, in reading order: summary, the guarantee, what left each device (per round and
device, collapsed under ``<details>``), empirical tests, control run. Every value shown comes
from the report dict (``report.json``); nothing is fetched from the network.
"""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from edgetune.server.audit.plots import canary_plot, clipping_plot, epsilon_plot, roc_plot

__all__ = ["render_html"]

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2rem; }
#summary { background: #f4f7fb; border-left: 4px solid #3b6ea5; padding: .5rem 1rem 1rem; }
#summary li { margin: .35rem 0; } .warn { color: #a40000; font-weight: 600; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .85rem; }
td, th { border: 1px solid #ddd; padding: .2rem .5rem; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } code { font-size: .8rem; } img { max-width: 100%; display: block; margin: .5rem 0; }
details { margin: .3rem 0; } summary { cursor: pointer; }
"""


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _summary(report: dict[str, Any]) -> str:
    items = "".join(
        f'<li class="warn">{escape(s)}</li>' if s.startswith("WARNING") else f"<li>{escape(s)}</li>"
        for s in report["summary"]
    )
    return f'<section id="summary"><h2>Summary</h2><ul>{items}</ul></section>'


def _guarantee(g: dict[str, Any]) -> str:
    if not g["enabled"]:
        return f"<h2>The guarantee</h2><p><b>{escape(g['statement'])}.</b> {g['rounds']} training rounds.</p>"
    keys = (
        "statement epsilon epsilon_rederived epsilon_matches delta accountant relation sampling sampling_probability "
        "population devices_per_round noise_multiplier clip_norm clip_on min_replies max_epsilon rounds"
    ).split()
    bound = g["empirical_bound"]
    return (
        "<h2>The guarantee</h2>"
        + _table([(k, g[k]) for k in keys])
        + f"<p>Empirical tests are held to ({bound['epsilon']:.4g}, {bound['delta']:.3g}): {escape(bound['why'])}.</p>"
        + _img(epsilon_plot(g), "epsilon per round")
        + _img(clipping_plot(g), "clipping fraction per round")
    )


def _uplink_rows(line: dict[str, Any]) -> str:
    cells = []
    for record in line["records"]:
        if record["type"] == "array":
            for item in record["items"]:
                cells.append(
                    f"<tr><td>{escape(record['record'])}</td><td><code>{escape(item['name'])}</code></td>"
                    f"<td>{escape(str(tuple(item['shape'])))}</td><td>{escape(item['dtype'])}</td>"
                    f"<td>{item['bytes']:,}</td></tr>"
                )
        else:
            keys = ", ".join(record.get("keys", [])) or f"{record.get('chars', 0)} characters"
            cells.append(
                f"<tr><td>{escape(record['record'])}</td>"
                f"<td colspan=4>{escape(record['type'])}: {escape(keys)}</td></tr>"
            )
    return "".join(cells)


def _uplinks(up: dict[str, Any]) -> str:
    head = f"<h2>What left each device</h2><p>Verdict: <b>{escape(up['verdict'])}</b>; {up['replies']} replies"
    head += f", {up['bytes']:,} bytes of arrays.</p>"
    if up["offending"]:
        head += "<ul>" + "".join(f'<li class="warn">{escape(o)}</li>' for o in up["offending"]) + "</ul>"
    parts = [head]
    for line in up["lines"]:
        title = f"round {line['round']}, {line['kind']}, device {line['device']}: "
        title += f"{line['bytes']:,} bytes, {line['verdict']}"
        table = "<table><tr><th>record</th><th>name</th><th>shape</th><th>dtype</th><th>bytes</th></tr>"
        parts.append(f"<details><summary>{escape(title)}</summary>{table}{_uplink_rows(line)}</table></details>")
    return "".join(parts)


def _ci(stats: dict[str, Any], key: str) -> str:
    lo, hi = stats[f"{key}_ci95"]
    return f"{stats[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _membership_table(runs: dict[str, dict[str, Any]]) -> str:
    rows = [
        "<tr><th>run</th><th>score</th><th>AUC [95% CI]</th><th>TPR@1%FPR</th><th>TPR@0.1%FPR</th>"
        "<th>bound contradicted</th><th>empirical eps (lower bound)</th></tr>"
    ]
    for name, m in runs.items():
        for score in ("loss", "calibrated"):
            s = m[score]
            b = s["bound"]
            rows.append(
                f"<tr><td>{escape(name)}</td><td>{score}</td><td>{_ci(s, 'auc')}</td>"
                f"<td>{_ci(s, 'tpr_at_1pct_fpr')}</td>"
                f"<td>{_ci(s, 'tpr_at_0.1pct_fpr')}</td><td>{'-' if b is None else b['contradicts']}</td>"
                f"<td>{'-' if b is None else format(b['empirical_epsilon_lower_bound'], '.3f')}</td></tr>"
            )
    return "<table>" + "".join(rows) + "</table>"


def _canary_table(runs: dict[str, dict[str, Any]]) -> str:
    rows = [
        "<tr><th>run</th><th>planted mean</th><th>never-planted mean</th><th>AUC</th><th>max measurable</th>"
        "<th>repeats</th><th>references</th><th>memorisation</th></tr>"
    ]
    for name, c in runs.items():
        s = c["summary"]
        rows.append(
            f"<tr><td>{escape(name)}</td><td>{s['planted_mean']:.2f}</td><td>{s['unplanted_mean']:.2f}</td>"
            f"<td>{s['auc_planted_vs_unplanted']:.2f}</td><td>{s['max_measurable']:.2f}</td><td>{c['repeats']}</td>"
            f"<td>{c['references']}</td><td>{'detected' if s['memorisation_detected'] else 'not detected'}</td></tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def _empirical(report: dict[str, Any]) -> str:
    runs = {"audit run": report.get("empirical")}
    if report.get("control"):
        runs["control (DP off)"] = report["control"]["empirical"]
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        return "<h2>Empirical tests</h2><p>Not run: this is not an audit run (edgetune audit --empirical).</p>"
    canaries = {k: v["canaries"] for k, v in runs.items() if v.get("canaries")}
    membership = {k: v["membership"] for k, v in runs.items()}
    out = ["<h2>Empirical tests</h2>"]
    if canaries:
        out += ["<h3>Canary exposure</h3>", _canary_table(canaries), _img(canary_plot(canaries), "canary exposure")]
    out += ["<h3>Membership inference</h3>", _membership_table(membership)]
    out.append(_img(roc_plot(membership, report["guarantee"].get("empirical_bound")), "membership inference ROC"))
    return "".join(out)


def render_html(report: dict[str, Any]) -> str:
    """The whole page as one string."""
    body = (
        f"<h1>Privacy audit</h1><p>Run <code>{escape(report['run'])}</code>, base model "
        f"{escape(str(report['base_model']))}, {report['devices']} device(s).</p>"
        + _summary(report)
        + _guarantee(report["guarantee"])
        + _uplinks(report["uplinks"])
        + _empirical(report)
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Privacy audit</title>'
        f"<style>{_CSS}</style></head><body>{body}</body></html>\n"
    )
