"""The fast forward of plain LoRA layers: fewer passes, and one matmul for the frozen
weights of the layers that read the same input.

Every targeted layer computes ``y = W0 x + s B (A x)`` (``adapters/lora.py``). Two changes
make the same values take less time on a CPU:

1. :class:`FusedLoraLinear` adds the scaled adapter product inside the matmul
   (``addmm(W0 x, A x, B^T, alpha=s)``), casting ``x`` once under bf16 autocast.
2. :func:`stack_projections` (bf16-held device models): ``A`` is frozen (only B trains in
   the default mode), so each layer's ``A`` can sit under its ``W0`` in one matrix, and the
   layers that read the same input share it. In a Llama decoder layer:

       attention  [W_q; W_k; W_v; A_q; A_k; A_v]   (576 + 192 + 192 + 3r, 576) for SmolLM2
       MLP        [W_gate; W_up; A_gate; A_up]      (2 * 1536 + 2r, 576)
       o, down    [W; A]                            one layer each

   One matmul then gives every ``W0 x`` and ``A x`` of the group, and the backward pass one
   ``dx`` matmul instead of one per weight plus the sums. The rank-r matmuls on their own
   ran at 30-100 GFLOP/s against 330-380 for the projections. The layers' ``W0`` become
   row views of the stacked matrix (no second copy); ``A``'s rows are copied in again
   whenever ``A`` changes (:func:`set_adapter <edgetune.adapters.lora.set_adapter>`).

Compiled decoder layers (``train.compile``) use the stacks too: :func:`prepare_stacks` checks
them eagerly first, since a compiled graph cannot. Anything else (merged, disabled, several
adapters, DoRA, binary factors, a bias, a trained A, a quantised base, a deep copy of the
model) takes each layer's own forward, and where that is not plain LoRA, PEFT's.
docs/performance.md has the measurements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Unpack

import torch
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import Tensor, nn
from torch.nn import functional as F
from transformers.models.llama import modeling_llama

__all__ = ["FusedLoraLinear", "fuse_lora_forward", "prepare_stacks", "stack_projections"]


class FusedLoraLinear(PeftLoraLinear):
    """PEFT's LoRA Linear whose plain forward, ``W0 x + s B (A x)``, takes fewer passes.

    PEFT computes ``result + lora_B(lora_A(x)) * s``: under bf16 autocast it casts ``x`` to
    bf16 twice (once for ``W0``, once for ``A``), then multiplies the adapter's output by ``s``
    and adds it, two more passes over the layer's output, each with its own backward. Here
    ``x`` is cast once (when the base weight is held in bf16, the cast ``W0 x`` makes anyway)
    and ``torch.addmm(W0 x, A x, B^T, alpha=s)`` adds the scaled adapter product inside the
    matmul. The same values up to rounding (the sum is rounded once, not three times). Any
    other case (merged, disabled, several adapters, DoRA, binary factors, a bias on B)
    takes PEFT's forward. A layer of a stack (:func:`stack_projections`) reads ``W0`` and
    ``A`` from the stacked matrix.
    """

    _stack: _Stack | None = None

    def plain_factors(self) -> tuple[nn.Linear, nn.Linear, float] | None:
        """The one active adapter's ``A``, ``B`` and scale, if it is plain LoRA (else None)."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant or not isinstance(self.lora_dropout[name], nn.Identity):
            return None
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_b.bias is not None:
            return None  # binary factors, a bias on B
        return lora_a, lora_b, self.scaling[name]

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        stack = None if args or kwargs else self._stack
        stacked = None if stack is None else stack.factors((self,))
        if stack is not None and stacked is not None:
            return stack.project(x, stacked)[0]
        plain = None if args or kwargs else self.plain_factors()
        if plain is None:
            return super().forward(x, *args, **kwargs)
        lora_a, lora_b, scale = plain
        held = self.get_base_layer().weight.dtype
        if torch.is_autocast_enabled("cpu") and held == torch.get_autocast_dtype("cpu"):
            x = x.to(held)  # what W0 x casts to; A x then reuses it
        return _add_adapter(self.base_layer(x), F.linear(x, lora_a.weight), lora_b.weight, scale)


def _add_adapter(result: Tensor, hidden: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """``result + scale * hidden @ B^T`` in one ``addmm``; ``(..., out)``, ``(..., r)``, B ``(out, r)``.

    ``result`` may be a column slice of a wider matrix (its rows flatten to a view)."""
    flat = torch.addmm(
        result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), lora_b.t(), alpha=scale
    )
    return flat.view(result.shape)


