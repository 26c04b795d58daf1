"""Local training's gradient clipping (``train.max-grad-norm``)."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from edgetune.adapters.lora import attach_lora
from edgetune.chat import iterate_batches
from edgetune.client.train import train_local
from edgetune.config import ConfigError, DataConfig, TrainConfig
from edgetune.datasets.devices import tokenized_device
from edgetune.lm import pad_id
from edgetune.models import tiny_llama


def _gradient_norms_at_each_step(tokenizer, lora_cfg, max_grad_norm: float) -> list[float]:
    """The adapter gradient's L2 norm as AdamW's step sees it, for each of 3 local steps."""
    model = attach_lora(tiny_llama(len(tokenizer)), lora_cfg)
    data = tokenized_device(DataConfig(max_length=128), "", 0, 4, 0, tokenizer)
    batches = iterate_batches(data.train, 2, 3, 0, pad_id(tokenizer))
    norms: list[float] = []

    def note(optimizer, args, kwargs) -> None:  # type: ignore[no-untyped-def]
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    hook = register_optimizer_step_pre_hook(note)
    try:
        train_local(model, batches, TrainConfig(local_steps=3, batch_size=2, max_grad_norm=max_grad_norm))
    finally:
        hook.remove()
    return norms


def test_the_local_steps_clip_the_adapter_gradient_to_max_grad_norm(tiny_tokenizer, lora_cfg) -> None:
    unclipped = _gradient_norms_at_each_step(tiny_tokenizer, lora_cfg, 0.0)
    bound = min(unclipped) / 2
    clipped = _gradient_norms_at_each_step(tiny_tokenizer, lora_cfg, bound)
    assert len(clipped) == len(unclipped) == 3
    assert clipped[0] == pytest.approx(bound, rel=1e-4)  # the same first gradient, scaled down to the bound
    assert all(n <= bound * (1 + 1e-4) for n in clipped)


def test_a_negative_max_grad_norm_is_refused() -> None:
    with pytest.raises(ConfigError, match="train.max-grad-norm"):
        TrainConfig(max_grad_norm=-1.0)


def test_clipping_is_refused_where_onnx_runtime_trains() -> None:
    with pytest.raises(ConfigError, match="train.engine=pytorch only"):
        TrainConfig(max_grad_norm=1.0, ort_devices=("0",))
