"""Test-only probes on a device's secure-aggregation round; inert unless their variables are set.

A deployment test needs two things it cannot see from outside a real device: the integer
input the device masked (drawn with OS entropy, so nothing can recompute it) and a known
moment to kill the device. Two environment variables, which the SuperNode passes on to the
ClientApp processes it starts, give them::

    EDGETUNE_TEST_SECAGG_RECORD=<folder>  stage 1 writes the device's integer input of round r
                                          to <folder>/input-r<r>.npy: its secret, in the clear,
                                          so never set it outside a test
    EDGETUNE_TEST_SECAGG_HOLD=<file>      on the unmask message (so its masked input reached the
                                          server, which lists it among the survivors) the device
                                          writes the survivors to <file> as JSON and holds the
                                          message, unanswered, for at most HOLD_SECONDS: the test
                                          kills the device by PID in that window

Example (a test, never a real device)::

    env = {**os.environ, wire.SA_RECORD_ENV: str(tmp / "dev-c")}
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from edgetune import wire
from edgetune.adapters.secagg_protocol import SecAggError
from edgetune.fileio import atomic_write, atomic_write_text

__all__ = ["HOLD_SECONDS", "hold_before_unmask", "record_input"]

HOLD_SECONDS = 600.0


def record_input(round_: int, x: np.ndarray) -> None:
    """Write ``x`` (the device's integer input) when ``EDGETUNE_TEST_SECAGG_RECORD`` names a folder."""
    folder = os.environ.get(wire.SA_RECORD_ENV)
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(folder) / f"input-r{round_}.npy", lambda f: np.save(f, x))


def hold_before_unmask(node_id: int, round_: int, survivors: list[int]) -> None:
    """When ``EDGETUNE_TEST_SECAGG_HOLD`` names a file: write it, then hold the unmask message.

    Raises:
        SecAggError: nobody killed the device within ``HOLD_SECONDS`` (the test failed).
    """
    marker = os.environ.get(wire.SA_HOLD_ENV)
    if not marker:
        return
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(marker), json.dumps({"node": node_id, "round": round_, "survivors": survivors}))
    time.sleep(HOLD_SECONDS)
    raise SecAggError(f"test hold: not killed within {HOLD_SECONDS:.0f}s")
