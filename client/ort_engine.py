"""Local training with ONNX Runtime instead of PyTorch, for devices told to use it.

A device trains with ``onnxruntime`` when its SuperNode's node config says
``train-engine=onnxruntime`` or, in simulation, when its partition id is in
``train.ort-devices`` (else ``train.engine`` decides; see :func:`select_engine`).

Such a device, each round:

1. finds (or builds once) ONNX Runtime training artefacts in its storage folder under
   ``ort-training/<key>``, where the key hashes the base model, the LoRA config and the
   onnxruntime/torch versions (``edge_export.ort_training.build_artifacts``, from the same
   process-wide PEFT model the PyTorch path trains);
2. loads the synced global adapter into the artefacts' checkpoint parameters;
3. runs K AdamW steps on exactly the batches the PyTorch path would use (fresh optimizer
   state each round, as in ``client/train.py``);
4. writes the trained LoRA tensors back into the PEFT model, so the rest of the round
   (delta vs global + residual -> codec -> reply) is the normal path.

ONNX Runtime's CPU training runs in fp32: ``train.precision=bf16`` does not apply here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from peft import PeftModel

from edgetune import wire
from edgetune.adapters.lora import get_adapter, set_adapter
from edgetune.config import ENGINES, RunConfig, to_flat
from edgetune.lm import StepStats

__all__ = ["ORT", "artifacts_for", "select_engine", "train_local_ort"]

ORT = "onnxruntime"


def select_engine(cfg: RunConfig, node_config: Mapping[str, object]) -> str:
    """The engine this device trains with: node config, then ``train.ort-devices``, then ``train.engine``.

    Raises:
        ValueError: the node config names an engine that does not exist, or ONNX Runtime
            where the run clips gradients (``train.max-grad-norm``), which its artefacts cannot.
    """
    chosen = node_config.get(wire.TRAIN_ENGINE)
    if chosen:
        if str(chosen) not in ENGINES:
            raise ValueError(f"node config {wire.TRAIN_ENGINE}={chosen!r}: expected one of {ENGINES}")
        if chosen == ORT and cfg.train.max_grad_norm:
            raise ValueError(
                f"node config {wire.TRAIN_ENGINE}={chosen!r}: the run clips gradients "
                f"(train.max-grad-norm={cfg.train.max_grad_norm:g}), which ONNX Runtime's training artefacts cannot"
            )
        return str(chosen)
    partition = node_config.get(wire.PARTITION_ID)
    if partition is not None and str(partition) in cfg.train.ort_devices:
        return ORT
    return cfg.train.engine


def _artifacts_key(cfg: RunConfig) -> str:
    import onnxruntime

    lora = {k: v for k, v in to_flat(cfg).items() if k.startswith("lora.")}
    parts = {"base": cfg.model.base, "lora": lora, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def artifacts_for(model: PeftModel, cfg: RunConfig, storage_root: Path) -> Path:
    """The device's training artefacts for this base model and LoRA config, built on first use.

    The build goes to a temporary folder renamed into place, so a device killed mid-build
    rebuilds next round instead of reading half a checkpoint.
    """
    from edgetune.edge_export.ort_training import MANIFEST_FILE, build_artifacts

    folder = storage_root / wire.ORT_ARTIFACTS_DIR / _artifacts_key(cfg)
    if (folder / MANIFEST_FILE).is_file():
        return folder
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    build_artifacts(model, staging)
    shutil.rmtree(folder, ignore_errors=True)
    staging.replace(folder)
    return folder


def train_local_ort(
    model: PeftModel, batches: Iterator[dict[str, torch.Tensor]], cfg: RunConfig, storage_root: Path
) -> StepStats:
    """``client.train.train_local`` on ONNX Runtime: K steps from ``model``'s current adapter.

    On return ``model`` holds the trained adapter (as after the PyTorch path).
    """
    from edgetune.edge_export.ort_trainer import OrtTrainer

    folder = artifacts_for(model, cfg, storage_root)
    start = time.perf_counter()
    trainer = OrtTrainer(folder, get_adapter(model), cfg.train.learning_rate)
    total_loss, total_tokens, seen = 0.0, 0, 0
    for _, batch in zip(range(cfg.train.local_steps), batches, strict=False):
        loss, n = trainer.step(batch)
        total_loss += loss * n
        total_tokens += n
        seen += int(batch["attention_mask"].sum())
    set_adapter(model, {**get_adapter(model), **trainer.adapter()})
    return StepStats(total_loss / max(total_tokens, 1), total_tokens, seen, time.perf_counter() - start)
