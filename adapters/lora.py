"""LoRA attach, shared-seed initialisation and adapter get/set, over PEFT.

Each targeted linear layer computes ``x -> W0 x + (alpha / rank) B A x`` with
``A: (rank, in)`` and ``B: (out, rank)``. Every party builds the same initial adapter from
the run seed alone: A uniform in ``±1/sqrt(in)`` (PEFT's kaiming default), B zero. In the
default mode A never changes, so ``mean_i(B_i) A == mean_i(B_i A)``: FedAvg over B deltas is
exactly the average of the devices' weight updates.

Adapter tensors are named as in PEFT's ``adapter_model.safetensors``
(``base_model.model.<module>.lora_A.weight``), so the same dict is what we train, send
(after encoding) and save.

``lora.kind`` picks the adapter: ``lora``; ``dora`` (PEFT ``use_dora``: the layer computes
``m * (W0 + s B A) / ||W0 + s B A||_row`` with a trained magnitude ``m`` per output row, named
``...lora_magnitude_vector``, which trains and travels with B; its version-0 value is the base
weight's row norm ``||W0||_row``, so :func:`init_adapter` needs :func:`dora_magnitudes`); or
``binary`` (factors are ``sign(W) * s`` in the forward pass, ``adapters/binary.py``).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import PreTrainedTokenizerBase

from edgetune.adapters.binary import make_binary
from edgetune.adapters.fused import fuse_lora_forward, stack_projections
from edgetune.config import LoraConfig
from edgetune.memory import return_free_heap
from edgetune.models import load_base
from edgetune.precision import hold_frozen_in_bf16, set_device_attention
from edgetune.types import StateDict

__all__ = [
    "StateDict",
    "adapter_shapes",
    "attach_lora",
    "device_model",
    "dora_magnitudes",
    "exchanged_names",
    "get_adapter",
    "model_adapter_shapes",
    "init_adapter",
    "peft_config",
    "set_adapter",
]


def peft_config(lora: LoraConfig) -> PeftLoraConfig:
    """The PEFT config for our adapter (no dropout, no bias; DoRA when ``lora.kind=dora``).

    A binary adapter is a plain LoRA config: its deployed (binarised) weights load into one.
    """
    return PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # PEFT annotates int; a float scale works
        target_modules=list(lora.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        use_dora=lora.kind == "dora",
    )


def attach_lora(model: nn.Module, lora: LoraConfig) -> PeftModel:
    """Wrap ``model`` with LoRA on ``lora.targets``; only exchanged factors are trainable.

    Raises:
        ValueError: none of the target names matches a layer of the model.
    """
    try:
        with warnings.catch_warnings():
            # PEFT still calls transformers' renamed `is_gradient_checkpointing`; not ours to fix.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            # A quantised base: PEFT could not merge into it, and edgetune never does (a merge for
            # export loads the unquantised base).
            warnings.filterwarnings("ignore", message=".*without `get_apply_tensor_subclass`.*")
            peft_model = get_peft_model(model, peft_config(lora))
    except ValueError as err:
        raise ValueError(f"lora.targets={','.join(lora.targets)} do not match this model's layers: {err}") from err
    if lora.kind == "binary":
        make_binary(peft_model)
    for name, param in peft_model.named_parameters():
        param.requires_grad = _travels(name, lora)
    return peft_model


@functools.cache
def device_model(
    base: str, lora: LoraConfig, quantize: str = "none", precision: str = "fp32"
) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The process-wide base model (``quantize``: ``model.quantize``) with an adapter attached,
    loaded once per ``(base, lora, quantize, precision)``.

    Every virtual device a simulation process serves reuses the same weights and only swaps
    adapter tensors in (:func:`set_adapter`). Under ``precision="bf16"`` (resolved, never
    ``auto``) the frozen base Linear weights are held in bf16 (:func:`hold_frozen_in_bf16`):
    the same matmuls as bf16 autocast over fp32 weights, without re-casting the whole model
    in every step; such a model must run under bf16 autocast. Its attention is eager on short
    sequences and SDPA in fp32 on long ones (:func:`set_device_attention`, faster there), and
    the frozen weights of layers that read the same input are one matrix
    (:func:`stack_projections`). Its LoRA layers take
    :class:`~edgetune.adapters.fused.FusedLoraLinear`'s forward.
    """
    model, tokenizer = load_base(base, quantize, bf16=precision == "bf16")
    peft_model = attach_lora(model, lora)
    fuse_lora_forward(peft_model)
    if precision == "bf16":
        hold_frozen_in_bf16(peft_model)  # the tiny model's weights, a tied head's bf16 copy
        set_device_attention(peft_model)
        stack_projections(peft_model)  # after the bf16 copies: the stacks replace them
        return_free_heap()  # the replaced copies' pages
    return peft_model, tokenizer


