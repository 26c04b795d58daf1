"""edgetune against a plain Hugging Face ``Trainer`` + PEFT client, FlowerTune-style.

    python -m edgetune.simulations.bench_trainer                    # SmolLM2, 4 devices, 2 rounds
    python -m edgetune.simulations.bench_trainer --base tiny --devices 2 --rounds 1 --steps 2

    python -m edgetune.simulations.bench_trainer --lr 2e-3,8e-3 --codec 2bit
    python -m edgetune.simulations.bench_trainer --precision fp32    # a CPU without bf16 units' path

Both federations use the same devices (chatterbot English (language, topic) slices), the same
base model, LoRA rank/alpha/targets, local steps, batch size, learning rate and precision
(``--precision``, default ``auto``: what this CPU runs fastest; forcing ``fp32`` on a CPU with
bf16 units measures the path a CPU without them takes), and the same batches: each device
trains each round on the batches an edgetune device draws (``client.device.round_batches``),
so both sides do the same work per update and differ only in how they do it:

    trainer   what FlowerTune's template does: each round every device loads the global
              adapter (both LoRA factors, fp32) into a PEFT model, builds a ``Trainer`` and
              trains ``--steps`` steps (AdamW, constant learning rate, the gradient clipped
              at ``--max-grad-norm``; the full LM head; bf16 autocast over the fp32 base),
              then sends both factors back in fp32; the server averages A and B
              factor-wise (weighted by examples).
              Run in this process, one device after another.
    edgetune  ``edgetune simulate`` on the defaults (B only, 1-bit both ways or ``--codec``,
              error feedback, the bf16-held base, batches packed into fewer rows, the LM
              head on labelled positions only, AdamW's default step, the gradient clipped
              at ``--max-grad-norm`` as the Trainer clips it: ``train.max-grad-norm``), in
              Flower's simulation engine, one Ray worker process per machine.

``--lr`` takes several rates: each runs on both sides, and each side is also compared at the
rate of the grid where its held-out loss is lowest. ``--repeats`` runs each rate's pair that
many times, interleaved (edgetune, Trainer, edgetune, ...), so that a busy spell of the
machine falls on both sides; CPU figures are medians over the repeats, and updates per hour is
compared as the median of each repeat's own ratio (held-out loss and bytes are the same in
every repeat: both federations are seeded).

Reported: client updates per hour from CPU seconds per update (the device's sync + train, so
a busy machine does not flatter either side; the same statistic on both sides: all updates'
CPU seconds over their number), CPU seconds per 1,000 training tokens (non-padding tokens the
devices trained on), bytes per round each way (training messages; edgetune's downlink
also counts its evaluation messages), and the held-out loss after the last round (both through
``edgetune.lm.evaluate`` on each device's held-out split, token-weighted).
Ends with one JSON line (also in ``<out>/result.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import PrinterCallback, Trainer, TrainingArguments

from edgetune.adapters.delta import weighted_mean
from edgetune.adapters.lora import attach_lora, get_adapter, init_adapter, model_adapter_shapes, set_adapter
from edgetune.chat import Batch
from edgetune.client.device import round_batches
from edgetune.config import CODECS, DataConfig, FederationConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig
from edgetune.datasets.devices import TokenizedDevice, tokenized_device
from edgetune.lm import evaluate, pad_id
from edgetune.models import load_base
from edgetune.precision import resolved_for_this_cpu
from edgetune.server.metrics import read_metrics
from edgetune.simulations.bench_throughput import cpu_features
from edgetune.types import TRAIN_PRECISIONS

__all__ = ["run_edgetune", "run_trainer"]


def _heldout_loss(
    model: torch.nn.Module, devices: list[TokenizedDevice], pad: int, batch: int, precision: str
) -> float:
    stats = [evaluate(model, d.heldout, pad, batch, precision) for d in devices]  # type: ignore[arg-type]
    return sum(s.loss * s.tokens for s in stats) / sum(s.tokens for s in stats)


class _RoundTrainer(Trainer):
    """A ``Trainer`` fed the device's own batches of the round, the ones edgetune trains on."""

    def __init__(self, batches: list[Batch], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.round_batches = batches

    def get_train_dataloader(self) -> DataLoader:
        return DataLoader(self.round_batches, batch_size=None)  # type: ignore[arg-type]  # already collated


def _trainer_update(
    model: torch.nn.Module, device: TokenizedDevice, cfg: RunConfig, round_: int, pad: int, out: str
) -> int:
    """FlowerTune's client step: a fresh ``Trainer``, ``steps`` steps on the round's batches.

    Returns the non-padding tokens it trained on.
    """
    t = cfg.train
    batches = list(round_batches(device, cfg, round_, pad))
    args = TrainingArguments(
        output_dir=out,
        max_steps=t.local_steps,
        per_device_train_batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        max_grad_norm=t.max_grad_norm,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        bf16=t.precision == "bf16",
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        logging_strategy="no",
        disable_tqdm=True,
        seed=cfg.seed,
        dataloader_num_workers=0,
    )
    trainer = _RoundTrainer(batches, model=model, args=args, train_dataset=device.train)
    trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line, once per update
    trainer.train()
    return sum(int(b["attention_mask"].sum()) for b in batches)


def run_trainer(cfg: RunConfig) -> dict[str, float]:
    """The Trainer + PEFT federation (both factors, fp32 both ways, factor-wise FedAvg)."""
    both = LoraConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=cfg.lora.targets, train_a=True)
    base, tokenizer = load_base(cfg.model.base)
    model = attach_lora(base, both)
    pad = pad_id(tokenizer)
    f = cfg.federation
    devices = [tokenized_device(cfg.data, "", i, f.num_devices, cfg.seed, tokenizer) for i in range(f.num_devices)]
    global_state = init_adapter(model_adapter_shapes(model), cfg.seed)
    set_adapter(model, global_state)
    batch = cfg.train.batch_size
    loss_before = _heldout_loss(model, devices, pad, batch, cfg.train.precision)
    fp32_bytes = sum(v.numel() * 4 for v in global_state.values())
    cpu_per_update: list[float] = []
    tokens = 0
    with tempfile.TemporaryDirectory(prefix="edgetune-trainer-") as out:
        for round_ in range(1, f.rounds + 1):
            states, weights = [], []
            for device in devices:
                cpu = time.process_time()
                set_adapter(model, global_state)  # the downlink: both factors, fp32
                tokens += _trainer_update(model, device, cfg, round_, pad, out)
                states.append({k: v.detach().clone() for k, v in get_adapter(model).items()})
                cpu_per_update.append(time.process_time() - cpu)
                weights.append(float(min(len(device.train), cfg.train.local_steps * cfg.train.batch_size)))
            global_state = weighted_mean(states, weights)  # factor-wise: mean(B), mean(A)
    set_adapter(model, global_state)
    model.eval()
    return {
        "cpu_seconds_per_update": statistics.mean(cpu_per_update),
        "cpu_seconds_per_1k_tokens": 1000 * sum(cpu_per_update) / tokens,
        "bytes_up_per_round": fp32_bytes * f.num_devices,
        "bytes_down_per_round": fp32_bytes * f.num_devices,
        "heldout_loss_before": loss_before,
        "heldout_loss": _heldout_loss(model, devices, pad, batch, cfg.train.precision),
    }


