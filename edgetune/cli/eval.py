"""``edgetune eval``: does federation help? Answer quality of a run against the base model and baselines.

edgetune eval runs/default                   base model vs the run's global adapter, per device
edgetune eval runs/default --baselines       + local-only, centralised and personalised adapters
edgetune eval runs/default --data my.jsonl   the same on your own JSONL devices
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from edgetune.config import ConfigError, EvalConfig, RunConfig

__all__ = ["apply_eval_flags", "register", "run_eval"]

# flag -> EvalConfig field
_EVAL_FLAGS = {
    "max_new_tokens": "greedy answer length bound, in tokens",
    "batch_size": "questions per generate call",
    "personal_steps": "local steps of the personalised baseline (0: the run's train.local-steps)",
    "bootstrap": "bootstrap resamples per confidence interval",
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval`` to the ``edgetune`` sub-commands."""
    p = sub.add_parser(
        "eval",
        help="answer quality of a run vs the base model (and local-only / centralised baselines)",
        description="Generate answers (greedy, batched) to every device's held-out questions with the base model "
        "and the run's global adapter - and with --baselines, adapters trained local-only, centralised and "
        "personalised on the same data and step budget - and score them against the references (ROUGE-L F1, "
        "exact match, token F1, held-out loss) per device and overall with bootstrap confidence intervals. "
        "Writes eval.txt (verdict and table), eval.json and eval.png to RUN (or --out).",
    )
    p.add_argument("run", metavar="RUN", help="a finished run folder (config.json, metrics.jsonl, adapter/)")
    p.add_argument(
        "--baselines", action="store_true", help="also train and score local-only, centralised, personalised"
    )
    p.add_argument(
        "--data", metavar="PATH", help="your own JSONL file or folder of JSONL files instead of the run's data"
    )
    p.add_argument("--out", metavar="DIR", help="folder for eval.txt, eval.json, eval.png (default: RUN)")
    defaults = EvalConfig()
    for flag, text in _EVAL_FLAGS.items():
        p.add_argument(
            f"--{flag.replace('_', '-')}", dest=flag, type=int, metavar="N", help=f"{text} ({getattr(defaults, flag)})"
        )
    p.set_defaults(handler=_cmd_eval)


def apply_eval_flags(cfg: RunConfig, args: argparse.Namespace) -> RunConfig:
    """The run's config with the ``eval`` values given on the command line."""
    given = {flag: getattr(args, flag) for flag in _EVAL_FLAGS if getattr(args, flag, None) is not None}
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **given))


def run_eval(run_dir: Path, cfg: RunConfig, rows: list[dict], with_baselines: bool, data: str | None, out: Path) -> int:
    """Evaluate, write the files, print the table and the verdict; the exit code."""
    from edgetune.server.eval_report import eval_table, write_eval
    from edgetune.simulations.evaluate_run import EvalError, evaluate_run

    try:
        results = evaluate_run(run_dir, cfg, rows, with_baselines, data)
    except EvalError as err:
        print(f"edgetune: {err}", file=sys.stderr)
        return 2
    paths = write_eval(results, out)
    print(eval_table(results))
    print(results["verdict"])
    print("written: " + ", ".join(str(p) for p in paths))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from edgetune.simulations.evaluate_run import EvalError, read_run

    run_dir = Path(args.run)
    try:
        cfg, rows = read_run(run_dir)
        cfg = apply_eval_flags(cfg, args)
    except (EvalError, ConfigError) as err:
        print(f"edgetune: {err}", file=sys.stderr)
        return 2
    if args.data is not None and not Path(args.data).exists():
        print(f"edgetune: --data {args.data}: no such file or folder", file=sys.stderr)
        return 2
    what = "base, global" + (", local-only, centralised, personalised" if args.baselines else "")
    print(f"edgetune eval: {run_dir} ({cfg.federation.num_devices} devices, base={cfg.model.base}): {what}", flush=True)
    try:
        return run_eval(run_dir, cfg, rows, args.baselines, args.data, Path(args.out or run_dir))
    except ValueError as err:  # the device data (a DataError, a partition that does not fit)
        print(f"edgetune: {err}", file=sys.stderr)
        return 2
