"""Tests for adapters/lora.py: which factors train, the shared-seed initial adapter, meta-device
shapes, adapter get/set, and the exactness of FedAvg over B deltas checked against PEFT's merge."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor

from edgetune.adapters.delta import add, weighted_mean
from edgetune.adapters.lora import (
    adapter_shapes,
    attach_lora,
    exchanged_names,
    get_adapter,
    init_adapter,
    set_adapter,
)
from edgetune.config import LoraConfig
from edgetune.models import tiny_llama

TARGETS = 7 * 2  # projections x layers of the tiny Llama


def test_attach_lora_trains_only_b_by_default(tiny_model, lora_cfg: LoraConfig) -> None:
    model = attach_lora(tiny_model, lora_cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == TARGETS
    assert all(".lora_B." in n for n in trainable)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)


def test_attach_lora_trains_a_and_b_in_both_factor_mode(tiny_model, lora_cfg: LoraConfig) -> None:
    model = attach_lora(tiny_model, dataclasses.replace(lora_cfg, train_a=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * TARGETS
    assert sum(".lora_A." in n for n in trainable) == TARGETS
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_attach_lora_rejects_unknown_targets(tiny_model) -> None:
    with pytest.raises(ValueError, match="lora.targets=nonexistent_proj"):
        attach_lora(tiny_model, LoraConfig(rank=4, targets=("nonexistent_proj",)))


def test_attach_lora_on_a_subset_of_targets(tiny_model) -> None:
    model = attach_lora(tiny_model, LoraConfig(rank=2, targets=("q_proj", "v_proj")))
    names = sorted(get_adapter(model))
    assert len(names) == 2 * 2 * 2  # A and B, two projections, two layers
    assert all(".q_proj." in n or ".v_proj." in n for n in names)


def test_init_adapter_is_deterministic_per_seed(tiny_shapes: dict[str, tuple[int, ...]]) -> None:
    a, b, c = init_adapter(tiny_shapes, 0), init_adapter(tiny_shapes, 0), init_adapter(tiny_shapes, 1)
    assert a.keys() == tiny_shapes.keys()
    for k, shape in tiny_shapes.items():
        assert tuple(a[k].shape) == shape and a[k].dtype == torch.float32
        assert torch.equal(a[k], b[k])
        if ".lora_A." in k:
            assert not torch.equal(a[k], c[k])


def test_init_adapter_b_is_zero_and_a_is_bounded(tiny_shapes: dict[str, tuple[int, ...]]) -> None:
    state = init_adapter(tiny_shapes, 3)
    for k, v in state.items():
        if ".lora_B." in k:
            assert torch.count_nonzero(v) == 0
        else:
            bound = 1 / math.sqrt(v.shape[1])  # A: (rank, in)
            assert float(v.abs().max()) <= bound
            assert float(v.abs().max()) > 0.8 * bound  # spread over the whole interval
            assert abs(float(v.mean())) < 0.3 * bound


def test_init_adapter_does_not_depend_on_the_global_rng(tiny_shapes: dict[str, tuple[int, ...]]) -> None:
    torch.manual_seed(123)
    a = init_adapter(tiny_shapes, 5)
    torch.manual_seed(456)
    b = init_adapter(tiny_shapes, 5)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_model_skeleton_shapes_match_the_real_tiny_model(
    tiny_model, lora_cfg: LoraConfig, tiny_shapes: dict[str, tuple[int, ...]]
) -> None:
    assert adapter_shapes(tiny_model, lora_cfg) == tiny_shapes
    # By hand: q_proj (64 -> 64), k_proj (64 -> 32 with 2 KV heads), down_proj (128 -> 64).
    prefix = "base_model.model.model.layers.1."
    assert tiny_shapes[prefix + "self_attn.q_proj.lora_A.weight"] == (4, 64)
    assert tiny_shapes[prefix + "self_attn.k_proj.lora_B.weight"] == (32, 4)
    assert tiny_shapes[prefix + "mlp.down_proj.lora_A.weight"] == (4, 128)
    assert tiny_shapes[prefix + "mlp.down_proj.lora_B.weight"] == (64, 4)
    assert len(tiny_shapes) == 2 * TARGETS


def test_exchanged_names(tiny_shapes: dict[str, tuple[int, ...]], lora_cfg: LoraConfig) -> None:
    b_only = exchanged_names(tiny_shapes, lora_cfg)
    both = exchanged_names(tiny_shapes, dataclasses.replace(lora_cfg, train_a=True))
    assert b_only == sorted(k for k in tiny_shapes if ".lora_B." in k)
    assert both == sorted(tiny_shapes)


def test_get_and_set_adapter_round_trip(tiny_model, lora_cfg: LoraConfig, tiny_shapes) -> None:
    model = attach_lora(tiny_model, lora_cfg)
    state = _random_state(tiny_shapes, seed=1)
    set_adapter(model, state)
    got = get_adapter(model)
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)
    got[next(iter(got))].add_(1.0)  # a copy: editing it leaves the model alone
    assert all(torch.equal(get_adapter(model)[k], state[k]) for k in state)


def test_set_adapter_rejects_missing_and_unexpected_tensors(tiny_model, lora_cfg: LoraConfig, tiny_shapes) -> None:
    model = attach_lora(tiny_model, lora_cfg)
    state = init_adapter(tiny_shapes, 0)
    missing = dict(state)
    name = sorted(missing)[0]
    del missing[name]
    with pytest.raises(KeyError, match="lacks 1 tensors"):
        set_adapter(model, missing)
    with pytest.raises(KeyError, match="lacks"):
        set_adapter(model, {})
    extra = {**state, name.replace(".layers.0.", ".layers.7."): state[name]}
    with pytest.raises(KeyError, match="model lacks.*layers.7"):
        set_adapter(model, extra)


# --- exactness of FedAvg over B deltas, checked against PEFT's merge --------------------


def _random_state(shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 0.1) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * scale for k, s in sorted(shapes.items())}


def _merged_weights(vocab: int, lora: LoraConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Target-layer weights of a fresh tiny Llama after PEFT's merge_and_unload of ``state``."""
    model = attach_lora(tiny_llama(vocab), lora)
    set_adapter(model, state)
    merged = model.merge_and_unload()
    return {n: p.detach().clone() for n, p in merged.named_parameters() if n.endswith("proj.weight")}


