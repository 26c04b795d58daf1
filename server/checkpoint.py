"""Per-round checkpoints and resume.

    checkpoints/round_0003.safetensors   global adapter ("adapter/<name>") and server
                                         residual ("residual/<name>"); metadata: round,
                                         version, held versions per device (JSON), the
                                         DP accountant's ledger ("privacy", JSON)
    updates/v0003.safetensors            the encoded update that made version 3

Updates are written before the checkpoint that refers to them, and each file atomically,
so the newest readable checkpoint is always consistent. Resuming loads it and continues
with the next round.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from edgetune.adapters.codec import Payload
from edgetune.adapters.peft_io import atomic_save, load_tensors
from edgetune.server.accounting import events_from_json, events_to_json
from edgetune.server.strategy import ServerState
from edgetune.wire import CHECKPOINT_DIR, UPDATES_DIR

__all__ = ["latest_checkpoint", "save_checkpoint", "save_update"]

_CKPT = re.compile(r"round_(\d+)\.safetensors$")


def save_update(run_dir: Path, version: int, payload: Payload) -> None:
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in payload.items()}
    atomic_save(tensors, run_dir / UPDATES_DIR / f"v{version:04d}.safetensors")


def _load_update(run_dir: Path, version: int) -> Payload:
    return {k: v.numpy() for k, v in load_tensors(run_dir / UPDATES_DIR / f"v{version:04d}.safetensors").items()}


def save_checkpoint(run_dir: Path, round_: int, state: ServerState) -> Path:
    tensors = {f"adapter/{k}": v for k, v in state.adapter.items()}
    tensors.update({f"residual/{k}": v for k, v in state.residual.items()})
    meta = {
        "round": str(round_),
        "version": str(state.version),
        "held": json.dumps(state.held, sort_keys=True),
        "privacy": events_to_json(state.privacy),
    }
    path = run_dir / CHECKPOINT_DIR / f"round_{round_:04d}.safetensors"
    atomic_save(tensors, path, metadata=meta)
    return path


def latest_checkpoint(run_dir: Path) -> tuple[int, ServerState] | None:
    """The newest checkpoint as ``(round, state)``, or ``None`` when the run has none.

    Raises:
        ValueError: the newest checkpoint or an update it needs is unreadable.
    """
    paths = {
        int(m.group(1)): p
        for p in (run_dir / CHECKPOINT_DIR).glob("round_*.safetensors")
        if (m := _CKPT.search(p.name))
    }
    if not paths:
        return None
    round_ = max(paths)
    path = paths[round_]
    tensors = load_tensors(path)
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata()
    version = int(meta["version"])
    state = ServerState(
        adapter={k.removeprefix("adapter/"): v for k, v in tensors.items() if k.startswith("adapter/")},
        residual={k.removeprefix("residual/"): v for k, v in tensors.items() if k.startswith("residual/")},
        version=version,
        held={k: int(v) for k, v in json.loads(meta["held"]).items()},
        updates={v: _load_update(run_dir, v) for v in range(1, version + 1)},
        privacy=events_from_json(meta.get("privacy", "[]")),
    )
    return round_, state
