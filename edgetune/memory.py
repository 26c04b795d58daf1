"""Keeping a device process's resident memory near what it holds.

:func:`load_tensorwise` loads a Hugging Face folder one tensor at a time, converting each
decoder Linear weight on the way in (to int8 for ``model.quantize=int8``, to bf16 for the
bf16-held base): each tensor is read from the memory-mapped safetensors file, converted or
copied, and its mapping closed before the next, so the fp32 file (540 MB for SmolLM2) never
sits in memory whole beside the converted weights, as it does under ``from_pretrained``.

PyTorch's CPU allocator is the C library's ``malloc``. Training and quantising allocate large
temporaries between tensors that stay; glibc keeps the holes they leave (in one heap per
thread) instead of handing the pages back, so the resident set grows by whatever the holes
add up to, a different amount each run. :func:`return_free_heap` hands them back; each call
costs page faults when the pages are needed again, so only the memory-first paths call it
(the tensor-wise loader per tensor, training with ``train.checkpointing=on`` per step).

Measured on SmolLM2 with the int8 base (``model.quantize=int8``, which recomputes): the
load's peak RSS 1,137-1,209 MiB without it, 814 MiB with it; eight training steps
1,116-1,129 MiB without, 973 MiB with.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["decoder_linear", "load_tensorwise", "return_free_heap", "safetensors_files"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another C library has none)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


def return_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; elsewhere nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a Hugging Face folder (one file, or the shards of an
    index); empty if it has none (e.g. ``pytorch_model.bin`` only)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / name for name in shards]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def decoder_linear(module: nn.Module, name: str) -> bool:
    """A Linear of the decoder (what the base's conversions touch), not the LM head."""
    return isinstance(module, nn.Linear) and not name.endswith("lm_head")


def load_tensorwise(folder: Path, linear_weight: Callable[[Tensor], Tensor]) -> nn.Module:
    """The causal LM of a Hugging Face folder, in eval mode, with every decoder Linear weight
    ``linear_weight(fp32 weight)`` and everything else fp32, loaded one tensor at a time.

    Raises:
        ValueError: no safetensors weights, or weights that do not fit the folder's config.
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    with init_empty_weights(include_buffers=False):  # parameters on "meta": nothing allocated yet
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    files = safetensors_files(folder)
    if not files:
        raise ValueError(f"{folder} has no model.safetensors (tensor-wise loading reads safetensors only)")
    expected = {*dict(model.named_parameters()), *dict(model.named_buffers())}
    for file in files:
        with safe_open(file, framework="pt") as weights:
            keys = list(weights.keys())
        for key in keys:
            if key not in expected:
                raise ValueError(f"{file}: tensor {key!r} is not a parameter of this model's config")
            module_name, _, attr = key.rpartition(".")
            module = model.get_submodule(module_name)
            # One open per tensor: the mapping, and the pages read, end with the last view of it.
            with safe_open(file, framework="pt") as weights:
                view = weights.get_tensor(key)
            if attr in module._buffers:
                module._buffers[attr] = view.clone()
            elif attr == "weight" and decoder_linear(module, module_name):
                setattr(module, attr, nn.Parameter(linear_weight(view.float()), requires_grad=False))
            else:
                setattr(module, attr, nn.Parameter(view.to(torch.float32, copy=True), requires_grad=False))
            del view
            return_free_heap()  # converting leaves holes between the tensors that stay
    model.tie_weights()
    missing = sorted(name for name, param in model.named_parameters() if param.is_meta)
    if missing:
        raise ValueError(f"{folder}: no weights for {len(missing)} parameters, e.g. {missing[0]!r}")
    return model.eval()
