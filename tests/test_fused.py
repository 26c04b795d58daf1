"""Tests for adapters/fused.py: the fused LoRA forward against PEFT's, and the stacked
projections of a bf16 device model against each layer's own forward."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import Tensor

from edgetune.adapters.fused import (
    FusedLoraLinear,
    StackedLlamaAttention,
    StackedLlamaMLP,
    fuse_lora_forward,
    stack_projections,
)
from edgetune.adapters.lora import attach_lora, get_adapter, init_adapter, model_adapter_shapes, set_adapter
from edgetune.config import LoraConfig
from edgetune.models import tiny_llama
from edgetune.precision import hold_frozen_in_bf16

TARGETS = 7 * 2  # projections x layers of the tiny Llama
STACKS = 4 * 2  # q/k/v, o, gate/up and down x layers


def _random_state(model, seed: int, scale: float = 0.1) -> dict[str, Tensor]:
    """A random full adapter for ``model`` (A and B), B != 0 so that the adapter path counts."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen) * scale for k, shape in model_adapter_shapes(model).items()}


def _loss_and_b_grads(model, ids: Tensor, precision: str) -> tuple[Tensor, dict[str, Tensor]]:
    model.zero_grad(set_to_none=True)
    if precision == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_fused_lora_forward_gives_peft_s_loss_and_gradients(tiny_tokenizer, lora_cfg, precision: str) -> None:
    from edgetune.precision import hold_frozen_in_bf16

    models = []
    for fused in (False, True):
        model = attach_lora(tiny_llama(len(tiny_tokenizer)), lora_cfg)
        set_adapter(model, _random_state(model, seed=3))  # B != 0: the adapter path counts
        if precision == "bf16":
            hold_frozen_in_bf16(model)  # as a bf16 device model: x is cast once for W0 and A
        if fused:
            assert fuse_lora_forward(model) == TARGETS
        models.append(model)
    assert sum(isinstance(m, FusedLoraLinear) for m in models[1].modules()) == TARGETS
    assert not any(isinstance(m, FusedLoraLinear) for m in models[0].modules())
    ids = torch.randint(0, len(tiny_tokenizer), (3, 16), generator=torch.Generator().manual_seed(4))
    (loss_peft, grads_peft), (loss_fused, grads_fused) = (_loss_and_b_grads(m, ids, precision) for m in models)
    # fp32: the same sums in another order; bf16: PEFT rounds the adapter's output, its
    # scaled copy and the sum to bf16 (three roundings), the fused matmul rounds once.
    tol = {"fp32": (1e-5, 1e-6), "bf16": (2e-2, 2e-3)}[precision]
    torch.testing.assert_close(loss_fused, loss_peft, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(grads_fused, grads_peft, rtol=tol[0] * 5, atol=tol[1] * 5)
    assert get_adapter(models[1]).keys() == get_adapter(models[0]).keys()  # names unchanged


def test_the_fused_forward_leaves_merged_disabled_dora_and_binary_layers_to_peft(tiny_tokenizer, lora_cfg) -> None:
    ids = torch.randint(0, len(tiny_tokenizer), (2, 10), generator=torch.Generator().manual_seed(5))
    for kind in ("dora", "binary"):
        cfg = dataclasses.replace(lora_cfg, kind=kind)
        plain = attach_lora(tiny_llama(len(tiny_tokenizer)), cfg)
        fused = attach_lora(tiny_llama(len(tiny_tokenizer)), cfg)
        state = _random_state(plain, seed=7)
        set_adapter(plain, state)
        set_adapter(fused, state)
        assert fuse_lora_forward(fused) == TARGETS  # fused class, PEFT's forward
        with torch.no_grad():
            torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    model = attach_lora(tiny_llama(len(tiny_tokenizer)), lora_cfg)
    set_adapter(model, _random_state(model, seed=6))
    fuse_lora_forward(model)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(base, tiny_llama(len(tiny_tokenizer))(input_ids=ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def _device_models(tokenizer, lora: LoraConfig, precision: str, seed: int = 3) -> tuple:
    """Two tiny device models with the same random adapter: each layer's own forward, and stacked."""
    models = []
    for stacked in (False, True):
        model = attach_lora(tiny_llama(len(tokenizer)), lora)
        set_adapter(model, _random_state(model, seed))
        if precision == "bf16":
            hold_frozen_in_bf16(model)
        fuse_lora_forward(model)
        if stacked:
            assert stack_projections(model) == STACKS
        models.append(model)
    return tuple(models)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_stacked_projections_give_each_layer_s_loss_and_gradients(tiny_tokenizer, lora_cfg, precision: str) -> None:
    per_layer, stacked = _device_models(tiny_tokenizer, lora_cfg, precision)
    layer = stacked.base_model.model.model.layers[0]
    assert type(layer.self_attn) is StackedLlamaAttention and type(layer.mlp) is StackedLlamaMLP
    stack = layer.self_attn._stack.weight  # (q + k + v + 3 r, hidden), W0 rows first
    q, k, v = (getattr(layer.self_attn, p).base_layer.weight for p in ("q_proj", "k_proj", "v_proj"))
    assert stack.shape[0] == q.shape[0] + k.shape[0] + v.shape[0] + 3 * lora_cfg.rank
    assert all(w.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr() for w in (q, k, v))  # views
    torch.testing.assert_close(stack[-lora_cfg.rank :], layer.self_attn.v_proj.lora_A["default"].weight.to(stack.dtype))
    ids = torch.randint(0, len(tiny_tokenizer), (3, 16), generator=torch.Generator().manual_seed(4))
    (loss, grads), (loss_stacked, grads_stacked) = (_loss_and_b_grads(m, ids, precision) for m in (per_layer, stacked))
    tol = {"fp32": (1e-5, 1e-6), "bf16": (2e-2, 2e-3)}[precision]  # the same dot products, summed in another order
    torch.testing.assert_close(loss_stacked, loss, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(grads_stacked, grads, rtol=tol[0] * 5, atol=tol[1] * 5)
    assert get_adapter(stacked).keys() == get_adapter(per_layer).keys()  # names and state dict unchanged


def test_a_new_a_reaches_the_stacked_matmul(tiny_tokenizer, lora_cfg) -> None:
    per_layer, stacked = _device_models(tiny_tokenizer, lora_cfg, "fp32")
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = stacked(input_ids=ids).logits
        state = _random_state(stacked, seed=9)  # another A as well as another B
        for model in (per_layer, stacked):
            set_adapter(model, state)
        after, expected = stacked(input_ids=ids).logits, per_layer(input_ids=ids).logits
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)


def test_disabled_merged_and_copied_models_take_each_layer_s_forward(tiny_tokenizer, lora_cfg) -> None:
    _, stacked = _device_models(tiny_tokenizer, lora_cfg, "fp32")
    ids = torch.randint(0, len(tiny_tokenizer), (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        adapted = stacked(input_ids=ids).logits
        copied = copy.deepcopy(stacked)
        assert copied.base_model.model.model.layers[0].self_attn._stack is None  # no second stack kept
        torch.testing.assert_close(copied(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-6)
        with stacked.disable_adapter():
            base = stacked(input_ids=ids).logits
        torch.testing.assert_close(base, tiny_llama(len(tiny_tokenizer))(input_ids=ids).logits, rtol=0, atol=0)
        stacked.merge_adapter()  # W0 += s B A, in place: the stack's rows change with it
        merged = stacked(input_ids=ids).logits
        stacked.unmerge_adapter()
        unmerged = stacked(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unmerged, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, base)


@pytest.mark.parametrize("change", [{"train_a": True}, {"kind": "dora"}, {"kind": "binary"}])
def test_a_trained_a_dora_and_binary_factors_are_not_stacked(tiny_tokenizer, lora_cfg, change) -> None:
    model = attach_lora(tiny_llama(len(tiny_tokenizer)), dataclasses.replace(lora_cfg, **change))
    fuse_lora_forward(model)
    assert stack_projections(model) == 0
    assert not any(isinstance(m, (StackedLlamaAttention, StackedLlamaMLP)) for m in model.modules())


def test_compiled_training_of_a_stacked_model_matches_eager(tiny_tokenizer, lora_cfg, monkeypatch) -> None:
    """Two rounds, each from a new adapter (a new A): the compiled layers multiply by the
    stacks, with the new A's rows in them, and train as the eager ones do."""
    from edgetune.adapters import fused
    from edgetune.chat import iterate_batches
    from edgetune.client.train import train_local
    from edgetune.config import DataConfig, TrainConfig
    from edgetune.datasets.devices import tokenized_device
    from edgetune.lm import pad_id

    compiled_projects = []
    project = fused._Stack.project

    def noted_project(self, x, factors):
        if torch.compiler.is_compiling():
            compiled_projects.append(len(factors))  # traced in: runs with every compiled call
        return project(self, x, factors)

    monkeypatch.setattr(fused._Stack, "project", noted_project)
    torch._dynamo.reset()
    data = tokenized_device(DataConfig(max_length=128), "", 0, 4, 0, tiny_tokenizer)
    stats, trained, projects = [], [], []
    for mode in ("off", "on"):
        _, stacked = _device_models(tiny_tokenizer, lora_cfg, "fp32")
        for seed in (0, 1):
            set_adapter(stacked, init_adapter(model_adapter_shapes(stacked), seed=seed))
            batches = iterate_batches(data.train, 2, 3, 0, pad_id(tiny_tokenizer))
            stats.append(train_local(stacked, batches, TrainConfig(local_steps=3, batch_size=2, compile=mode)))
            trained.append({n: p.detach().clone() for n, p in stacked.named_parameters() if p.requires_grad})
        projects.append(len(compiled_projects))
    assert projects[0] == 0 and projects[1] > 0
    for eager, compiled in zip(range(2), range(2, 4), strict=True):
        assert stats[compiled].loss == pytest.approx(stats[eager].loss, rel=1e-4)
        torch.testing.assert_close(trained[compiled], trained[eager], rtol=1e-3, atol=1e-5)
