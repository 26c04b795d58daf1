"""The flags every federation benchmark shares, and the run settings they name.

A benchmark builds its parser with :func:`federation_parser`, adds its own flags, and starts
its runs' configuration from :func:`federation_settings` (flat ``--set`` keys), so ``--base``,
``--devices``, ``--rounds``, ``--steps``, ``--seed`` and ``--out`` read and mean the same
everywhere.
"""

from __future__ import annotations

import argparse
from typing import Any

_SIMULATE_DEFAULT = "simulate's"


def federation_parser(
    doc: str | None,
    *,
    out: str,
    base: str = "smollm2",
    devices: int | None = 4,
    rounds: int | None = 2,
    steps: int | None = 4,
) -> argparse.ArgumentParser:
    """A parser with the shared flags; a default of ``None`` leaves the setting to simulate's."""

    def shown(value: int | None) -> str:
        return _SIMULATE_DEFAULT if value is None else str(value)

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--base", default=base, metavar="MODEL", help=f"base model: a packaged name or a local folder ({base})"
    )
    parser.add_argument(
        "--devices", type=int, default=devices, metavar="N", help=f"devices, all trained every round ({shown(devices)})"
    )
    parser.add_argument("--rounds", type=int, default=rounds, metavar="N", help=f"training rounds ({shown(rounds)})")
    parser.add_argument("--steps", type=int, default=steps, metavar="N", help=f"local steps per round ({shown(steps)})")
    parser.add_argument("--seed", type=int, default=0, metavar="SEED", help="run seed shared by every mode (0)")
    parser.add_argument("--out", default=out, metavar="DIR", help=f"output folder ({out})")
    return parser


def federation_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flat run settings the shared flags name (flags left at ``None`` are not set)."""
    flat: dict[str, Any] = {"model.base": args.base, "seed": args.seed}
    for key, value in (
        ("federation.num-devices", args.devices),
        ("federation.rounds", args.rounds),
        ("train.local-steps", args.steps),
    ):
        if value is not None:
            flat[key] = value
    return flat
