"""Weight-only quantisation of the frozen base model on the device (``model.quantize``).

    none   fp32 base weights (the default)
    int8   torchao ``Int8WeightOnlyConfig``: int8 weights with one fp scale per output
           channel on every decoder Linear; embeddings and the (tied) LM head stay fp32
    int4   torchao ``Int4WeightOnlyConfig`` (group size 32); its kernels need CUDA (or the
           ``mslk`` GPU library) in torchao 0.18, so on a CPU it fails in one line, saying so

LoRA trains on top in fp32 (PEFT wraps torchao Linears in ``TorchaoLoraLinear``): gradients
reach the adapter through the de-quantising matmul; the base never changes. Under bf16
autocast the matmul runs in bf16, as it does over a bf16-held base. A training run on a
quantised base also recomputes activations by default (``train.checkpointing=auto``).

A Hugging Face folder is quantised one tensor at a time while it loads (:func:`load_quantized`
through ``edgetune/memory.py:load_tensorwise``, which says why); the tiny test model is
quantised after it is built.

Memory in training: torchao's CPU weight-only ``linear`` multiplies by a de-quantised copy of
the weight (``qdata.to(x.dtype)``), and autograd keeps that copy for the backward pass, so a
forward pass through the whole decoder held an fp32 copy of every weight besides the int8
one (measured on SmolLM2: peak RSS 40% *above* the fp32 base). Every quantised Linear is
therefore swapped for :class:`LeanQuantizedLinear`, whose autograd function keeps only the
int8 weight and de-quantises it again, one layer at a time, for the input gradient.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from edgetune.config import ConfigError
from edgetune.memory import decoder_linear, load_tensorwise

__all__ = [
    "LeanQuantizedLinear",
    "QuantizeError",
    "check_trainable",
    "is_quantized",
    "load_quantized",
    "quantize_model",
    "torchao_config",
]


class QuantizeError(ConfigError):
    """The chosen base quantisation cannot run (train) on this machine (the CLI exits 2)."""


def torchao_config(mode: str) -> Any:
    """The torchao config for ``mode`` (``int8`` or ``int4``).

    Raises:
        QuantizeError: an unknown mode.
    """
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig

    if mode == "int8":
        return Int8WeightOnlyConfig()
    if mode == "int4":
        return Int4WeightOnlyConfig(group_size=32)
    raise QuantizeError(f"model.quantize={mode!r}: choose none, int8 or int4")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _unsupported(mode: str, err: BaseException) -> QuantizeError:
    import torchao

    return QuantizeError(
        f"model.quantize={mode} cannot train on this CPU: torchao {torchao.__version__} has no CPU kernel "
        f"for it ({type(err).__name__}: {_first_line(err)}); use model.quantize=int8"
    )


def is_quantized(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a torchao-quantised weight (none exists before torchao is imported)."""
    utils = sys.modules.get("torchao.utils")
    return utils is not None and isinstance(tensor, utils.TorchAOBaseTensor)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The matmul dtype for ``x``: autocast's (bf16 under ``train.precision=bf16``) or its own."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


class _LeanLinearFn(torch.autograd.Function):
    """``y = x W^T + b`` for a quantised ``W`` that saves no de-quantised copy for backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, layer: nn.Linear) -> Tensor:
        ctx.layer = layer  # the module, not a tensor: only the quantised weight stays referenced
        ctx.x_dtype, ctx.dtype = x.dtype, _compute_dtype(x)
        return F.linear(x.to(ctx.dtype), layer.weight, layer.bias)  # torchao's kernel; its temporaries die here

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        weight = ctx.layer.weight.dequantize(ctx.dtype)  # (out, in), this layer only, freed on return
        return (grad.to(ctx.dtype) @ weight).to(ctx.x_dtype), None


class LeanQuantizedLinear(nn.Linear):
    """A frozen ``nn.Linear`` with a torchao-quantised weight, trained through without copies.

    The forward value is torchao's own ``linear``; only what autograd keeps differs (module
    docstring). The base never trains, so no weight gradient is computed.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return F.linear(x.to(_compute_dtype(x)), self.weight, self.bias)
        return _LeanLinearFn.apply(x, self)


def _make_lean(model: nn.Module) -> int:
    """Swap every quantised decoder Linear of ``model`` for a :class:`LeanQuantizedLinear`."""
    from torchao.utils import TorchAOBaseTensor

    swaps = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and isinstance(module.weight, TorchAOBaseTensor)
    ]
    for name, module in swaps:
        with torch.device("meta"):
            lean = LeanQuantizedLinear(module.in_features, module.out_features, bias=module.bias is not None)
        lean.weight, lean.bias = module.weight, module.bias
        model.set_submodule(name, lean)
    return len(swaps)


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Quantise the decoder Linears of ``model`` in place (``mode``: none, int8, int4).

    Raises:
        QuantizeError: the mode has no kernel on this machine (int4 on a CPU).
    """
    if mode == "none":
        return model
    from torchao.quantization import quantize_

    try:
        quantize_(model, torchao_config(mode), filter_fn=decoder_linear)
        _make_lean(model)
        _probe(model)
    except (ImportError, NotImplementedError, AssertionError, RuntimeError) as err:
        raise _unsupported(mode, err) from err
    return model


def check_trainable(mode: str) -> None:
    """Fail fast, before any model loads: quantise one small Linear and train through it.

    Raises:
        QuantizeError: ``mode`` has no kernel on this machine.
    """
    with torch.random.fork_rng(devices=[]):
        quantize_model(nn.Sequential(nn.Linear(64, 64, bias=False)), mode)


def _probe(model: nn.Module) -> None:
    """One tiny forward and backward through the first quantised Linear: fail now, not mid-round."""
    for name, module in model.named_modules():
        if decoder_linear(module, name):
            x = torch.zeros(1, module.in_features, requires_grad=True)
            torch.autograd.grad(module(x).sum(), x)
            return


def _quantized_tensor(weight: Tensor, mode: str) -> Tensor:
    """``weight`` (fp32, out x in) quantised by torchao as ``quantize_`` would."""
    from torchao.quantization import quantize_

    with torch.device("meta"):
        holder = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    holder[0].weight = nn.Parameter(weight, requires_grad=False)
    quantize_(holder, torchao_config(mode))
    return holder[0].weight


def load_quantized(folder: Path, mode: str) -> nn.Module:
    """Load a Hugging Face causal-LM folder with its decoder Linears quantised on the way in,
    one tensor at a time (module docstring).

    Raises:
        QuantizeError: the mode has no kernel on this machine; the folder has no safetensors
            weights, or weights that do not fit its config.
    """
    check_trainable(mode)
    try:
        model = load_tensorwise(folder, lambda weight: _quantized_tensor(weight, mode))
    except ValueError as err:
        raise QuantizeError(f"model.quantize={mode}: {err}") from err
    _make_lean(model)
    try:
        _probe(model)
    except (ImportError, NotImplementedError, AssertionError, RuntimeError) as err:
        raise _unsupported(mode, err) from err
    return model
