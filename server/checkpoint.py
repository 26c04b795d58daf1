"""Per-round checkpoints and resume.

    checkpoints/round_0003.safetensors   global adapter ("adapter/<name>") and server
                                         residual ("residual/<name>"); metadata: round,
                                         version, first version of the kept update chain
                                         ("chain"), held versions per device (JSON), the
                                         DP accountant's ledger ("privacy", JSON)
    updates/v0003.safetensors            the encoded update that made version 3

Updates are written before the checkpoint that refers to them, and each file atomically,
so the newest readable checkpoint is always consistent. Resuming loads it and continues
with the next round.

Retention (:func:`prune_run`): the newest ``keep`` checkpoints stay, plus every ``every``-th
round's as a snapshot; update files older than the chain the oldest kept resumable
checkpoint needs are deleted (the server never sends them again: see ``bounded_chain``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from edgetune.adapters.codec import Payload
from edgetune.fileio import atomic_save, atomic_write_text, load_tensors
from edgetune.server.accounting import events_from_json, events_to_json
from edgetune.server.strategy import ServerState
from edgetune.wire import CHECKPOINT_DIR, STATUS_FILE, UPDATES_DIR

__all__ = [
    "dir_bytes",
    "footprint",
    "latest_checkpoint",
    "prune_run",
    "save_checkpoint",
    "save_update",
    "write_interrupted",
]

_CKPT = re.compile(r"round_(\d+)\.safetensors$")
_UPDATE = re.compile(r"v(\d+)\.safetensors$")


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
        "chain": str(min(state.updates, default=state.version + 1)),
        "held": json.dumps(state.held, sort_keys=True),
        "privacy": events_to_json(state.privacy),
    }
    path = run_dir / CHECKPOINT_DIR / f"round_{round_:04d}.safetensors"
    atomic_save(tensors, path, metadata=meta)
    return path


def _numbered(folder: Path, pattern: re.Pattern[str]) -> dict[int, Path]:
    return {int(m.group(1)): p for p in folder.glob("*.safetensors") if (m := pattern.search(p.name))}


def _chain_start(path: Path) -> int:
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata()
    return int(meta.get("chain", "1"))  # folders from before bounded chains kept every update


def latest_checkpoint(run_dir: Path) -> tuple[int, ServerState] | None:
    """The newest checkpoint as ``(round, state)``, or ``None`` when the run has none.

    Raises:
        ValueError: the newest checkpoint or an update it needs is unreadable.
    """
    paths = _numbered(run_dir / CHECKPOINT_DIR, _CKPT)
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
        updates={v: _load_update(run_dir, v) for v in range(int(meta.get("chain", "1")), version + 1)},
        privacy=events_from_json(meta.get("privacy", "[]")),
    )
    return round_, state


def write_interrupted(run_dir: Path, reason: str) -> int:
    """Mark the run in ``run_dir`` ``interrupted`` at its last checkpointed round; returns that round.

    ``--resume`` (or, on real devices, the same ``edgetune run`` command) continues from it.
    """
    last = latest_checkpoint(run_dir)
    round_ = last[0] if last else 0
    body = {"status": "interrupted", "last_round": round_, "reason": reason}
    atomic_write_text(run_dir / STATUS_FILE, json.dumps(body))
    return round_


def prune_run(run_dir: Path, keep: int, every: int = 0) -> list[Path]:
    """Delete checkpoints and update files a resume can no longer need; returns what went.

    Kept: the newest ``keep`` checkpoints, every round divisible by ``every`` (``every > 0``),
    and the update files from the chain start of the oldest of the newest ``keep`` onwards.
    Example: rounds 1..10, ``keep=2, every=4`` keep rounds 4, 8, 9 and 10.
    """
    paths = _numbered(run_dir / CHECKPOINT_DIR, _CKPT)
    newest = sorted(paths, reverse=True)[:keep]
    removed = [p for r, p in paths.items() if r not in newest and not (every > 0 and r % every == 0)]
    if newest:
        start = min(_chain_start(paths[r]) for r in newest)
        removed += [p for v, p in _numbered(run_dir / UPDATES_DIR, _UPDATE).items() if v < start]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def dir_bytes(folder: Path) -> int:
    """Total size of the files under ``folder`` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def footprint(run_dir: Path) -> str:
    """One line for the end of a run: the run folder's size and what it holds."""
    ckpts = len(_numbered(run_dir / CHECKPOINT_DIR, _CKPT))
    updates = len(_numbered(run_dir / UPDATES_DIR, _UPDATE))
    mb = dir_bytes(run_dir) / 1e6
    return f"run folder {run_dir}: {mb:.1f} MB ({ckpts} checkpoints, {updates} updates kept)"
