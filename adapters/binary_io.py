"""The deployed binary adapter: sign bits and fp16 scales in one safetensors file.

A deployed folder holds ``adapter_config.json`` (PEFT's LoRA config, as for any adapter) and
``adapter_binary.safetensors`` with two tensors and a small header::

    signs   uint8 (sum_k ceil(numel_k / 8),)   bit = 1 where the weight is >= +0 (row-major)
    scales  fp16  (sum_k r_k,)                  one per rank channel (adapters/binary.py)
    metadata  one key, a JSON header: format, seed, every factor's name and shape, which are stored

With A frozen at its shared-seed value (``lora.train-a`` off) only B is stored: A is rebuilt
from the seed (``init_adapter``) and binarised, exactly as every device and the server build
it. :func:`unpack` returns the dense form ``bin(W)``, which a plain PEFT LoRA model loads (see
:func:`edgetune.adapters.binary.binarized_state`), so export and ``merge_and_unload`` need
nothing new.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from edgetune.adapters.binary import binarize, rank_axis, scales
from edgetune.adapters.lora import init_adapter, peft_config
from edgetune.adapters.peft_io import ADAPTER_CONFIG
from edgetune.config import LoraConfig
from edgetune.fileio import atomic_save, atomic_write_text
from edgetune.types import StateDict

__all__ = [
    "BINARY_FORMAT",
    "BINARY_WEIGHTS",
    "is_binary_folder",
    "load_binary_adapter",
    "pack",
    "save_binary_adapter",
    "unpack",
]

BINARY_WEIGHTS = "adapter_binary.safetensors"
BINARY_FORMAT = "edgetune-binary-lora/1"
_HEADER = "edgetune-binary"


def _is_factor(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def pack(latent: StateDict, seed: int, store_a: bool) -> tuple[StateDict, dict[str, str]]:
    """Sign bits and scales of ``bin(W)`` for every stored factor, plus the header metadata.

    Args:
        latent: a full adapter (A and B, fp32 latent or already binarised: same result).
        seed: the run seed A is rebuilt from when it is not stored.
        store_a: store A too (both-factor mode); otherwise only B.

    Raises:
        ValueError: ``latent`` holds tensors that are not LoRA factors (e.g. DoRA magnitudes).
    """
    others = sorted(k for k in latent if not _is_factor(k))
    if others:
        raise ValueError(f"binary adapters hold LoRA factors only, got {others[0]!r}")
    names = sorted(latent)
    stored = [k for k in names if store_a or ".lora_B." in k]
    signs = [np.packbits(~torch.signbit(latent[k].float()).flatten().numpy()) for k in stored]
    scale = [scales(latent[k]).half() for k in stored]
    tensors = {
        "signs": torch.from_numpy(np.concatenate(signs) if signs else np.zeros(0, np.uint8)),
        "scales": torch.cat(scale) if scale else torch.zeros(0, dtype=torch.float16),
    }
    meta = {
        "format": BINARY_FORMAT,
        "seed": str(seed),
        "shapes": json.dumps({k: list(latent[k].shape) for k in names}, separators=(",", ":")),
        "stored": json.dumps(stored, separators=(",", ":")),
    }
    return tensors, meta


def unpack(tensors: StateDict, meta: dict[str, str]) -> StateDict:
    """The dense adapter ``bin(W)`` (fp32) from :func:`pack`'s output.

    Raises:
        ValueError: another format, or sizes that do not match the header.
    """
    if meta.get("format") != BINARY_FORMAT:
        raise ValueError(f"not a binary adapter: format {meta.get('format')!r}, expected {BINARY_FORMAT!r}")
    shapes = {k: tuple(v) for k, v in json.loads(meta["shapes"]).items()}
    stored = json.loads(meta["stored"])
    out = {k: binarize(v) for k, v in init_adapter(shapes, int(meta["seed"])).items()}
    bits, scale = tensors["signs"].numpy(), tensors["scales"].float()
    bit_pos = scale_pos = 0
    for k in stored:
        shape = shapes[k]
        numel, r = shape[0] * shape[1], min(shape)
        nbytes = (numel + 7) // 8
        if bit_pos + nbytes > bits.size or scale_pos + r > scale.numel():
            raise ValueError(f"binary adapter is truncated at {k!r}")
        sign = np.unpackbits(bits[bit_pos : bit_pos + nbytes])[:numel].reshape(shape).astype(np.float32) * 2 - 1
        s = scale[scale_pos : scale_pos + r]
        s = s[:, None] if rank_axis(shape) == 0 else s[None, :]
        out[k] = torch.from_numpy(sign) * s
        bit_pos, scale_pos = bit_pos + nbytes, scale_pos + r
    if bit_pos != bits.size or scale_pos != scale.numel():
        left = f"{bits.size - bit_pos} sign bytes and {scale.numel() - scale_pos} scales"
        raise ValueError(f"binary adapter has {left} left over")
    return out


def save_binary_adapter(folder: Path, latent: StateDict, lora: LoraConfig, base_model: str | None, seed: int) -> Path:
    """Write the deployed binary adapter folder; returns the packed file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors, meta = pack(latent, seed, store_a=lora.train_a)
    config = peft_config(lora).to_dict()
    config.update(base_model_name_or_path=base_model, peft_type="LORA", target_modules=sorted(lora.targets))
    path = folder / BINARY_WEIGHTS
    # One metadata key: safetensors does not keep the order of several, and the file must be
    # the same bytes whenever the adapter is.
    atomic_save(tensors, path, metadata={_HEADER: json.dumps(meta, sort_keys=True)})
    atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True, default=str))
    return path


def is_binary_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a packed binary adapter."""
    return (Path(folder) / BINARY_WEIGHTS).is_file()


def load_binary_adapter(folder: Path) -> StateDict:
    """The dense adapter ``bin(W)`` of a deployed folder (loads into a plain PEFT LoRA model).

    Raises:
        FileNotFoundError: no packed file in ``folder``.
        ValueError: a corrupt or foreign file.
    """
    path = Path(folder) / BINARY_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no binary adapter in {folder}: {BINARY_WEIGHTS} is missing")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get(_HEADER, "{}"))
        tensors = load_file(path)
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise ValueError(f"corrupt binary adapter {path}: {err}") from err
    return unpack(tensors, meta)
