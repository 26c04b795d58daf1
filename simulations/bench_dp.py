"""What user-level DP costs in held-out loss, and the epsilon it buys, on one federation.

    flock /tmp/edgetune-heavy.lock nice -n 5 python -m edgetune.simulations.bench_dp     # SmolLM2, ~10 min alone
    python -m edgetune.simulations.bench_dp --base tiny --devices 3 --rounds 2 --steps 2  # smoke test

Three simulations with the same devices, seeds and steps (all devices every round, so the
sampling adds no amplification and the runs differ only in the aggregation):
    no-dp      FedAvg weighted by example counts (the default)
    clip-only  DP aggregation with z = 0.001: clipping to C and uniform weights, noise negligible
    dp         DP aggregation with z = --noise-multiplier (RDP, fixed-size sampling)
Printed: held-out loss per round of each, epsilon at delta, the share of replies clipped and
the noise std on the mean. Ends with one JSON line, also written to ``--out``/result.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgetune.config import RunConfig, from_flat, to_flat
from edgetune.server.metrics import read_metrics
from edgetune.simulations.bench_cli import federation_parser, federation_settings
from edgetune.simulations.simulate import simulate


def _modes(clip_norm: float, noise_multiplier: float) -> dict[str, dict[str, object]]:
    dp = {"dp.enabled": True, "dp.clip-norm": clip_norm, "dp.sampling": "fixed", "dp.min-replies": 1}
    return {
        "no-dp": {},
        "clip-only": {**dp, "dp.noise-multiplier": 0.001},
        "dp": {**dp, "dp.noise-multiplier": noise_multiplier},
    }


def _run(base: RunConfig, name: str, overrides: dict[str, object], out: Path) -> dict[str, object]:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = from_flat({**to_flat(base), **overrides, "run-dir": str(run_dir)})
    print(f"== {name}: {overrides}", flush=True)
    simulate(cfg)
    rows = read_metrics(run_dir)
    trained = rows[1:]
    clipped = [m["dp_clipped_fraction"] for m in trained if m.get("dp_clipped_fraction") is not None]
    return {
        "eval_loss": [m["eval_loss"] for m in rows],
        "epsilon": rows[-1].get("dp_epsilon"),
        "clipped_fraction": sum(clipped) / len(clipped) if clipped else None,
        "noise_std_on_mean": trained[-1].get("dp_noise_std") if trained else None,
        "seconds": round(sum(m["seconds"] for m in rows), 1),
    }


def main() -> None:
    parser = federation_parser(__doc__, out="bench-out/dp", devices=8)
    parser.add_argument("--clip-norm", type=float, default=0.1, help="C for both DP runs (default: 0.1)")
    parser.add_argument("--noise-multiplier", type=float, default=0.5, help="z of the dp run (default: 0.5)")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta of the reported epsilon (default: 1e-5)")
    args = parser.parse_args()

    base = from_flat(
        {
            **federation_settings(args),
            "dp.delta": args.delta,
        }
    )
    out = Path(args.out)
    modes = _modes(args.clip_norm, args.noise_multiplier)
    runs = {name: _run(base, name, overrides, out) for name, overrides in modes.items()}
    result = {
        "benchmark": "dp",
        "config": {k: v for k, v in to_flat(base).items() if not k.startswith("dp.") and k != "run-dir"},
        "clip_norm": args.clip_norm,
        "noise_multiplier": args.noise_multiplier,
        "delta": args.delta,
        "round0_eval_loss": runs["no-dp"]["eval_loss"][0],
        "final_eval_loss": {name: r["eval_loss"][-1] for name, r in runs.items()},
        "epsilon": {name: r["epsilon"] for name, r in runs.items()},
        "runs": runs,
    }
    print(f"{'mode':<10} {'held-out loss per round':<40} {'epsilon':>10} {'clipped':>8} {'noise std':>10}")
    for name, r in runs.items():
        losses = " ".join(f"{x:.4f}" for x in r["eval_loss"])
        eps = f"{r['epsilon']:.2f}" if r["epsilon"] is not None else "-"
        clip = f"{r['clipped_fraction']:.0%}" if r["clipped_fraction"] is not None else "-"
        std = f"{r['noise_std_on_mean']:.2e}" if r["noise_std_on_mean"] is not None else "-"
        print(f"{name:<10} {losses:<40} {eps:>10} {clip:>8} {std:>10}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
