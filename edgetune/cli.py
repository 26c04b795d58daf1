"""The ``edgetune`` command line: one sub-command per module in :mod:`edgetune.commands`.

edgetune simulate        federated simulation on this machine
edgetune <command> --help

Exit codes: 0 success, 1 the job failed, 2 bad input (config, path, flag).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from edgetune import commands
from edgetune.config import ConfigError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetune", description="Federated on-device fine-tuning of small Llama models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as err:
        print(f"edgetune: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
