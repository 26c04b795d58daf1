"""DoRA on the server side: the base weights its maths needs, and its aggregation error.

A DoRA layer computes ``x -> W' x`` with (PEFT ``use_dora``, no dropout)::

    W'(m, B, A) = m[:, None] * (W0 + s B A) / ||W0 + s B A||_row      s = alpha / rank

``W'`` is not linear in ``(m, B)``: FedAvg over the devices' deltas of ``m`` and ``B`` gives
``W'(mean m_i, mean B_i)``, not ``mean W'(m_i, B_i)``, even with A frozen.
:func:`dora_weight_error` measures the gap, relative to the size of the averaged update,
as :func:`edgetune.adapters.delta.lora_product_error` does for both-factor LoRA.

The version-0 magnitudes, ``||W0||_row``, and ``W0`` for the error both come from the real
base model: :func:`dora_base` loads it once (the server keeps the targeted weights, about
430 MB fp32 for SmolLM2-135M with every projection targeted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from edgetune.adapters.lora import attach_lora, dora_magnitudes
from edgetune.config import LoraConfig
from edgetune.models import load_base
from edgetune.types import StateDict

__all__ = ["MAGNITUDE", "dora_base", "dora_weight", "dora_weight_error"]

MAGNITUDE = ".lora_magnitude_vector"


def dora_base(base: str, lora: LoraConfig) -> tuple[StateDict, StateDict]:
    """``(magnitudes, base weights)`` keyed by magnitude name, from the base model ``base``.

    Raises:
        ModelError: the base model cannot be loaded (see :func:`edgetune.models.load_base`).
    """
    model, _ = load_base(base)
    peft_model = attach_lora(model, lora)
    weights: StateDict = {}
    for name in dora_magnitudes(peft_model):
        layer: Any = peft_model.get_submodule(name.removesuffix(MAGNITUDE))
        weights[name] = layer.get_base_layer().weight.detach().float().clone()
    return {k: torch.linalg.norm(w, dim=1) for k, w in weights.items()}, weights


def dora_weight(w0: Tensor, m: Tensor, b: Tensor, a: Tensor, scaling: float) -> Tensor:
    """``W' = m * (W0 + s B A) / ||W0 + s B A||_row`` in float64, shape ``(out, in)``."""
    v = w0.double() + scaling * (b.double() @ a.double())
    return m.double()[:, None] * v / torch.linalg.norm(v, dim=1, keepdim=True)


def dora_weight_error(
    base_weights: StateDict, base: StateDict, deltas: Sequence[StateDict], weights: Sequence[float], scaling: float
) -> float:
    """Relative error of averaging DoRA parameters instead of the layers' effective weights.

    ``||W'(mean p_i) - mean W'(p_i)|| / ||mean W'(p_i) - W'(p_0)||`` pooled over all layers
    (Frobenius), where ``p_i = base + delta_i`` are device i's ``(m, B, A)`` and ``p_0 = base``.

    Args:
        base_weights: ``W0`` per layer, keyed by magnitude name (:func:`dora_base`).
        base: the global adapter the deltas start from (A, B and magnitudes).
        deltas: the devices' deltas (exchanged tensors only; the rest is taken from ``base``).
        weights: FedAvg weights.
        scaling: ``alpha / rank``.
    """
    total = float(sum(weights))
    err_sq = ref_sq = 0.0
    for m_key, w0 in base_weights.items():
        prefix = m_key.removesuffix(MAGNITUDE)
        keys = (m_key, f"{prefix}.lora_B.weight", f"{prefix}.lora_A.weight")
        per_device = [[base[k].double() + d[k].double() if k in d else base[k].double() for k in keys] for d in deltas]
        mean_w = _weighted_mean([dora_weight(w0, m, b, a, scaling) for m, b, a in per_device], weights, total)
        mean_m, mean_b, mean_a = (_weighted_mean([p[j] for p in per_device], weights, total) for j in range(3))
        w_of_mean = dora_weight(w0, mean_m, mean_b, mean_a, scaling)
        err_sq += float(torch.sum((w_of_mean - mean_w) ** 2))
        ref_sq += float(
            torch.sum((mean_w - dora_weight(w0, base[keys[0]], base[keys[1]], base[keys[2]], scaling)) ** 2)
        )
    return math.sqrt(err_sq / ref_sq) if ref_sq > 0 else 0.0


def _weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float], total: float) -> Tensor:
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights, strict=True):
        out = out + w * t
    return out / total
