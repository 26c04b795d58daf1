"""PEFT-format adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

A run's global adapter saved here loads with ``PeftModel.from_pretrained(base, folder)``.
Writes are atomic (:mod:`edgetune.fileio`), so a crash never leaves half a file.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgetune.adapters.binary import binarized_state
from edgetune.adapters.lora import peft_config
from edgetune.config import LoraConfig
from edgetune.fileio import atomic_save, atomic_write_text, load_tensors
from edgetune.types import StateDict

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "load_adapter",
    "save_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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
