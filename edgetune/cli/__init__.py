"""The ``edgetune`` command line, the roof of the house: nothing imports it.

One module per job beside this file; each defines ``register(sub)``, which adds its parser(s)
and sets ``handler`` (parsed arguments -> exit code). Heavy imports wait for the handler, so
``edgetune --help`` returns at once.


edgetune simulate                      federated simulation on this machine
edgetune server | device | run         the same federation with real devices over gRPC
edgetune rag build | ask               a device's own document index
edgetune export                        .pte / ONNX / ONNX Runtime training / GGUF, with parity
edgetune distill                       a small student base model from a teacher (cloud node)
edgetune audit RUN                     privacy audit report of a run
edgetune eval RUN                      does federation help? answers vs base model and baselines
edgetune <command> --help

Exit codes: 0 success, 1 the job failed, 2 bad input (config, path, flag), 130 stopped by
Ctrl-C or SIGTERM (simulate, run, server, device join: one line, the run folder ``interrupted``).
"""

from __future__ import annotations

import argparse
import os
import sys

from edgetune.cli import audit, deploy, distill, eval, export, rag, simulate
from edgetune.config import ConfigError
from edgetune.processes import EXIT_INTERRUPTED

__all__ = ["main"]

# In --help order.
_COMMANDS = (simulate, deploy, rag, export, distill, audit, eval)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetune", description="Federated on-device fine-tuning of small Llama models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = args.handler(args)
    except ConfigError as err:
        print(f"edgetune: {err}", file=sys.stderr)
        return 2
    if code == EXIT_INTERRUPTED:
        # A signal stopped the job: its one line is printed, the run folder's status, the
        # checkpoints and the child processes are settled. The interpreter's own
        # finalisation (collecting torch's, gRPC's and Ray's objects) takes 2-8 s on a loaded
        # machine, which a user who pressed Ctrl-C should not wait for.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
