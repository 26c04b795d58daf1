"""Adapter kinds side by side: LoRA, DoRA, binary LoRA weights and a quantised base.

    python -m edgetune.simulations.bench_adapters                                  # all variants, SmolLM2
    python -m edgetune.simulations.bench_adapters --variants lora-r8,binary-r8     # some (others kept)
    python -m edgetune.simulations.bench_adapters --base tiny --devices 2 --rounds 1 --steps 1

Every variant is one simulation with the same devices, seeds, rounds, local steps and codec
(1-bit), except that binary adapters exchange their latent B through fp16 (they refuse the
1-bit codec; docs/adapters.md); otherwise only ``lora.*`` / ``model.quantize`` differ:

    lora-r8 (today's default), lora-r32, dora-r8, binary-r8, binary-r16,
    lora-r8-recompute (the bf16/fp32 base with ``train.checkpointing=on``),
    lora-r8-int8 (int8 base; it recomputes activations by default),
    lora-r8-int8-keep (int8 base, ``train.checkpointing=off``: the int8 weights alone),
    lora-r8-int4 (int4 base: fails in one line on a CPU without its kernels, and the table
    says so)

Measured per variant: held-out loss per round (token-weighted over all devices), bytes up and
down, the aggregation error per round (as the run's metrics define it for the kind), local
training tokens/s (all devices' tokens over their training seconds), the deployed adapter's
size on disk (fp16 PEFT ``adapter_model.safetensors`` for LoRA and DoRA; the packed 1-bit file
for binary) beside the fp16 LoRA adapter of the same rank, and the peak RSS of a device
process: a fresh process that loads the base (quantised as chosen), attaches the adapter and
trains ``--steps`` steps on device 0's data, as one device would. Its ``VmHWM`` is read once
the model has loaded (the load's peak), then reset (Linux ``clear_refs``) and read again after
training (the training phase's own peak); the device's peak is the larger of the two.

Each variant's result goes to ``--out/<variant>/summary.json``; a run only redoes the variants
it names (``--variants``), and every run prints the table over all summaries in ``--out``,
writes ``result.json`` and ``adapters.png``, and ends with one JSON line.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import resource
import shutil
import time
from pathlib import Path

from edgetune.config import RunConfig, from_flat, to_flat
from edgetune.simulations.bench_cli import federation_parser, federation_settings

VARIANTS: dict[str, dict[str, object]] = {
    "lora-r8": {"lora.rank": 8},
    "lora-r32": {"lora.rank": 32},
    "dora-r8": {"lora.rank": 8, "lora.kind": "dora"},
    "binary-r8": {"lora.rank": 8, "lora.kind": "binary", "federation.codec": "fp16"},
    "binary-r16": {"lora.rank": 16, "lora.kind": "binary", "federation.codec": "fp16"},
    "lora-r8-recompute": {"lora.rank": 8, "train.checkpointing": "on"},
    "lora-r8-int8": {"lora.rank": 8, "model.quantize": "int8"},  # recomputes activations (its default)
    "lora-r8-int8-keep": {"lora.rank": 8, "model.quantize": "int8", "train.checkpointing": "off"},
    "lora-r8-int4": {"lora.rank": 8, "model.quantize": "int4"},
}
REFERENCE = "lora-r8"
_PER_VARIANT = {"run-dir", "lora.rank", "lora.kind", "model.quantize", "federation.codec", "train.checkpointing"}


def _peak_rss_child(flat: dict[str, object], queue: multiprocessing.Queue) -> None:
    """In a fresh process: load, attach, train K steps as device 0; report its peak RSS (MiB)
    after the imports, after the model loaded, and after training (the device's peak)."""
    from edgetune.adapters.lora import device_model
    from edgetune.chat import iterate_batches
    from edgetune.client.train import train_local
    from edgetune.datasets.devices import tokenized_device
    from edgetune.lm import pad_id
    from edgetune.precision import resolve_run

    def high_water() -> float:
        """VmHWM: this process's own peak. (Linux carries ru_maxrss over exec, so a spawned
        child's ru_maxrss starts at its parent's RSS.)"""
        status = Path("/proc/self/status")
        if status.exists():
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def reset_high_water() -> bool:
        """Set VmHWM to the current RSS (Linux: ``5`` into ``clear_refs``); False where it cannot."""
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    imports = high_water()
    cfg = resolve_run(from_flat(flat))  # train.precision=auto -> bf16 or fp32 for this CPU, as a device does
    model, tokenizer = device_model(cfg.model.base, cfg.lora, cfg.model.quantize, cfg.train.precision)
    loaded = high_water()
    split = reset_high_water()
    data = tokenized_device(cfg.data, "", 0, cfg.federation.num_devices, cfg.seed, tokenizer)
    batches = iterate_batches(data.train, cfg.train.batch_size, cfg.train.local_steps, cfg.seed, pad_id(tokenizer))
    train_local(model, batches, cfg.train)
    trained = high_water()
    queue.put(
        {
            "imports_rss_mib": imports,
            "load_peak_rss_mib": loaded,
            "train_peak_rss_mib": trained if split else math.nan,
            "peak_rss_mib": max(loaded, trained),
        }
    )


def peak_rss(cfg: RunConfig) -> dict[str, float]:
    """Peak RSS (MiB) of a fresh device process for ``cfg`` (spawned, so nothing is shared):
    ``imports_rss_mib``, ``load_peak_rss_mib`` (once the model is loaded), ``train_peak_rss_mib``
    (the training phase alone; NaN where the peak cannot be reset) and ``peak_rss_mib``."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=(to_flat(cfg), queue))
    proc.start()
    result = queue.get()
    proc.join()
    return {k: float(v) for k, v in result.items()}


def adapter_sizes(cfg: RunConfig, run_dir: Path) -> dict[str, int]:
    """Deployed adapter bytes and the fp16 LoRA adapter of the same rank (PEFT files)."""
    import torch

    from edgetune.adapters.binary_io import BINARY_WEIGHTS
    from edgetune.adapters.peft_io import load_adapter
    from edgetune.fileio import atomic_save

    folder = run_dir / "adapter"
    state = load_adapter(folder)
    fp16 = run_dir / "adapter-fp16.safetensors"
    atomic_save({k: v.to(torch.float16) for k, v in state.items()}, fp16, metadata={"format": "pt"})
    lora_only = run_dir / "lora-fp16.safetensors"
    factors = {k: v.to(torch.float16) for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
    atomic_save(factors, lora_only, metadata={"format": "pt"})
    deployed = folder / BINARY_WEIGHTS if cfg.lora.kind == "binary" else fp16
    return {"deployed_bytes": deployed.stat().st_size, "fp16_lora_bytes": lora_only.stat().st_size}


def run_variant(base: dict[str, object], name: str, out: Path) -> dict[str, object]:
    """One simulation and its measurements; failures are recorded, not raised."""
    from edgetune.config import ConfigError
    from edgetune.server.metrics import read_metrics
    from edgetune.simulations.simulate import simulate

    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = from_flat({**base, **VARIANTS[name], "run-dir": str(run_dir / "run")})
    print(f"== {name}: {VARIANTS[name]}", flush=True)
    start = time.perf_counter()
    cpu0 = time.process_time()
    try:
        simulate(cfg)
    except ConfigError as err:  # e.g. int4 on a CPU without its kernels
        print(f"   {name}: {err}", flush=True)
        summary: dict[str, object] = {"variant": name, "error": str(err)}
    else:
        rows = read_metrics(run_dir / "run")
        train = [m for m in rows if m["round"] > 0]
        errors = [m["aggregation_error"] for m in train if m["aggregation_error"] is not None]
        summary = {
            "variant": name,
            "eval_loss": [m["eval_loss"] for m in rows],
            "bytes_up": sum(m["bytes_up"] for m in rows),
            "bytes_down": sum(m["bytes_down"] for m in rows),
            "max_aggregation_error": max(errors) if errors else None,
            "train_tokens_per_s": sum(m["train_tokens"] for m in train)
            / max(sum(m["train_seconds"] for m in train), 1e-9),
            **adapter_sizes(cfg, run_dir / "run"),
            **peak_rss(cfg),
        }
    summary["wall_s"] = round(time.perf_counter() - start, 1)
    summary["main_cpu_s"] = round(time.process_time() - cpu0, 1)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def table(summaries: dict[str, dict]) -> str:
    ref = summaries.get(REFERENCE, {})
    ref_loss = ref.get("eval_loss", [None])[-1]
    lines = [
        f"{'variant':<18}{'loss r0':>9}{'final':>9}{'vs r8':>8}{'up B':>11}{'down B':>11}{'deployed B':>12}"
        f"{'/fp16':>8}{'tok/s':>8}{'load MiB':>9}{'train MiB':>10}{'peak MiB':>9}{'vs r8':>8}{'agg err':>9}"
    ]
    for name in VARIANTS:
        s = summaries.get(name)
        if s is None:
            continue
        if "error" in s:
            lines.append(f"{name:<18}  failed: {s['error']}")
            continue
        loss = s["eval_loss"]
        gap = f"{(loss[-1] - ref_loss) / ref_loss:+.2%}" if ref_loss else "-"
        ref_rss = ref.get("peak_rss_mib")
        rss_gap = f"{(s['peak_rss_mib'] - ref_rss) / ref_rss:+.1%}" if ref_rss else "-"
        err = s["max_aggregation_error"]
        lines.append(
            f"{name:<18}{loss[0]:>9.4f}{loss[-1]:>9.4f}{gap:>8}{s['bytes_up']:>11,}{s['bytes_down']:>11,}"
            f"{s['deployed_bytes']:>12,}{s['deployed_bytes'] / s['fp16_lora_bytes']:>8.4f}"
            f"{s['train_tokens_per_s']:>8.0f}{s.get('load_peak_rss_mib', math.nan):>9.0f}"
            f"{s.get('train_peak_rss_mib', math.nan):>10.0f}{s['peak_rss_mib']:>9.0f}{rss_gap:>8}"
            f"{(f'{err:.2e}' if err is not None else '-'):>9}"
        )
    return "\n".join(lines)


def plot(summaries: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    done = {k: s for k, s in summaries.items() if "error" not in s}
    for name, s in done.items():
        ax1.plot(range(len(s["eval_loss"])), s["eval_loss"], marker="o", label=name)
    ax1.set(xlabel="round", ylabel="held-out loss", title="held-out loss per round")
    ax1.xaxis.get_major_locator().set_params(integer=True)
    ax1.legend(fontsize=8)
    names = list(done)
    ax2.bar(names, [done[n]["deployed_bytes"] / 1024 for n in names])
    ax2.set(ylabel="KiB (log scale)", yscale="log", title="deployed adapter size")
    at = range(len(names))
    ax3.bar([i - 0.2 for i in at], [done[n].get("load_peak_rss_mib", math.nan) for n in names], 0.4, label="loading")
    ax3.bar([i + 0.2 for i in at], [done[n].get("train_peak_rss_mib", math.nan) for n in names], 0.4, label="training")
    ax3.set(ylabel="MiB", title="device peak RSS", xticks=list(at))
    ax3.set_xticklabels(names)
    ax3.legend(fontsize=8)
    for ax in (ax2, ax3):
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = federation_parser(__doc__, out="bench-out/adapters")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants to (re)run")
    parser.add_argument("--eval-examples", type=int, default=16, help="held-out conversations per device (16)")
    args = parser.parse_args()

    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    base = to_flat(
        from_flat(
            {
                **federation_settings(args),
                "data.max-eval-examples": args.eval_examples,
            }
        )
    )
    out = Path(args.out)
    for name in chosen:
        run_variant(base, name, out)
    summaries = {}
    for name in VARIANTS:
        path = out / name / "summary.json"
        if path.is_file():
            summaries[name] = json.loads(path.read_text())
    print(table(summaries))
    plot(summaries, out / "adapters.png")
    result = {
        "benchmark": "adapters",
        "config": {k: v for k, v in base.items() if k not in _PER_VARIANT},
        "reference": REFERENCE,
        "variants": summaries,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
