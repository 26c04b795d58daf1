"""What secure aggregation costs: plain 1-bit vs SecAgg 1-bit vs SecAgg + distributed DP vs central DP.

    flock /tmp/edgetune-heavy.lock nice -n 5 python -m edgetune.simulations.bench_secagg
    python -m edgetune.simulations.bench_secagg --base tiny --devices 3 --rounds 2 --steps 2  # smoke test

Four simulations with the same devices, seeds and steps (all devices every round):
    plain-1bit    FedAvg over 1-bit deltas (the default)
    secagg-1bit   secure aggregation, 1-bit stochastic quantisation in Z_(2^k)
    secagg-ddp    secure aggregation + Skellam noise on the devices (16 signed bits), z = --noise-multiplier
    central-dp    the server's Gaussian DP at the epsilon secagg-ddp reached (z found by bisection)
Printed: held-out loss per round, uplink and downlink bits per parameter per device, seconds
per round and per secure-aggregation stage, epsilon. Ends with one JSON line, also written to
``--out``/result.json.
"""

from __future__ import annotations

import json
import math
import platform
import resource
import shutil
from pathlib import Path

from edgetune.adapters.lora import adapter_shapes, exchanged_names
from edgetune.config import RunConfig, from_flat, to_flat
from edgetune.models import model_skeleton
from edgetune.server.accounting import epsilon, next_event
from edgetune.server.metrics import read_metrics
from edgetune.simulations.bench_cli import federation_parser, federation_settings
from edgetune.simulations.simulate import simulate

_STAGES = ("keys", "share", "mask", "unmask")


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _central_z(cfg: RunConfig, target: float) -> float:
    """The z whose Gaussian rounds reach ``target`` epsilon after the same rounds (bisection)."""
    n, rounds = cfg.federation.num_devices, cfg.federation.rounds

    def eps(z: float) -> float:
        dp = from_flat({**to_flat(cfg), "dp.noise-multiplier": z}).dp
        return epsilon([next_event(dp, t, n, n) for t in range(1, rounds + 1)], "rdp", dp.delta)

    low, high = 1e-3, 1e3
    for _ in range(60):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if eps(mid) > target else (low, mid)
    return high


def _run(base: RunConfig, name: str, overrides: dict[str, object], out: Path, params: int) -> dict[str, object]:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = from_flat({**to_flat(base), **overrides, "run-dir": str(run_dir)})
    print(f"== {name}: {overrides}", flush=True)
    cpu = _cpu()
    simulate(cfg)
    cpu = _cpu() - cpu
    rows = read_metrics(run_dir)
    trained = rows[1:]
    sa = [m["secagg"] for m in trained if m.get("secagg")]
    up = sum(m["bytes_up"] for m in trained) * 8 / (params * max(sum(m["replies"] for m in trained), 1))
    down = sum(m["bytes_down"] for m in trained) * 8 / (params * max(sum(m["sampled"] for m in trained), 1))
    stages = {s: sum(x["stage_seconds"].get(s, 0.0) for x in sa) / max(len(sa), 1) for s in _STAGES}
    result = {
        "eval_loss": [m["eval_loss"] for m in rows],
        "epsilon": rows[-1].get("dp_epsilon"),
        "bits_up_per_param": up,  # all uplink bytes of a train round (incl. eval-free protocol traffic)
        "bits_down_per_param": down,
        "k": sa[-1]["k"] if sa else None,
        "wrap_bound": sa[-1].get("wrap_bound") if sa else None,
        "seconds_per_round": sum(m["seconds"] for m in trained) / max(len(trained), 1),
        "stage_seconds": stages if sa else None,
        "cpu_seconds": round(cpu, 1),
    }
    print(f"== {name} done: {json.dumps(result)}", flush=True)  # survives a timeout of the later runs
    return result


def main() -> None:
    parser = federation_parser(__doc__, out="bench-out/secagg", steps=2)
    parser.add_argument("--batch-size", type=int, default=4, help="conversations per step (default: 4)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (default: 128)")
    parser.add_argument("--clip-norm", type=float, default=0.1, help="C of both DP runs (default: 0.1)")
    parser.add_argument("--noise-multiplier", type=float, default=0.5, help="z of secagg-ddp (default: 0.5)")
    args = parser.parse_args()

    base = from_flat(
        {
            **federation_settings(args),
            "train.batch-size": args.batch_size,
            "data.max-length": args.max_length,
            "data.max-eval-examples": 8,
        }
    )
    shapes = adapter_shapes(model_skeleton(args.base), base.lora)
    params = sum(math.prod(shapes[k]) for k in exchanged_names(shapes, base.lora))
    dp = {"dp.enabled": True, "dp.clip-norm": args.clip_norm, "dp.sampling": "fixed", "dp.min-replies": 1}
    ddp = {**dp, "dp.clip-on": "device", "dp.noise-multiplier": args.noise_multiplier}
    out = Path(args.out)
    runs = {
        "plain-1bit": _run(base, "plain-1bit", {}, out, params),
        "secagg-1bit": _run(base, "secagg-1bit", {"secagg.enabled": True}, out, params),
        "secagg-ddp": _run(base, "secagg-ddp", {"secagg.enabled": True, "secagg.bits": 16, **ddp}, out, params),
    }
    target = runs["secagg-ddp"]["epsilon"]
    assert isinstance(target, float)
    z = _central_z(from_flat({**to_flat(base), **dp}), target)
    runs["central-dp"] = _run(base, "central-dp", {**dp, "dp.noise-multiplier": z}, out, params)
    plain = runs["plain-1bit"]
    print(f"{'mode':<12} {'held-out loss per round':<28} {'up b/p':>7} {'down b/p':>8} {'s/round':>8} {'epsilon':>8}")
    for name, r in runs.items():
        losses = " ".join(f"{x:.4f}" for x in r["eval_loss"])  # type: ignore[union-attr]
        eps = f"{r['epsilon']:.2f}" if r["epsilon"] is not None else "-"
        print(
            f"{name:<12} {losses:<28} {r['bits_up_per_param']:>7.2f} {r['bits_down_per_param']:>8.2f} "
            f"{r['seconds_per_round']:>8.1f} {eps:>8}"
        )
    result = {
        "benchmark": "secagg",
        "machine": platform.processor() or platform.machine(),
        "config": {k: v for k, v in to_flat(base).items() if k != "run-dir"},
        "params": params,
        "noise_multiplier_ddp": args.noise_multiplier,
        "noise_multiplier_central": z,
        "loss_ratio_secagg_vs_plain": runs["secagg-1bit"]["eval_loss"][-1] / plain["eval_loss"][-1],  # type: ignore[index]
        "time_ratio_secagg_vs_plain": runs["secagg-1bit"]["seconds_per_round"] / plain["seconds_per_round"],  # type: ignore[operator]
        "runs": runs,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