def fuse_lora_forward(model: nn.Module, fused: bool = True) -> int:
    """Give every plain PEFT LoRA Linear of ``model`` :class:`FusedLoraLinear`'s forward, or
    PEFT's own back (``fused=False``), in place (the module keeps its parameters, names and
    state dict). Returns how many layers changed."""
    old, new = (PeftLoraLinear, FusedLoraLinear) if fused else (FusedLoraLinear, PeftLoraLinear)
    changed = 0
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
            changed += 1
    return changed


@dataclass
class _Stack:
    """``[W0_1; ...; W0_n; A_1; ...; A_n]`` of layers that read the same input, ``(sum out + n r, in)``,
    in the base weights' dtype; the layers' ``W0`` are row views of it."""

    weight: Tensor
    a_seen: list[tuple[int, int]]
    """``(id, version)`` of each ``A`` when its rows were last copied in."""
    views_intact: bool = True
    """The layers' ``W0`` were still its views when :meth:`factors` last looked eagerly."""

    def __deepcopy__(self, memo: dict[int, Any]) -> None:
        """A deep copy of the model clones each parameter apart: the copy's layers take their
        own forward, and no second stack is kept."""
        return None

    def factors(self, layers: Sequence[nn.Module]) -> list[tuple[nn.Linear, nn.Linear, float]] | None:
        """``layers``' plain LoRA factors if the stack still stands for their forward (all plain
        LoRA with a frozen ``A``, their ``W0`` still its views: nothing replaced them), else None.

        A graph being compiled cannot read storages: it takes the views as the last eager
        call found them (:func:`prepare_stacks` makes one before compiled steps)."""
        factors, bases = [], []
        for layer in layers:
            if not isinstance(layer, FusedLoraLinear):
                return None
            plain = layer.plain_factors()
            if plain is None or plain[0].weight.requires_grad:  # a trained A needs its own gradient
                return None
            factors.append(plain)
            bases.append(_base_linear(layer).weight)
        if not torch.compiler.is_compiling():
            self.views_intact = self._views_intact(bases)
        return factors if self.views_intact else None

    def _views_intact(self, bases: list[Tensor]) -> bool:
        row = 0
        for base in bases:
            if base.untyped_storage().data_ptr() != self.weight.untyped_storage().data_ptr():
                return False
            if base.storage_offset() != self.weight.storage_offset() + row * self.weight.shape[1]:
                return False
            row += base.shape[0]
        return True

    def project(self, x: Tensor, factors: list[tuple[nn.Linear, nn.Linear, float]]) -> list[Tensor]:
        """Each layer's ``W0 x + s B (A x)`` from one matmul with the stack; ``factors`` from
        :meth:`factors`. ``x``: ``(..., in)``."""
        if not torch.compiler.is_compiling():  # compiled graphs take A's rows as prepare_stacks left them
            self._copy_a_rows(factors)
        if torch.is_autocast_enabled("cpu") and self.weight.dtype == torch.get_autocast_dtype("cpu"):
            x = x.to(self.weight.dtype)
        outs = [b.out_features for _, b, _ in factors]
        ranks = [a.out_features for a, _, _ in factors]
        pieces = F.linear(x, self.weight).split(outs + ranks, dim=-1)  # one backward: a cat
        n = len(factors)
        return [_add_adapter(pieces[i], pieces[n + i], b.weight, s) for i, (_, b, s) in enumerate(factors)]

    @torch.no_grad()
    def _copy_a_rows(self, factors: list[tuple[nn.Linear, nn.Linear, float]]) -> None:
        """Copy each ``A`` (from :meth:`factors`) into its rows, unless none changed since."""
        a_weights = [a.weight for a, _, _ in factors]
        seen = _versions(a_weights)
        if seen == self.a_seen:
            return
        row = self.weight.shape[0] - sum(a.shape[0] for a in a_weights)
        for a in a_weights:
            self.weight[row : row + a.shape[0]].copy_(a)
            row += a.shape[0]
        self.a_seen = seen


def _stack(layers: Sequence[nn.Module]) -> _Stack | None:
    """Stack ``layers``' frozen ``W0`` and ``A`` (see :class:`_Stack`), making each ``W0`` a view
    of it; None (nothing changed) unless every layer is plain LoRA with a frozen ``A``, an
    unquantised ``W0`` without bias, all of one dtype and input width."""
    from edgetune.quantize import is_quantized

    lora_layers = [layer for layer in layers if isinstance(layer, FusedLoraLinear)]
    factors = [f for layer in lora_layers if (f := layer.plain_factors()) is not None]
    if len(factors) != len(layers) or any(a.weight.requires_grad for a, _, _ in factors):
        return None
    bases = [_base_linear(layer) for layer in lora_layers]
    weights = [b.weight for b in bases]
    if any(b.bias is not None or is_quantized(w) or w.requires_grad for b, w in zip(bases, weights, strict=True)):
        return None
    if len({(w.dtype, w.shape[1]) for w in weights}) != 1:
        return None
    stacked_dtype = weights[0].dtype
    a_weights = [a.weight for a, _, _ in factors]
    stacked = torch.cat([w.detach() for w in weights] + [a.detach().to(stacked_dtype) for a in a_weights])
    row = 0
    for base, w in zip(bases, weights, strict=True):
        base.weight = nn.Parameter(stacked[row : row + w.shape[0]], requires_grad=False)
        row += w.shape[0]
    return _Stack(stacked, _versions(a_weights))


