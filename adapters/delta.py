"""Pure maths over adapter state dicts (``dict[str, Tensor]``): nothing here mutates input.

FedAvg over deltas is ``global + sum_i w_i d_i / sum_i w_i`` with ``d_i = local_i - global``;
every function below is one term of that, or of clipping it.

Example:
    >>> import torch
    >>> a = {"w": torch.tensor([1.0, 2.0])}
    >>> b = {"w": torch.tensor([3.0, 6.0])}
    >>> weighted_mean([a, b], [1.0, 3.0])["w"].tolist()
    [2.5, 5.0]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from edgetune.types import StateDict

__all__ = ["add", "clip", "global_norm", "lora_product_error", "scale", "subtract", "weighted_mean"]


def _same_keys(a: StateDict, b: StateDict) -> None:
    if a.keys() != b.keys():
        diff = sorted(set(a) ^ set(b))
        raise KeyError(f"state dicts differ in {len(diff)} keys, e.g. {diff[0]!r}")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"shape mismatch for {k!r}: {tuple(a[k].shape)} vs {tuple(b[k].shape)}")


def subtract(a: StateDict, b: StateDict) -> StateDict:
    """``a - b`` key by key (the delta from ``b`` to ``a``)."""
    _same_keys(a, b)
    return {k: a[k] - b[k] for k in a}


def add(a: StateDict, b: StateDict) -> StateDict:
    """``a + b`` key by key (apply delta ``b`` to ``a``)."""
    _same_keys(a, b)
    return {k: a[k] + b[k] for k in a}


def scale(a: StateDict, factor: float) -> StateDict:
    """``factor * a``."""
    return {k: v * factor for k, v in a.items()}


def global_norm(a: StateDict) -> float:
    """L2 norm of all tensors taken together, ``sqrt(sum_k ||a_k||^2)``."""
    return math.sqrt(sum(float(torch.sum(v.double() ** 2)) for v in a.values()))


def clip(a: StateDict, max_norm: float) -> StateDict:
    """Scale ``a`` down to global L2 norm ``max_norm`` if it is longer (``a * min(1, C/||a||)``)."""
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm = global_norm(a)
    return a if norm <= max_norm else scale(a, max_norm / norm)


def weighted_mean(states: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """``sum_i w_i s_i / sum_i w_i``, accumulated in float64 and returned as float32.

    Raises:
        ValueError: no states, a length mismatch, or weights that are negative, non-finite
            or sum to zero.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"need as many weights as states, got {len(states)} states and {len(weights)} weights")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {list(weights)}")
    for s in states[1:]:
        _same_keys(states[0], s)
    total = float(sum(weights))
    return {k: (_weighted_sum([s[k].double() for s in states], weights) / total).float() for k in states[0]}


def _weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i w_i * t_i`` (a tensor even for one term, unlike ``sum``'s int start)."""
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights, strict=True):
        out = out + w * t
    return out


def lora_product_error(base: StateDict, deltas: Sequence[StateDict], weights: Sequence[float]) -> float:
    """Relative error of averaging LoRA factors separately instead of their products.

    For each adapted layer with factors ``A = base_A + dA_i`` and ``B = base_B + dB_i``:
    ``||mean(B_i) mean(A_i) - mean(B_i A_i)|| / ||mean(B_i A_i) - B_0 A_0||`` over all layers
    (Frobenius, pooled). Zero when A is shared and frozen (deltas carry no A): FedAvg of B
    deltas is then exactly the average of the devices' weight updates.
    """
    total = float(sum(weights))
    err_sq = ref_sq = 0.0
    for a_key in (k for k in base if ".lora_A." in k):
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        a_i = [base[a_key].double() + d[a_key].double() if a_key in d else base[a_key].double() for d in deltas]
        b_i = [base[b_key].double() + d[b_key].double() if b_key in d else base[b_key].double() for d in deltas]
        mean_prod = _weighted_sum([b @ a for b, a in zip(b_i, a_i, strict=True)], weights) / total
        prod_mean = (_weighted_sum(b_i, weights) / total) @ (_weighted_sum(a_i, weights) / total)
        err_sq += float(torch.sum((prod_mean - mean_prod) ** 2))
        ref_sq += float(torch.sum((mean_prod - base[b_key].double() @ base[a_key].double()) ** 2))
    return math.sqrt(err_sq / ref_sq) if ref_sq > 0 else 0.0
