"""``edgetune simulate``: a federated simulation on this machine.

edgetune simulate                       federated simulation on the defaults
edgetune simulate --rounds 5 --devices 12 --codec fp32 --run-dir runs/fp32
edgetune simulate --resume runs/default  continue a killed run from its last round
edgetune simulate --set train.learning-rate=1e-3 --set lora.rank=4
edgetune simulate --ray-address 10.0.0.1:6379  attach to a running Ray cluster
edgetune simulate --set eval.enabled=true --set eval.baselines=true   then evaluate (as edgetune eval)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgetune import wire
from edgetune.config import CODECS, RunConfig, from_flat, parse_overrides, read_run_config, to_flat
from edgetune.processes import EXIT_INTERRUPTED

__all__ = ["SIMULATE_FLAGS", "config_from_args", "register"]

# flag -> (flat config key, metavar, help)
SIMULATE_FLAGS = {
    "base": ("model.base", "MODEL", "base model: smollm2 (embedded), tiny, or a local HF folder / .gguf file"),
    "rounds": ("federation.rounds", "N", "training rounds"),
    "devices": ("federation.num-devices", "N", "virtual devices in the federation"),
    "per_round": ("federation.devices-per-round", "N", "devices sampled for training per round (0: all)"),
    "codec": ("federation.codec", "CODEC", f"exchange codec, both directions: {', '.join(CODECS)}"),
    "steps": ("train.local-steps", "K", "local optimizer steps per device per round"),
    "batch_size": ("train.batch-size", "N", "conversations per local step"),
    "lr": ("train.learning-rate", "RATE", "local AdamW learning rate"),
    "data": ("data.source", "SOURCE", "chatterbot (embedded corpus) or a JSONL file / folder of JSONL files"),
    "partition": ("data.partition", "SCHEME", "lang-topic (natural non-IID), iid or dirichlet"),
    "seed": ("seed", "SEED", "run seed (LoRA A init, sampling, splits, shuffles)"),
    "run_dir": ("run-dir", "DIR", "run folder for config, checkpoints, metrics, adapter and plots"),
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``simulate`` to the ``edgetune`` sub-commands."""
    sim = sub.add_parser(
        "simulate",
        help="run a federated simulation on this machine",
        description="Federated LoRA fine-tuning with N virtual devices on this machine (Flower simulation). "
        "Defaults: embedded SmolLM2-135M-Instruct, 8 chatterbot-corpus (language, topic) devices, "
        "1-bit deltas both ways. Writes metrics.jsonl, a PEFT adapter, loss.png and bytes.png to the run folder.",
    )
    defaults = to_flat(RunConfig())
    for flag, (key, metavar, text) in SIMULATE_FLAGS.items():
        sim.add_argument(
            f"--{flag.replace('_', '-')}", dest=flag, metavar=metavar, help=f"{text} (default: {defaults[key]})"
        )
    sim.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN from its last completed round")
    sim.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. lora.rank=4 (repeatable; keys: " + ", ".join(sorted(defaults)) + ")",
    )
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    sim.add_argument(
        "--ray-address",
        metavar="HOST:PORT",
        help="attach to a running Ray cluster (started with `ray start`) instead of starting Ray here: virtual "
        "devices spread over its nodes, one worker and base model per node; the run folder must be on a file "
        "system every node sees",
    )
    sim.set_defaults(handler=_cmd_simulate)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    flat: dict[str, object] = {}
    if args.resume:
        flat.update(read_run_config(args.resume))
        flat["run-dir"] = args.resume
    for flag, (key, *_) in SIMULATE_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            flat[key] = value
    flat.update(parse_overrides(args.set))
    return from_flat(flat)


def _extras(cfg: RunConfig) -> str:
    """The optional features a run has on, for its first line."""
    from edgetune.precision import resolve_run

    parts = []
    if cfg.model.quantize != "none":
        parts.append(f"{cfg.model.quantize} base")
    resolved = resolve_run(cfg).train
    if resolved.checkpointing == "on":
        parts.append("activations recomputed (train.checkpointing)")
    if resolved.compile == "on":
        parts.append("compiled decoder layers (train.compile)")
    if cfg.dp.enabled:
        parts.append(f"user-level DP (z={cfg.dp.noise_multiplier:g}, C={cfg.dp.clip_norm:g}, delta={cfg.dp.delta:g})")
    if cfg.rag.enabled:
        parts.append(f"RAG top-{cfg.rag.top_k} over {cfg.rag.documents}")
    return "".join(f", {p}" for p in parts)


def _precision(cfg: RunConfig) -> str:
    """``train.precision`` as this machine's virtual devices will resolve it, e.g. ``bf16 (auto: avx512_bf16)``."""
    from edgetune.precision import resolved_for_this_cpu

    requested = cfg.train.precision
    return resolved_for_this_cpu(requested).describe(requested)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from edgetune.server.checkpoint import footprint
    from edgetune.server.metrics import plot_run, read_metrics, summary_table, time_table
    from edgetune.simulations.preflight import check_inputs
    from edgetune.simulations.simulate import SimulationError, SimulationInterrupted, simulate

    cfg = config_from_args(args)
    run_dir = Path(cfg.run_dir)
    if not args.resume and (run_dir / wire.CHECKPOINT_DIR).is_dir():
        print(f"edgetune: {run_dir} already holds a run; use --resume {run_dir} or another --run-dir", file=sys.stderr)
        return 2
    f = cfg.federation
    print(
        f"edgetune simulate: {f.num_devices} devices ({f.sampled}/round), {f.rounds} round{'s' * (f.rounds != 1)}, "
        f"base={cfg.model.base}, codec={f.codec}, precision={_precision(cfg)}{_extras(cfg)}, run folder {run_dir}",
        flush=True,
    )
    problem = check_inputs(cfg)  # in this process, before Ray starts: one line, exit 2
    if problem:
        print(f"edgetune: {problem}", file=sys.stderr)
        return 2
    try:
        simulate(cfg, verbose=args.verbose, ray_address=args.ray_address)
    except SimulationInterrupted as err:
        print(f"edgetune: {err}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED  # status and checkpoint are on disk, Ray is shut down
    except SimulationError as err:
        print(f"edgetune: {err}", file=sys.stderr)
        return 1
    rows = read_metrics(run_dir)
    print(summary_table(rows))
    print(time_table(rows))
    print(footprint(run_dir))
    stopped = json.loads((run_dir / wire.STATUS_FILE).read_text()).get("reason")
    if stopped:  # the DP budget ended the run early
        print(f"edgetune: stopped early: {stopped}")
    plots = plot_run(run_dir)
    first, last = (f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-" for r in (rows[0], rows[-1]))
    print(
        f"held-out loss {first} -> {last}; adapter: {run_dir / wire.ADAPTER_DIR}; plots: "
        + ", ".join(str(p) for p in plots)
    )
    if cfg.eval.enabled:  # --set eval.enabled=true: answer quality vs the base model (and baselines)
        from edgetune.cli.eval import run_eval

        return run_eval(run_dir, cfg, rows, cfg.eval.baselines, None, run_dir)
    return 0
