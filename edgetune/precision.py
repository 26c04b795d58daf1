"""The training precision this CPU runs fastest: ``train.precision=auto`` resolved once.

bf16 autocast trains about 2x faster than fp32 on a CPU with bf16 matrix units (Intel AMX,
AVX512-BF16) and several times slower on one without (a bf16 matmul there was measured at
27 GFLOP/s per core against 96 for fp32). So ``auto`` picks:

    bf16   the CPU reports ``amx_bf16`` or ``avx512_bf16`` (Linux ``/proc/cpuinfo`` flags)
    fp32   it reports x86 flags without either
    either no flags to read (another OS or architecture): a sub-second matmul measurement
           picks bf16 only if it is at least ``_MEASURED_MARGIN`` times faster than fp32

An explicit ``bf16`` or ``fp32`` always wins. Every process resolves for its own CPU (a
device resolves the run's ``auto`` for itself), once, at the boundary where it parses the
run config (:func:`resolve_run`); code below that sees only ``bf16`` or ``fp32``.

Under bf16, :func:`hold_frozen_in_bf16` stores the frozen base Linear weights in bf16 once:
autocast re-casts a weight that needs no gradient on every use (its cast cache holds only
leaves that require grad), so an fp32 base is converted again in every forward. The matmuls
see the same bf16 values either way; embeddings, norms, the adapter and the optimizer
state stay fp32. Attention (:func:`set_device_attention`) runs eagerly on short sequences and
as SDPA in fp32 on long ones: CPU flash attention's bf16 backward is slow.

:func:`resolve_run` also resolves the run's other ``auto`` training settings:
``train.checkpointing`` and ``train.compile``.

Example:
    >>> resolve_precision("auto", frozenset({"avx2", "avx512f", "avx512_bf16"})).precision
    'bf16'
    >>> resolve_precision("fp32", frozenset({"amx_bf16"})).reason
    'explicit'
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from edgetune.config import RunConfig
from edgetune.lm import causal_lm
from edgetune.models import TINY

__all__ = [
    "BF16_UNIT_FLAGS",
    "COMPILE_MIN_STEPS",
    "DEVICE_ATTENTION",
    "EAGER_SCORES",
    "FP32_ATTENTION",
    "Resolved",
    "compiler_found",
    "cpu_flags",
    "hold_frozen_in_bf16",
    "matmul_gflops",
    "resolve_precision",
    "resolve_run",
    "resolved_for_this_cpu",
    "set_device_attention",
]

BF16_UNIT_FLAGS = ("amx_bf16", "avx512_bf16")
"""``/proc/cpuinfo`` flags of bf16 matrix units: with either, bf16 matmuls beat fp32."""
_X86_MARKERS = frozenset({"sse2", "avx", "avx2"})
_MEASURED_MARGIN = 1.2


@dataclass(frozen=True)
class Resolved:
    """A precision choice and why (for the run's first line)."""

    precision: str
    """``bf16`` or ``fp32``."""
    reason: str
    """``explicit``, the bf16 flags found, ``no bf16 units``, or the measured speed ratio."""

    def describe(self, requested: str) -> str:
        """E.g. ``bf16 (auto: avx512_bf16)`` or ``fp32``."""
        return self.precision if requested != "auto" else f"{self.precision} (auto: {self.reason})"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's feature flags, or an empty set where there is no cpuinfo."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def matmul_gflops(dtype: torch.dtype, n: int = 512, seconds: float = 0.1) -> float:
    """GFLOP/s of square ``(n, n) @ (n, n)`` matmuls in ``dtype``, best of a ``seconds`` window."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up: first-call dispatch and allocation
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / max(time.perf_counter() - start, 1e-9) / 1e9)
    return best


def resolve_precision(requested: str, flags: frozenset[str] | None = None) -> Resolved:
    """Resolve ``requested`` (``auto``, ``bf16`` or ``fp32``) for the CPU with ``flags``
    (default: this one's).

    Raises:
        ValueError: ``requested`` is none of the three.
    """
    if requested in ("bf16", "fp32"):
        return Resolved(requested, "explicit")
    if requested != "auto":
        raise ValueError(f"precision {requested!r}: expected auto, bf16 or fp32")
    flags = cpu_flags() if flags is None else flags
    units = [f for f in BF16_UNIT_FLAGS if f in flags]
    if units:
        return Resolved("bf16", "+".join(units))
    if flags & _X86_MARKERS:
        return Resolved("fp32", "no bf16 units")
    ratio = matmul_gflops(torch.bfloat16) / max(matmul_gflops(torch.float32), 1e-9)
    return Resolved("bf16" if ratio >= _MEASURED_MARGIN else "fp32", f"measured bf16/fp32 matmul {ratio:.2f}x")


@functools.cache
def resolved_for_this_cpu(requested: str) -> Resolved:
    """:func:`resolve_precision` for this process's CPU, computed once per process."""
    return resolve_precision(requested)


COMPILE_MIN_STEPS = 200
"""Local steps per device over a run from which ``train.compile=auto`` compiles: compiling
SmolLM2's decoder layers took 20-45 s and saved about 0.2 s per step of 8 conversations."""


@functools.cache
def compiler_found() -> bool:
    """Whether ``torch.compile``'s CPU backend (inductor) finds the C++ compiler it builds its
    kernels with (``g++``/``clang++``, or ``$CXX``); a phone or a slim image may have none."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # noqa: BLE001  # inductor raises its own InvalidCxxCompiler, or an OSError
        return False
    return True


def resolve_run(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``train.precision`` resolved for this CPU, ``train.checkpointing=auto``
    for its base (``on`` for a quantised one) and ``train.compile=auto`` for the run (see
    :attr:`edgetune.config.TrainConfig.compile`); explicit values stay."""
    t = cfg.train
    chosen = resolved_for_this_cpu(t.precision).precision
    checkpointing = t.checkpointing
    if checkpointing == "auto":
        checkpointing = "off" if cfg.model.quantize == "none" else "on"
    compiled = t.compile
    if compiled == "auto":
        pays = (
            cfg.model.base != TINY
            and cfg.federation.rounds * t.local_steps >= COMPILE_MIN_STEPS
            and (cfg.lora.kind, cfg.model.quantize, checkpointing) == ("lora", "none", "off")
            and t.pytorch_only
            and compiler_found()
        )
        compiled = "on" if pays else "off"
    if (chosen, checkpointing, compiled) == (t.precision, t.checkpointing, t.compile):
        return cfg
    train = dataclasses.replace(t, precision=chosen, checkpointing=checkpointing, compile=compiled)  # type: ignore[arg-type]
    return dataclasses.replace(cfg, train=train)


FP32_ATTENTION = "edgetune_sdpa_fp32"
"""transformers' SDPA attention run in fp32 inside bf16 autocast, by its transformers name: what
:data:`DEVICE_ATTENTION` runs on long sequences."""
DEVICE_ATTENTION = "edgetune_bf16_attention"
"""The attention of a bf16 device model (:func:`set_device_attention`), by its transformers name."""
EAGER_SCORES = 2**22
"""Score matrix elements (batch x heads x queries x keys) up to which a bf16 device model
attends eagerly; at most 25 MB of scores (fp32 probabilities and their bf16 copy) kept
per layer for the backward pass."""


def _sdpa_in_fp32(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
    """transformers' SDPA attention on fp32 copies of q, k and v, autocast off; the output
    back in the queries' dtype (bf16 under bf16 autocast)."""
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), *args, **kwargs)
    return out.to(query.dtype), weights


def _device_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, *args: Any, **kwargs: Any
) -> Any:
    """transformers' eager attention (bf16 matmuls under autocast, softmax in fp32) while the
    score matrices are small (:data:`EAGER_SCORES`), else :func:`_sdpa_in_fp32`.

    ``mask`` is SDPA's (:func:`~transformers.masking_utils.sdpa_mask`): boolean, or None where
    causal attention needs nothing else hidden (SDPA's ``is_causal``); eager attention adds it."""
    queries, keys = query.shape[2], key.shape[2]
    if query.shape[0] * query.shape[1] * queries * keys > EAGER_SCORES:
        return _sdpa_in_fp32(module, query, key, value, mask, *args, **kwargs)
    hidden = torch.finfo(torch.float32).min
    if mask is None:  # causal; any cached keys come before the queries
        mask = torch.full((1, 1, queries, keys), hidden).triu_(keys - queries + 1)
    elif mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape).masked_fill_(~mask, hidden)
    return eager_attention_forward(module, query, key, value, mask, *args, **kwargs)


