"""PEFT-format adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

A run's global adapter saved here loads with ``PeftModel.from_pretrained(base, folder)``.
Writes are atomic (temp file, fsync, rename), so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from edgetune.adapters.binary import binarized_state
from edgetune.adapters.lora import peft_config
from edgetune.config import LoraConfig

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "atomic_save",
    "atomic_write_text",
    "load_adapter",
    "load_tensors",
    "save_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
StateDict = dict[str, Tensor]


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temp file in the same folder, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_save(tensors: StateDict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically: temp file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_tensors(path: Path) -> StateDict:
    """Read a safetensors file, naming the file when it is missing or corrupt."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"corrupt safetensors file {path}: {err}") from err


def save_adapter(folder: Path, state: StateDict, lora: LoraConfig, base_model: str | None) -> None:
    """Save a full adapter (A and B) as a PEFT folder (``base_model``: a local path or None).

    A binary adapter (``lora.kind=binary``) is saved in its dense deployed form ``bin(W)``
    (``adapters/binary.py``): plain PEFT then loads it with the binary forward pass.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if lora.kind == "binary":
        state = binarized_state(state)
    config = peft_config(lora).to_dict()
    config["base_model_name_or_path"] = base_model
    config["peft_type"] = "LORA"
    config["target_modules"] = sorted(lora.targets)
    atomic_save(state, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True, default=str))


def load_adapter(folder: Path) -> StateDict:
    """Load the tensors of a PEFT adapter folder."""
    return load_tensors(Path(folder) / ADAPTER_WEIGHTS)