def run_edgetune(cfg: RunConfig) -> dict[str, float]:
    """``edgetune simulate`` with ``cfg``; the same figures from its metrics."""
    from edgetune.simulations.simulate import simulate

    rows = read_metrics(simulate(cfg))
    trained = rows[1:]
    cpu = sum(r["cpu_seconds"].get("sync", 0.0) + r["cpu_seconds"].get("train", 0.0) for r in trained)
    return {
        "cpu_seconds_per_update": cpu / sum(r["replies"] for r in trained),
        "cpu_seconds_per_1k_tokens": 1000 * cpu / sum(r["train_tokens"] for r in trained),
        "bytes_up_per_round": statistics.mean(r["bytes_up"] for r in trained),
        "bytes_down_per_round": statistics.mean(r["bytes_down"] for r in trained),
        "heldout_loss_before": rows[0]["eval_loss"],
        "heldout_loss": rows[-1]["eval_loss"],
    }


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected rates like 2e-3,8e-3, got {text!r}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"learning rates must be > 0, got {text!r}")
    return rates


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _median_run(repeats: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the repeats of one side at one rate."""
    return {key: statistics.median(r[key] for r in repeats) for key in repeats[0]}


def _ratios(e: dict[str, float], t: dict[str, float], e_cpu: list[float], t_cpu: list[float]) -> dict[str, Any]:
    """edgetune against the Trainer; updates per hour as the median of the repeats' own ratios
    (``*_cpu``: CPU seconds per update in each repeat, in the order they ran)."""
    runs = [round(t_s / e_s, 2) for e_s, t_s in zip(e_cpu, t_cpu, strict=True)]
    return {
        "updates_per_hour": round(statistics.median(runs), 2),
        "updates_per_hour_runs": runs,
        "tokens_per_cpu_second": round(t["cpu_seconds_per_1k_tokens"] / e["cpu_seconds_per_1k_tokens"], 2),
        "fewer_bytes_up": round(t["bytes_up_per_round"] / e["bytes_up_per_round"], 1),
        "fewer_bytes_down": round(t["bytes_down_per_round"] / e["bytes_down_per_round"], 1),
        "heldout_loss_edgetune": round(e["heldout_loss"], 4),
        "heldout_loss_trainer": round(t["heldout_loss"], 4),
    }


def _best_rate(runs: dict[str, dict[str, dict[str, float]]], side: str) -> str:
    """The rate of ``runs`` where ``side``'s held-out loss is lowest (a diverged NaN never is)."""

    def loss(rate: str) -> float:
        value = runs[rate][side]["heldout_loss"]
        return value if math.isfinite(value) else math.inf

    return min(runs, key=loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2", metavar="MODEL", help="base model (default: smollm2)")
    parser.add_argument(
        "--devices", type=int, default=4, metavar="N", help="devices, all trained every round (default: 4)"
    )
    parser.add_argument("--rounds", type=int, default=2, metavar="N", help="rounds (default: 2)")
    parser.add_argument(
        "--steps", type=int, default=TrainConfig().local_steps, metavar="K", help="local steps per round"
    )
    parser.add_argument(
        "--batch-size", type=int, default=TrainConfig().batch_size, metavar="N", help="conversations per step"
    )
    parser.add_argument(
        "--lr",
        type=_rates,
        default=[TrainConfig().learning_rate],
        metavar="RATE[,RATE...]",
        help="learning rates, each run on both sides; with several, each side is also compared at its best",
    )
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        default=TrainingArguments.max_grad_norm,
        metavar="NORM",
        help="both sides clip each step's gradient to this L2 norm, 0: never (default: the Trainer's, %(default)s)",
    )
    parser.add_argument(
        "--codec",
        choices=CODECS,
        default=FederationConfig().codec,
        metavar="CODEC",
        help=f"edgetune's exchange codec, both ways: {', '.join(CODECS)} (default: the run default, %(default)s)",
    )
    parser.add_argument(
        "--precision",
        choices=TRAIN_PRECISIONS,
        default="auto",
        metavar="PRECISION",
        help="both sides' training precision: auto (what this CPU runs fastest), bf16 or fp32; forcing one"
        " measures that path on a CPU that would pick the other (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=_positive,
        default=3,
        metavar="N",
        help="runs of each rate's pair, interleaved; CPU figures are their medians (default: 3)",
    )
    parser.add_argument(
        "--out", default="bench-out/trainer", metavar="DIR", help="output folder for result.json and the runs"
    )
    args = parser.parse_args()
    out = Path(args.out)
    resolved = resolved_for_this_cpu(args.precision)
    precision = resolved.precision
    features = cpu_features()
    runs: dict[str, dict[str, dict[str, float]]] = {}
    cpu_runs: dict[str, dict[str, list[float]]] = {}
    for rate in args.lr:
        cfg = RunConfig(
            run_dir=str(out / f"edgetune-run-lr{rate:g}"),
            model=ModelConfig(base=args.base),
            data=DataConfig(max_length=128) if args.base == "tiny" else DataConfig(),
            train=TrainConfig(
                local_steps=args.steps,
                batch_size=args.batch_size,
                learning_rate=rate,
                max_grad_norm=args.max_grad_norm,
                precision=precision,
            ),
            federation=FederationConfig(rounds=args.rounds, num_devices=args.devices, codec=args.codec),
        )
        pairs: dict[str, list[dict[str, float]]] = {"edgetune": [], "trainer": []}
        for _ in range(args.repeats):  # interleaved
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
            pairs["edgetune"].append(run_edgetune(cfg))
            pairs["trainer"].append(run_trainer(cfg))
        runs[f"{rate:g}"] = {side: _median_run(r) for side, r in pairs.items()}
        cpu_runs[f"{rate:g}"] = {side: [x["cpu_seconds_per_update"] for x in r] for side, r in pairs.items()}
    print(
        f"precision {precision} ({args.precision}: {resolved.reason}); edgetune codec {args.codec};"
        f" max grad norm {args.max_grad_norm:g}; CPU: {features}"
    )
    print(
        f"{'rate':>7} {'':>9} {'updates/h (CPU)':>15} {'CPU s/1k tokens':>15} {'up B/round':>11}"
        f" {'down B/round':>12} {'held-out loss':>20}"
    )
    for rate, results in runs.items():
        for name, r in results.items():
            r["updates_per_cpu_hour"] = 3600 / r["cpu_seconds_per_update"]
            print(
                f"{rate:>7} {name:>9} {r['updates_per_cpu_hour']:>15.0f} {r['cpu_seconds_per_1k_tokens']:>15.2f}"
                f" {r['bytes_up_per_round']:>11,.0f} {r['bytes_down_per_round']:>12,.0f}"
                f" {r['heldout_loss_before']:>9.4f} -> {r['heldout_loss']:.4f}"
            )
    ratios = {
        rate: _ratios(r["edgetune"], r["trainer"], cpu_runs[rate]["edgetune"], cpu_runs[rate]["trainer"])
        for rate, r in runs.items()
    }
    for rate, ratio in ratios.items():
        print(f"edgetune / trainer at {rate}: {ratio}")
    best = {side: _best_rate(runs, side) for side in ("edgetune", "trainer")}
    e_best, t_best = best["edgetune"], best["trainer"]
    at_best = _ratios(
        runs[e_best]["edgetune"], runs[t_best]["trainer"], cpu_runs[e_best]["edgetune"], cpu_runs[t_best]["trainer"]
    )
    if len(runs) > 1:
        print(f"each at its best rate (edgetune {best['edgetune']}, trainer {best['trainer']}): {at_best}")
    result = {
        "benchmark": "trainer",
        "base": args.base,
        "devices": args.devices,
        "rounds": args.rounds,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rates": args.lr,
        "max_grad_norm": args.max_grad_norm,
        "codec": args.codec,
        "repeats": args.repeats,
        "precision": precision,
        "precision_requested": args.precision,
        "cpu": features,
        "runs": runs,
        "cpu_seconds_per_update_runs": cpu_runs,
        "edgetune_over_trainer": ratios,
        "best_rate": best,
        "edgetune_over_trainer_at_best_rates": at_best,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
