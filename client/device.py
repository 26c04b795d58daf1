"""One device's side of a round, as plain functions over tensors and payloads.

    sync_global   bring the stored global adapter to the server's version (full or chain)
    train_round   K local steps, then delta = local - global + residual, encoded 1-bit
                  (with ``dp.clip-on=device``: clipped so the decoded uplink has norm <= C)
    eval_round    held-out loss of the global adapter

The Flower ClientApp (``client/app.py``) only unpacks messages and calls these.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from peft import PeftModel

from edgetune.adapters.codec import Payload, apply_update, compress, decode, full_codec
from edgetune.adapters.delta import add, clip, global_norm, scale, subtract
from edgetune.adapters.lora import (
    dora_magnitudes,
    exchanged_names,
    get_adapter,
    init_adapter,
    model_adapter_shapes,
    set_adapter,
)
from edgetune.chat import Batch, iterate_batches
from edgetune.client.ort_engine import ORT, train_local_ort
from edgetune.client.storage import DeviceStorage
from edgetune.client.train import train_local, uncompiled
from edgetune.config import RunConfig
from edgetune.datasets.devices import TokenizedDevice
from edgetune.lm import StepStats, evaluate
from edgetune.types import StateDict

__all__ = [
    "Downlink",
    "SyncError",
    "clip_for_uplink",
    "eval_round",
    "round_batches",
    "sync_global",
    "train_delta",
    "train_round",
]


class SyncError(RuntimeError):
    """The device cannot reach the server's version from what it holds and was sent."""


@dataclass(frozen=True)
class Downlink:
    """What the server sent to bring this device to ``version``."""

    version: int
    full: Payload | None
    updates: dict[int, Payload]


def sync_global(storage: DeviceStorage, model: PeftModel, cfg: RunConfig, down: Downlink) -> StateDict:
    """Apply ``down`` to the stored global adapter and store the result.

    Updates are applied in version order; those the device already holds are skipped, so
    a chain from any older version is valid for every device.
    """
    held = storage.load_global()
    shapes = model_adapter_shapes(model)
    sent = {k: shapes[k] for k in exchanged_names(shapes, cfg.lora)}
    codec = cfg.federation.codec
    initial = init_adapter(shapes, cfg.seed, dora_magnitudes(model))
    state, version = held if held is not None else (initial, 0)
    if down.full is not None:
        full = decode(down.full, sent, full_codec(codec))
        state, version = {**initial, **full}, down.version
    for v in sorted(down.updates):
        if v <= version:
            continue
        if v != version + 1:
            raise SyncError(f"device holds version {version} but the next update sent is {v}")
        state, version = apply_update(state, decode(down.updates[v], sent, codec), codec), v
    if version != down.version:
        raise SyncError(f"device holds version {version}, server is at {down.version} and sent no way there")
    if held is None or held[1] != version:
        storage.save_global(state, version)
    return state


# Re-encoding rounds each 1-bit scale to fp16 (relative error <= 2^-11): aim this far below C.
_CLIP_MARGIN = 1 - 2**-9


def clip_for_uplink(
    delta: StateDict, residual: StateDict | None, clip_norm: float, codec: str
) -> tuple[Payload, StateDict]:
    """Encode ``clip(delta + residual, C)`` so that what the server decodes has norm <= C.

    What lies beyond C is dropped, not carried in the residual (which would otherwise grow
    without bound on a device whose updates are always long). 1-bit decoding can lengthen a
    vector (``||s sign(x)|| >= ||x||``), so a decoded form longer than C is scaled down and
    re-encoded: ``f s sign(x)`` encodes to the same bits with scales ``f s``. The server still
    clips what it decodes; this only keeps it from having to.

    Returns:
        ``(payload, new residual)``; the residual holds only this round's compression error.
    """
    corrected = clip(delta if residual is None else add(delta, residual), clip_norm)
    payload, decoded, _ = compress(corrected, None, codec)
    norm = global_norm(decoded)
    if norm > clip_norm:
        payload, decoded, _ = compress(scale(decoded, clip_norm * _CLIP_MARGIN / norm), None, codec)
    return payload, subtract(corrected, decoded)


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def round_batches(data: TokenizedDevice, cfg: RunConfig, round_: int, pad_id: int) -> Iterator[Batch]:
    """The device's K training batches of ``round_``: their order depends only on (run seed,
    round, device), so a redone round after a server crash repeats exactly."""
    seed = _seed(cfg.seed, round_, data.name)
    return iterate_batches(data.train, cfg.train.batch_size, cfg.train.local_steps, seed, pad_id)


def train_delta(
    model: PeftModel,
    pad_id: int,
    data: TokenizedDevice,
    storage: DeviceStorage,
    global_state: StateDict,
    cfg: RunConfig,
    round_: int,
    engine: str = "pytorch",
) -> tuple[StateDict, StepStats, int]:
    """K local steps from the global adapter: ``(local - global over the exchanged tensors, stats, examples)``.

    The batches are :func:`round_batches`. ``engine`` (``client.ort_engine.select_engine``)
    picks PyTorch or ONNX Runtime for the local steps.
    """
    set_adapter(model, global_state)
    batches = round_batches(data, cfg, round_, pad_id)
    if engine == ORT:
        stats = train_local_ort(model, batches, cfg, storage.root)
    else:
        stats = train_local(model, batches, cfg.train)
    local = get_adapter(model)
    names = exchanged_names({k: tuple(v.shape) for k, v in local.items()}, cfg.lora)
    delta = subtract({k: local[k] for k in names}, {k: global_state[k] for k in names})
    num_examples = min(len(data.train), cfg.train.local_steps * cfg.train.batch_size)
    return delta, stats, num_examples


def train_round(
    model: PeftModel,
    pad_id: int,
    data: TokenizedDevice,
    storage: DeviceStorage,
    global_state: StateDict,
    cfg: RunConfig,
    round_: int,
    engine: str = "pytorch",
) -> tuple[Payload, StepStats, int]:
    """Train (:func:`train_delta`) and return ``(encoded delta, stats, num examples)``."""
    delta, stats, num_examples = train_delta(model, pad_id, data, storage, global_state, cfg, round_, engine)
    codec, before = cfg.federation.codec, storage.residual_before(round_)
    if cfg.dp.enabled and cfg.dp.clip_on == "device":
        payload, residual = clip_for_uplink(delta, before, cfg.dp.clip_norm, codec)
    else:
        payload, _, residual = compress(delta, before, codec)
    storage.save_residual(residual, round_)
    return payload, stats, num_examples


def eval_round(
    model: PeftModel, pad_id: int, data: TokenizedDevice, global_state: StateDict, cfg: RunConfig
) -> StepStats:
    """Held-out loss of ``global_state`` on this device."""
    set_adapter(model, global_state)
    with uncompiled():
        return evaluate(model, data.heldout, pad_id, cfg.train.batch_size, cfg.train.precision)