for _name, _attention in ((FP32_ATTENTION, _sdpa_in_fp32), (DEVICE_ATTENTION, _device_attention)):
    AttentionInterface.register(_name, _attention)
    AttentionMaskInterface.register(_name, sdpa_mask)


def set_device_attention(model: nn.Module) -> None:
    """Give a bf16 device model :data:`DEVICE_ATTENTION`: eager attention on short sequences,
    SDPA in fp32 on long ones.

    PyTorch's CPU flash attention (transformers' default, SDPA) runs its bf16 backward far
    slower than its fp32 one: on SmolLM2 (bf16, 8 conversations of about 55 tokens) it took
    16% of a training step, 6x its forward, and in fp32 the step was 12% faster. Eager
    attention (two batched bf16 matmuls and a softmax) was faster still on the default
    data's sequences, uncompiled and more so compiled (docs/performance.md), but keeps every
    layer's score matrices for the backward pass, quadratic in the length: so it runs only up to
    :data:`EAGER_SCORES` elements (8 conversations of 256 tokens are 4.7 million
    with SmolLM2's 9 heads), SDPA in fp32, with the flash kernel's O(length) memory, beyond.
    Attention is a small share of the FLOPs; the projections around it stay bf16.
    """
    causal_lm(model).set_attn_implementation(DEVICE_ATTENTION)  # type: ignore[operator]  # a PreTrainedModel


def hold_frozen_in_bf16(model: nn.Module) -> int:
    """Store every frozen fp32 ``nn.Linear`` weight (and bias) of ``model`` in bf16, in place.

    Adapter layers (names with ``lora_``) and anything that trains stay as they are, and so
    do embeddings and norms (the residual stream stays fp32). A head tied to the input
    embedding gets its own bf16 copy (the embedding stays fp32). Only for use under bf16
    autocast: an fp32 forward would meet bf16 weights.

    The fp32 tensors that stay are copied once: ``from_pretrained`` leaves them views into the
    memory-mapped weights file, which would keep every page of it read so far (the whole fp32
    model, 540 MB for SmolLM2) resident beside the bf16 copies. (A device loads its
    bf16-held base a tensor at a time, ``edgetune/memory.py``, so there this copies only the
    tied head's source.)

    Returns:
        Parameters converted (0 when there is nothing to convert, e.g. a quantised base).
    """
    from edgetune.quantize import is_quantized

    converted = 0
    for name, module in model.named_modules():
        if "lora_" in name:
            continue
        linear = isinstance(module, nn.Linear)
        for attr, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad or param.dtype != torch.float32 or is_quantized(param):
                continue
            value = param.detach().to(torch.bfloat16) if linear else param.detach().clone()
            setattr(module, attr, nn.Parameter(value, requires_grad=False))
            converted += linear
    return converted
