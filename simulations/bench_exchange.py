"""fp32 exchange vs 1-bit exchange on the same federation, plus the exactness of FedAvg in
the default (B-only) mode vs the both-factor mode.

    python -m edgetune.simulations.bench_exchange                        # SmolLM2, simulate's defaults
    python -m edgetune.simulations.bench_exchange --base tiny --rounds 2 --devices 3 --steps 2

Three simulations with the same devices, seeds and steps:
    fp32     B-only, fp32 deltas both ways
    1bit     B-only, 1-bit deltas both ways (error feedback on both sides)
    both-AB  A and B trained and exchanged (fp32, so only factor averaging differs)
Printed: final held-out loss of each, the 1-bit gap to fp32, bytes per direction and their
ratios, and the per-round aggregation error ``||mean(B)mean(A) - mean(BA)|| / ||mean(BA) - B0A0||``
of each mode (B-only must be 0 to float tolerance). Ends with one JSON line, also written
to ``--out``/result.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgetune.config import RunConfig, from_flat, to_flat
from edgetune.server.metrics import read_metrics
from edgetune.simulations.bench_cli import federation_parser, federation_settings
from edgetune.simulations.simulate import simulate

MODES = {
    "fp32": {"federation.codec": "fp32"},
    "1bit": {"federation.codec": "1bit"},
    "both-AB": {"federation.codec": "fp32", "lora.train-a": True},
}


_PER_RUN = {"run-dir", *(key for overrides in MODES.values() for key in overrides)}


def _run(base: RunConfig, name: str, overrides: dict[str, object], out: Path) -> dict[str, object]:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = from_flat({**to_flat(base), **overrides, "run-dir": str(run_dir)})
    print(f"== {name}: {overrides}", flush=True)
    simulate(cfg)
    rows = read_metrics(run_dir)
    errors = [m["aggregation_error"] for m in rows if m["aggregation_error"] is not None]
    return {
        "eval_loss": [m["eval_loss"] for m in rows],
        "bytes_up": sum(m["bytes_up"] for m in rows),
        "bytes_down": sum(m["bytes_down"] for m in rows),
        "max_aggregation_error": max(errors) if errors else None,
        "seconds": round(sum(m["seconds"] for m in rows), 1),
    }


def main() -> None:
    parser = federation_parser(__doc__, out="bench-out/exchange", devices=None, rounds=None, steps=None)
    args = parser.parse_args()
    base = from_flat(federation_settings(args))
    out = Path(args.out)
    runs = {name: _run(base, name, overrides, out) for name, overrides in MODES.items()}
    fp32, onebit = runs["fp32"], runs["1bit"]
    loss32, loss1 = fp32["eval_loss"][-1], onebit["eval_loss"][-1]
    result = {
        "benchmark": "exchange",
        "config": {k: v for k, v in to_flat(base).items() if k not in _PER_RUN},
        "fp32_final_eval_loss": loss32,
        "1bit_final_eval_loss": loss1,
        "round0_eval_loss": fp32["eval_loss"][0],
        "1bit_loss_gap_vs_fp32": (loss1 - loss32) / loss32,
        "bytes_up": {"fp32": fp32["bytes_up"], "1bit": onebit["bytes_up"]},
        "bytes_down": {"fp32": fp32["bytes_down"], "1bit": onebit["bytes_down"]},
        "up_ratio_fp32_over_1bit": fp32["bytes_up"] / max(onebit["bytes_up"], 1),
        "down_ratio_fp32_over_1bit": fp32["bytes_down"] / max(onebit["bytes_down"], 1),
        "aggregation_error": {name: r["max_aggregation_error"] for name, r in runs.items()},
        "runs": runs,
    }
    print(f"held-out loss: fp32 {loss32:.4f}  1bit {loss1:.4f}  gap {result['1bit_loss_gap_vs_fp32']:+.2%}")
    for way in ("up", "down"):
        ratio = result[f"{way}_ratio_fp32_over_1bit"]
        print(f"bytes {way:<4} fp32 {fp32[f'bytes_{way}']:>12,}  1bit {onebit[f'bytes_{way}']:>10,}  {ratio:.1f}x")
    print(
        "max aggregation error: "
        + ", ".join(f"{k} {v:.2e}" for k, v in result["aggregation_error"].items() if v is not None)
    )
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