def _travels(name: str, lora: LoraConfig) -> bool:
    """B, DoRA's magnitude, and A in both-factor mode: what trains and is exchanged."""
    return ".lora_B." in name or ".lora_magnitude_vector" in name or (lora.train_a and ".lora_A." in name)


def adapter_shapes(model: nn.Module, lora: LoraConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every adapter tensor, from a model built on the meta device."""
    peft_model = attach_lora(model, lora)
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}


def model_adapter_shapes(model: PeftModel) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the adapter tensors already attached to ``model`` (no copies)."""
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}


def init_adapter(shapes: dict[str, tuple[int, ...]], seed: int, magnitudes: StateDict | None = None) -> StateDict:
    """The run's version-0 adapter: A ~ U(±1/sqrt(in)) from ``seed`` (sorted names), B = 0,
    DoRA magnitudes (if any) from ``magnitudes`` (:func:`dora_magnitudes`).

    Raises:
        ValueError: ``shapes`` has DoRA magnitudes that ``magnitudes`` lacks.
    """
    gen = torch.Generator().manual_seed(seed)
    state: StateDict = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if ".lora_magnitude_vector" in name:
            if magnitudes is None or name not in magnitudes:
                raise ValueError(f"DoRA adapter needs the base model's row norms for {name!r} (dora_magnitudes)")
            state[name] = magnitudes[name].detach().float().clone()
        elif ".lora_A." in name:
            bound = 1.0 / math.sqrt(shape[1])
            state[name] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        else:
            state[name] = torch.zeros(shape)
    return state


def exchanged_names(shapes: dict[str, tuple[int, ...]], lora: LoraConfig) -> list[str]:
    """The tensors that train and travel: B only by default, A and B in both-factor mode."""
    return sorted(n for n in shapes if _travels(n, lora))


@torch.no_grad()
def dora_magnitudes(model: PeftModel) -> StateDict:
    """DoRA's version-0 magnitudes, ``||W0||_row`` (fp32), from the base layers of ``model``.

    PEFT initialises ``m = ||W0 + s B A||_row``, which is ``||W0||_row`` while B is zero; computed
    from the frozen base weights, it is the same whatever adapter is loaded. Empty for a model
    without DoRA.
    """
    out: StateDict = {}
    for name in get_peft_model_state_dict(model):
        if ".lora_magnitude_vector" in name:
            module: Any = model.get_submodule(name.removesuffix(".lora_magnitude_vector"))
            weight = module.get_base_layer().weight
            out[name] = torch.linalg.norm(weight.detach().float(), dim=1)
    return out


def get_adapter(model: PeftModel) -> StateDict:
    """A detached fp32 copy of the model's adapter tensors, PEFT-file names."""
    return {k: v.detach().float().clone() for k, v in get_peft_model_state_dict(model).items()}


def set_adapter(model: PeftModel, state: StateDict) -> None:
    """Load ``state`` (a full adapter) into the model in place.

    Raises:
        KeyError: a tensor of the model's adapter is missing from ``state``.
    """
    expected = get_peft_model_state_dict(model).keys()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise KeyError(f"adapter state lacks {len(missing)} tensors, e.g. {missing[0]}")
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"adapter state has tensors the model lacks, e.g. {unexpected[0]}")
