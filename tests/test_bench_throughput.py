"""bench_throughput's replay of a step's own matmuls: the most a step of those shapes can reach."""

from __future__ import annotations

import pytest
import torch

from edgetune.adapters.fused import fuse_lora_forward, stack_projections
from edgetune.adapters.lora import attach_lora
from edgetune.chat import iterate_batches, pack_rows
from edgetune.config import DataConfig
from edgetune.datasets.devices import tokenized_device
from edgetune.lm import pad_id
from edgetune.models import tiny_llama
from edgetune.precision import hold_frozen_in_bf16
from edgetune.simulations.bench_throughput import MatmulReplay, step_flops


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_replay_runs_every_matmul_of_the_steps_and_only_those(tiny_tokenizer, lora_cfg, precision: str) -> None:
    model = attach_lora(tiny_llama(len(tiny_tokenizer)), lora_cfg)
    if precision == "bf16":
        hold_frozen_in_bf16(model)
    fuse_lora_forward(model)
    stack_projections(model)
    data = tokenized_device(DataConfig(max_length=128), "", 0, 4, 0, tiny_tokenizer)
    batches = [pack_rows(b) for b in iterate_batches(data.train, 2, 2, 0, pad_id(tiny_tokenizer))]
    flops = sum(step_flops(model.train(), b, precision) for b in batches)

    replay = MatmulReplay(model, batches, precision)

    assert replay.flops == flops > 0  # forward and backward, as the FLOP counter counts a step
    dtypes = {a.dtype for _, args in replay.calls for a in args if isinstance(a, torch.Tensor)}
    assert torch.bfloat16 in dtypes if precision == "bf16" else dtypes == {torch.float32}  # below autocast
    assert replay.run() > 0
    kinds = replay.by_kind()
    assert (
        {"projections", "rank-4 adapter", "LM head"}
        <= set(kinds)
        <= {"projections", "rank-4 adapter", "LM head", "attention"}
    )
    assert sum(f for _, f in kinds.values()) == flops  # every matmul in exactly one kind
    assert all(t > 0 for t, _ in kinds.values())
