"""Binary LoRA weights: each adapter factor is ``sign(W) * s`` in the forward pass.

For a factor ``W`` (``A: (r, in)`` or ``B: (out, r)``) the forward pass uses::

    bin(W) = where(W >= +0, +1, -1) * s     s = fp16(rms(W)), one per rank channel

"One scale per rank channel" means along the longer axis, as the 1-bit codec does
(``adapters/codec.py``): A gets one scale per row, B one per column. ``bin(B) bin(A)`` is then
``sign(B) diag(t s) sign(A)``, so the scales fold into the rank dimension, and a deployed
factor costs 1 bit per parameter plus ``r`` fp16 scales (per-output-row scales on B would cost
16 bits per 8 sign bits at r = 8). ``s = rms(W)`` keeps each rank channel's L2 norm.
(``mean |W|``, the L2-closest scale for a fixed sign pattern, shrinks the channel, and with it
every training step's effect on the forward pass: on SmolLM2 it ended at a higher held-out
loss at the default learning rate and at each scale's best one; docs/adapters.md.) Zero maps
to +1 so that 1 bit suffices; a zero row (B at init) stays zero (s = 0). ``s`` is rounded to
fp16 in training too, so the forward pass trained is the one deployed.

Training goes through latent fp32 weights (the PEFT ``lora_A``/``lora_B`` Linear weights) with a
straight-through estimator: ``d loss / d W := d loss / d bin(W)``. What the federation trains,
exchanges and averages is the latent B (A frozen from the shared seed), through the usual
codecs: FedAvg of latent deltas is exact in latent space, and the forward pass is a
deterministic function of the global latent adapter. (Averaging is not exact for the
binarised weights themselves: ``bin(mean W_i) != mean bin(W_i)``; the benchmark measures it.)

``bin`` is idempotent: the rms of ``n`` copies of an fp16 value ``s``, computed in fp64, is
within a few fp64 ulps of ``s``, far inside half an fp16 ulp, so it rounds back to ``s``. So
``pack -> unpack -> pack`` is the identity bit for bit, and the dense form ``unpack(pack(W))``
loaded into a plain PEFT LoRA model gives the binary model's forward pass and merges with
PEFT's own ``merge_and_unload``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from edgetune.types import StateDict

__all__ = [
    "BinaryLinear",
    "binarize",
    "binarize_ste",
    "binarized_state",
    "binary_product_error",
    "make_binary",
    "rank_axis",
    "scales",
]


def rank_axis(shape: tuple[int, ...]) -> int:
    """Axis whose indices get one scale each: the shorter one (the rank of a LoRA factor).

    Example:
        >>> rank_axis((4, 64)), rank_axis((128, 4))
        (0, 1)
    """
    return 0 if shape[0] <= shape[1] else 1


def scales(w: Tensor) -> Tensor:
    """``fp16(rms(w))`` along the longer axis, as fp32: shape ``(r,)`` for A or B."""
    reduce = 1 - rank_axis(tuple(w.shape))
    return w.detach().double().square().mean(dim=reduce).sqrt().half().float()


def binarize(w: Tensor) -> Tensor:
    """``sign(w) * s`` with ``sign(0) = +1`` and one scale per rank channel (module docstring).

    Example:
        >>> binarize(torch.tensor([[3.0, -4.0, 0.0, 0.0]])).tolist()
        [[2.5, -2.5, 2.5, 2.5]]
    """
    s = scales(w)
    s = s[:, None] if rank_axis(tuple(w.shape)) == 0 else s[None, :]
    return torch.where(torch.signbit(w), -s, s).to(w.dtype)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, w: Tensor) -> Tensor:
        return binarize(w)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad  # straight through: the latent weight receives bin(W)'s gradient


def binarize_ste(w: Tensor) -> Tensor:
    """:func:`binarize` in the forward pass, the identity in the backward pass."""
    return _StraightThrough.apply(w)


class BinaryLinear(nn.Linear):
    """``x -> x bin(W)^T`` with the latent ``W`` as its (trainable) ``weight`` parameter.

    Same parameter name and shape as ``nn.Linear``, so PEFT's state-dict names do not change.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, binarize_ste(self.weight), self.bias)


def _as_binary(linear: nn.Linear) -> BinaryLinear:
    with torch.device("meta"):
        out = BinaryLinear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    out.weight = linear.weight  # the same Parameter: optimizer, requires_grad and names unchanged
    if linear.bias is not None:
        out.bias = linear.bias
    return out


def make_binary(model: PeftModel) -> PeftModel:
    """Swap every ``lora_A``/``lora_B`` Linear of ``model`` for a :class:`BinaryLinear`, in place.

    Raises:
        ValueError: the model has no LoRA layers.
    """
    swapped = 0
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for factors in (module.lora_A, module.lora_B):
                for name, linear in list(factors.items()):
                    if type(linear) is nn.Linear:
                        factors[name] = _as_binary(linear)
                        swapped += 1
    if not swapped:
        raise ValueError("make_binary: the model has no LoRA Linear layers to binarise")
    return model


def binarized_state(latent: StateDict) -> StateDict:
    """The dense form of the deployed adapter: ``bin(W)`` for every factor, fp32.

    Loaded into a plain PEFT LoRA model it gives the binary model's forward pass.
    """
    return {k: binarize(v.float()) if (".lora_A." in k or ".lora_B." in k) else v.clone() for k, v in latent.items()}


def binary_product_error(base: StateDict, deltas: Sequence[StateDict], weights: Sequence[float]) -> float:
    """Relative error of FedAvg over latent deltas, seen in the binarised forward pass.

    Per layer, with ``W_i = base + delta_i`` (latent): ``||bin(mean B_i) bin(mean A_i) -
    mean(bin(B_i) bin(A_i))|| / ||mean(bin(B_i) bin(A_i)) - bin(B_0) bin(A_0)||`` (Frobenius,
    pooled over layers). The latent average is exact; this is what binarising it costs.
    """
    total = float(sum(weights))
    err_sq = ref_sq = 0.0
    for a_key in (k for k in base if ".lora_A." in k):
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        pairs = [tuple(base[k] + d[k] if k in d else base[k] for k in (b_key, a_key)) for d in deltas]
        products = [binarize(b).double() @ binarize(a).double() for b, a in pairs]  # (out, in) each
        mean_prod = sum(w * p for w, p in zip(weights, products, strict=True)) / total
        mean_b, mean_a = (sum(w * p[j].double() for w, p in zip(weights, pairs, strict=True)) / total for j in (0, 1))
        prod_mean = binarize(mean_b.float()).double() @ binarize(mean_a.float()).double()  # type: ignore[union-attr]
        start = binarize(base[b_key]).double() @ binarize(base[a_key]).double()
        err_sq += float(torch.sum((prod_mean - mean_prod) ** 2))
        ref_sq += float(torch.sum((mean_prod - start) ** 2))
    return math.sqrt(err_sq / ref_sq) if ref_sq > 0 else 0.0