def _versions(a_weights: list[Tensor]) -> list[tuple[int, int]]:
    """``(id, version)`` of each ``A``: what changes when ``A`` is replaced or written in place."""
    return [(id(a), a._version) for a in a_weights]


def _base_linear(layer: FusedLoraLinear) -> nn.Linear:
    base = layer.get_base_layer()
    assert isinstance(base, nn.Linear)  # PEFT's lora.Linear wraps one
    return base


def _project(stack: _Stack | None, x: Tensor, layers: Sequence[nn.Module]) -> list[Tensor]:
    """``layers``' outputs on ``x``: from the stack where it stands, else each layer's own forward."""
    factors = None if stack is None else stack.factors(layers)
    if stack is None or factors is None:
        return [layer(x) for layer in layers]
    return stack.project(x, factors)


class StackedLlamaAttention(modeling_llama.LlamaAttention):
    """Llama attention whose q, k and v projections are one matmul (:func:`stack_projections`).

    ``forward`` is transformers' (5.23) with the three projections read from the stack; a
    test holds it to the original's loss and gradients.
    """

    _stack: _Stack | None = None

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: modeling_llama.Cache | None = None,
        **kwargs: Unpack[modeling_llama.TransformersKwargs],
    ) -> tuple[Tensor, Tensor]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = _project(self._stack, hidden_states, (self.q_proj, self.k_proj, self.v_proj))
        query_states = q.view(hidden_shape).transpose(1, 2)
        key_states = k.view(hidden_shape).transpose(1, 2)
        value_states = v.view(hidden_shape).transpose(1, 2)
        assert position_embeddings is not None  # the decoder passes them to every layer
        cos, sin = position_embeddings
        query_states, key_states = modeling_llama.apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        attention_interface = modeling_llama.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, modeling_llama.eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class StackedLlamaMLP(modeling_llama.LlamaMLP):
    """Llama's MLP, ``down(silu(gate x) * up x)``, with gate and up as one matmul."""

    _stack: _Stack | None = None

    def forward(self, x: Tensor) -> Tensor:
        gate, up = _project(self._stack, x, (self.gate_proj, self.up_proj))
        return self.down_proj(self.act_fn(gate) * up)


_STACKED: dict[type[nn.Module], tuple[type[nn.Module], tuple[str, ...], str]] = {
    modeling_llama.LlamaAttention: (StackedLlamaAttention, ("q_proj", "k_proj", "v_proj"), "o_proj"),
    modeling_llama.LlamaMLP: (StackedLlamaMLP, ("gate_proj", "up_proj"), "down_proj"),
}
"""A decoder block -> its stacked class, the projections that read its input, the one that reads
their result."""


def stack_projections(model: nn.Module) -> int:
    """Stack the frozen weights of ``model``'s plain LoRA layers (see the module docstring), in
    place: per Llama decoder layer q/k/v, gate/up, and o and down on their own. For a model
    whose base weights are held apart from any file (``hold_frozen_in_bf16``): the stacks are
    new memory and the old weights are dropped. Returns how many stacks were made."""
    made = 0
    for module in list(model.modules()):
        if type(module) not in _STACKED:
            continue
        stacked_cls, group, last = _STACKED[type(module)]
        stack = _stack([getattr(module, name) for name in group])
        if stack is not None:
            module.__class__ = stacked_cls
            vars(module)["_stack"] = stack  # a plain attribute: not a parameter, buffer or submodule
            made += 1
        single = getattr(module, last)
        stack = _stack([single])
        if stack is not None:
            vars(single)["_stack"] = stack
            made += 1
    return made


def prepare_stacks(model: nn.Module) -> None:
    """Check every stack of ``model`` and copy ``A``'s rows in, eagerly, before compiled steps:
    a compiled graph can do neither, and takes the stacks as this left them (``A`` is frozen
    while the steps run)."""
    groups = {stacked_cls: group for stacked_cls, group, _ in _STACKED.values()}
    for module in model.modules():
        stack = vars(module).get("_stack")
        if not isinstance(stack, _Stack):
            continue
        group = groups.get(type(module))  # a stacked block's projections, else the one layer itself
        layers = [getattr(module, name) for name in group] if group else [module]
        factors = stack.factors(layers)
        if factors is not None:
            stack._copy_a_rows(factors)
