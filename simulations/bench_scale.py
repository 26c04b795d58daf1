"""Many virtual devices: server memory, server time per round and disk, from 8 to 512 devices.

    python -m edgetune.simulations.bench_scale                       # 8, 64, 512 devices, tiny model
    python -m edgetune.simulations.bench_scale --sizes 8,64 --rounds 3 --out bench-out/scale

Each size runs as its own process (a fresh Flower simulation with Ray, so peak memory is that
size's alone) on the same federation: the tiny random Llama, the English chatterbot corpus
split IID, ``--per-round`` devices sampled per round, evaluation every 2nd round (and the
last) on a fixed sample of ``--per-round`` devices. What it reports per size:

    server RSS       peak resident memory of the process that runs the ServerApp (and Ray's driver)
    server s/round   the server's own work per round: aggregate + io phases, wall and CPU
                     seconds (median over rounds 2..R); beside it the CPU seconds of the whole
                     server process per round, which include Flower's simulation engine
    run folder       its size without device storage, and device storage: folders and bytes,
                     against the devices that actually trained or evaluated

The flatness check compares each figure at the largest size with the smallest (target: within
10%). Ends with one JSON line (also in ``<out>/result.json``).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from edgetune import wire
from edgetune.config import DataConfig, FederationConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig
from edgetune.server.checkpoint import dir_bytes

__all__ = ["measure_one", "scale_config"]

_FLAT = 1.10  # largest size within 10% of the smallest


def scale_config(run_dir: Path, num_devices: int, rounds: int, per_round: int, base: str = "tiny") -> RunConfig:
    """The same small federation at any size: only ``num_devices`` changes.

    The tiny random Llama trains rank-4 LoRA in fp32; any other base keeps the default LoRA
    and the precision its CPU picks (``train.precision=auto``).
    """
    tiny = base == "tiny"
    return RunConfig(
        seed=0,
        run_dir=str(run_dir),
        model=ModelConfig(base=base),
        lora=LoraConfig(rank=4) if tiny else LoraConfig(),
        # Byte-level tiny tokenizer: 256 tokens leave every conversation an answer to score.
        data=DataConfig(partition="iid", max_length=256, max_eval_examples=2),
        train=TrainConfig(local_steps=1, batch_size=2, **({"precision": "fp32"} if tiny else {})),
        federation=FederationConfig(
            rounds=rounds,
            num_devices=num_devices,
            devices_per_round=per_round,
            eval_every=2,
            eval_devices=per_round,
        ),
    )


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20  # Linux: KiB; macOS: bytes


def measure_one(cfg: RunConfig) -> dict[str, object]:
    """Run ``cfg`` in simulation in this process and measure it."""
    from edgetune.simulations.simulate import simulate

    run_dir = simulate(cfg)
    rows = read_rows(run_dir)
    later = rows[2:] or rows[1:]  # round 1 pays first-use costs (model load, Ray warm-up)
    server_wall = [r["wall_seconds"].get("aggregate", 0.0) + r["wall_seconds"].get("io", 0.0) for r in later]
    server_cpu = [r["cpu_seconds"].get("aggregate", 0.0) + r["cpu_seconds"].get("io", 0.0) for r in later]
    devices_dir = run_dir / wire.DEVICES_DIR
    folders = [p for p in devices_dir.iterdir() if p.is_dir()] if devices_dir.is_dir() else []
    touched = sorted({d for r in rows for d in r.get("per_device", {})})
    return {
        "devices": cfg.federation.num_devices,
        "server_rss_mb": round(_peak_rss_mb(), 1),
        "server_seconds_per_round": round(statistics.median(server_wall), 4),
        "server_cpu_seconds_per_round": round(statistics.median(server_cpu), 4),
        "process_cpu_seconds_per_round": round(statistics.median(r["server_cpu_seconds"] for r in later), 3),
        "round_wall_seconds": round(statistics.median(r["seconds"] for r in later), 3),
        "run_folder_bytes": dir_bytes(run_dir) - dir_bytes(devices_dir),
        "device_folders": len(folders),
        "device_storage_bytes": dir_bytes(devices_dir),
        "devices_touched": len(touched),
        "final_eval_loss": rows[-1]["eval_loss"],
    }


def read_rows(run_dir: Path) -> list[dict]:
    from edgetune.server.metrics import read_metrics

    return read_metrics(run_dir)


def _run_size(n: int, args: argparse.Namespace, work: Path) -> dict[str, object]:
    cmd = [sys.executable, "-m", "edgetune.simulations.bench_scale", "--one", str(n)]
    cmd += ["--rounds", str(args.rounds), "--per-round", str(args.per_round), "--base", args.base]
    cmd += ["--out", str(work / f"n{n}")]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"bench_scale --one {n} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def _table(rows: list[dict[str, object]]) -> str:
    head = (
        f"{'devices':>7} {'server RSS MB':>13} {'server s/round':>14} {'server CPU s/round':>18} {'process CPU s':>13} "
        f"{'round wall s':>12} {'run folder KB':>13} {'device dirs':>11} {'touched':>7} {'device KB':>9}"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(
            f"{r['devices']:>7} {r['server_rss_mb']:>13} {r['server_seconds_per_round']:>14} "
            f"{r['server_cpu_seconds_per_round']:>18} {r['process_cpu_seconds_per_round']:>13} "
            f"{r['round_wall_seconds']:>12} "
            f"{int(r['run_folder_bytes']) / 1e3:>13.1f} {r['device_folders']:>11} {r['devices_touched']:>7} "
            f"{int(r['device_storage_bytes']) / 1e3:>9.1f}"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="tiny", metavar="MODEL", help="base model (default: tiny; smollm2 too)")
    parser.add_argument("--sizes", default="8,64,512", help="comma-separated device counts (default: 8,64,512)")
    parser.add_argument("--rounds", type=int, default=4, help="training rounds per size (default: 4)")
    parser.add_argument("--per-round", type=int, default=8, help="devices trained (and evaluating) per round")
    parser.add_argument("--out", default="bench-out/scale", help="output folder for result.json")
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # internal: one size, this process
    args = parser.parse_args()
    if args.one:
        run_dir = Path(args.out) / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        print(
            json.dumps(measure_one(scale_config(run_dir, args.one, args.rounds, args.per_round, args.base))), flush=True
        )
        return
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if min(sizes) < args.per_round:
        parser.error(f"--sizes: every size must be at least --per-round={args.per_round}")
    with tempfile.TemporaryDirectory(prefix="edgetune-scale-") as tmp:
        rows = []
        for n in sizes:
            rows.append(_run_size(n, args, Path(tmp)))
            print(f"{n} devices: done", file=sys.stderr, flush=True)
    print(_table(rows))
    first, last = rows[0], rows[-1]
    ratios = {
        key: round(float(last[key]) / max(float(first[key]), 1e-9), 3)  # type: ignore[arg-type]
        for key in (
            "server_rss_mb",
            "server_seconds_per_round",
            "server_cpu_seconds_per_round",
            "process_cpu_seconds_per_round",
            "run_folder_bytes",
        )
    }
    flat = {key: ratio <= _FLAT for key, ratio in ratios.items()}
    print(f"largest / smallest: {ratios}; within 10%: {flat}")
    result = {
        "benchmark": "scale",
        "base": args.base,
        "sizes": sizes,
        "rounds": args.rounds,
        "per_round": args.per_round,
        "rows": rows,
        "ratio_largest_to_smallest": ratios,
        "flat_within_10pct": flat,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
