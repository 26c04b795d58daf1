"""``edgetune audit``: the privacy audit report of a run (report.html + report.json).

edgetune audit runs/default                        the guarantee and what left each device
edgetune audit runs/default --empirical            + membership inference on device examples
edgetune audit runs/audit --launch --control --set dp.enabled=true --set federation.rounds=3
                                                   run an audit simulation (canaries planted)
                                                   and a DP-off control run, then report both
edgetune audit runs/audit --control runs/nodp      compare with an existing control run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgetune import wire
from edgetune.config import ConfigError, RunConfig, from_flat, parse_overrides

__all__ = ["register"]

DEFAULT_CANARIES = 8
_LAUNCH = "launch"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``audit`` to the ``edgetune`` sub-commands."""
    p = sub.add_parser(
        "audit",
        help="privacy audit report of a run (report.html, report.json)",
        description="Write a privacy audit of run folder RUN: the differential-privacy guarantee (re-derived with "
        "dp-accounting), what left each device per round, and - for audit runs or with --empirical - canary "
        "exposure and membership inference, compared with a DP-off control run if given.",
    )
    p.add_argument("run", metavar="RUN", help="run folder to audit (with --launch: the folder the audit run goes to)")
    p.add_argument("--out", metavar="DIR", help="folder for report.html and report.json (default: RUN)")
    p.add_argument(
        "--empirical",
        action="store_true",
        help="run the membership-inference test even if RUN planted no canaries (audit runs get it anyway)",
    )
    p.add_argument(
        "--launch",
        action="store_true",
        help=f"first run an audit simulation into RUN with the --set settings; audit.canaries defaults to "
        f"{DEFAULT_CANARIES} there",
    )
    p.add_argument(
        "--control",
        nargs="?",
        const=_LAUNCH,
        metavar="CONTROL_RUN",
        help="compare with a DP-off control run: a folder holding one, or, with no value and --launch, "
        "simulate it into RUN-control with the same settings and dp.enabled=false",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="run config for --launch (repeatable)"
    )
    p.add_argument("--references", type=int, default=256, metavar="N", help="reference secrets per canary (256)")
    p.add_argument("--max-examples", type=int, default=200, metavar="N", help="members and non-members scored (200)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples for CIs (1000)")
    p.set_defaults(handler=_cmd_audit)


def _launch_configs(args: argparse.Namespace) -> tuple[RunConfig, RunConfig | None]:
    flat: dict[str, object] = {"audit.canaries": DEFAULT_CANARIES, **parse_overrides(args.set)}
    flat["run-dir"] = args.run
    audit = from_flat(flat)
    control = None
    if args.control == _LAUNCH:
        control = from_flat({**flat, "run-dir": f"{args.run.rstrip('/')}-control", "dp.enabled": False})
    return audit, control


def _simulate(cfg: RunConfig, label: str) -> bool:
    from edgetune.simulations.simulate import SimulationError, simulate

    run_dir = Path(cfg.run_dir)
    if (run_dir / wire.CHECKPOINT_DIR).is_dir():
        print(
            f"edgetune: {run_dir} already holds a run; audit it without --launch or pick another folder",
            file=sys.stderr,
        )
        return False
    f = cfg.federation
    print(
        f"[{label}] simulating {f.num_devices} devices, {f.rounds} rounds, dp={cfg.dp.enabled}, "
        f"canaries={cfg.audit.canaries} -> {run_dir}",
        flush=True,
    )
    try:
        simulate(cfg)
    except SimulationError as err:
        print(f"edgetune: {err}", file=sys.stderr)
        return False
    return True


def _check_options(args: argparse.Namespace) -> None:
    for flag in ("references", "max_examples", "bootstrap"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be >= 1")
    if args.set and not args.launch:
        raise ConfigError("--set is for --launch (the settings of the audit run to simulate)")
    if args.control == _LAUNCH and not args.launch:
        raise ConfigError("--control without a folder launches a control run, which needs --launch")


def _cmd_audit(args: argparse.Namespace) -> int:
    from edgetune.server.audit.report import AuditError, build_report, write_report

    _check_options(args)
    control_dir = None if args.control in (None, _LAUNCH) else Path(args.control)
    if args.launch:
        audit_cfg, control_cfg = _launch_configs(args)
        if not _simulate(audit_cfg, "audit run"):
            return 1
        if control_cfg is not None:
            if not _simulate(control_cfg, "control run"):
                return 1
            control_dir = Path(control_cfg.run_dir)
    print(f"[report] auditing {args.run}" + (f" against control {control_dir}" if control_dir else ""), flush=True)
    try:
        report = build_report(
            Path(args.run),
            empirical=args.empirical or args.launch,
            control_dir=control_dir,
            references=args.references,
            max_examples=args.max_examples,
            reps=args.bootstrap,
        )
    except (AuditError, FileNotFoundError) as err:
        print(f"edgetune: {err}", file=sys.stderr)
        return 2
    html_path, json_path = write_report(report, Path(args.out or args.run))
    print("\n".join(f"  - {line}" for line in report["summary"]))
    print(f"report: {html_path} and {json_path}")
    return 0