def _device_deltas(shapes, lora: LoraConfig, n: int) -> list[dict[str, Tensor]]:
    names = exchanged_names(shapes, lora)
    return [{k: v for k, v in _random_state(shapes, seed=10 + i).items() if k in names} for i in range(n)]


def _merge_gap(shapes, lora: LoraConfig, vocab: int) -> tuple[float, float]:
    """(max |W(global) - mean_i W(local_i)|, max |mean_i W(local_i) - W0|) over target layers."""
    base = init_adapter(shapes, seed=0)
    deltas, weights = _device_deltas(shapes, lora, 3), [1.0, 2.0, 5.0]
    locals_ = [{**base, **add({k: base[k] for k in d}, d)} for d in deltas]
    merged_locals = [_merged_weights(vocab, lora, s) for s in locals_]
    mean_local = weighted_mean(merged_locals, weights)
    mean_delta = weighted_mean(deltas, weights)
    global_ = {**base, **add({k: base[k] for k in mean_delta}, mean_delta)}
    merged_global = _merged_weights(vocab, lora, global_)
    w0 = {n: p.detach() for n, p in tiny_llama(vocab).named_parameters() if n in mean_local}
    gap = max(float((merged_global[k] - mean_local[k]).abs().max()) for k in mean_local)
    size = max(float((mean_local[k] - w0[k]).abs().max()) for k in mean_local)
    return gap, size


def test_fedavg_of_b_deltas_equals_mean_of_merged_weights(tiny_shapes, lora_cfg: LoraConfig, tiny_tokenizer) -> None:
    gap, size = _merge_gap(tiny_shapes, lora_cfg, len(tiny_tokenizer))
    assert size > 1e-2  # the devices really moved the weights
    assert gap < 1e-6


def test_fedavg_of_both_factors_is_not_the_mean_of_merged_weights(
    tiny_shapes, lora_cfg: LoraConfig, tiny_tokenizer
) -> None:
    gap, size = _merge_gap(tiny_shapes, dataclasses.replace(lora_cfg, train_a=True), len(tiny_tokenizer))
    assert gap > 1e-2 * size


def test_peft_merge_is_w0_plus_scaled_b_a(tiny_shapes, lora_cfg: LoraConfig, tiny_tokenizer) -> None:
    vocab = len(tiny_tokenizer)
    state = _random_state(tiny_shapes, seed=2)
    merged = _merged_weights(vocab, lora_cfg, state)
    w0 = {n: p.detach() for n, p in tiny_llama(vocab).named_parameters()}
    s = lora_cfg.alpha / lora_cfg.rank  # 16 / 4 = 4
    for a_key in (k for k in state if ".lora_A." in k):
        module = a_key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = state[a_key.replace(".lora_A.", ".lora_B.")]
        expected = w0[module + ".weight"] + s * b @ state[a_key]
        torch.testing.assert_close(merged[module + ".weight"], expected, rtol=0, atol=1e-6)
