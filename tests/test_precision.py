"""Tests for edgetune/precision.py: ``train.precision=auto`` follows the CPU's bf16 units;
an explicit choice wins; devices resolve it where they parse the run config."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from edgetune.config import ConfigError, RunConfig, TrainConfig, from_flat
from edgetune.precision import (
    cpu_flags,
    hold_frozen_in_bf16,
    matmul_gflops,
    resolve_precision,
    resolve_run,
    resolved_for_this_cpu,
)

X86 = frozenset({"sse2", "avx", "avx2", "avx512f"})


@pytest.mark.parametrize(
    ("flags", "expect", "reason"),
    [
        (X86 | {"avx512_bf16"}, "bf16", "avx512_bf16"),
        (X86 | {"amx_bf16", "amx_tile"}, "bf16", "amx_bf16"),
        (X86 | {"amx_bf16", "avx512_bf16"}, "bf16", "amx_bf16+avx512_bf16"),
        (X86, "fp32", "no bf16 units"),  # AVX-512 alone: bf16 matmuls are emulated and slow
    ],
)
def test_auto_follows_the_bf16_matrix_units(flags: frozenset[str], expect: str, reason: str) -> None:
    assert resolve_precision("auto", flags) == resolve_precision("auto", flags)
    resolved = resolve_precision("auto", flags)
    assert (resolved.precision, resolved.reason) == (expect, reason)
    assert resolved.describe("auto") == f"{expect} (auto: {reason})"


@pytest.mark.parametrize("explicit", ["bf16", "fp32"])
def test_an_explicit_choice_wins_on_any_cpu(explicit: str) -> None:
    for flags in (X86, X86 | {"amx_bf16"}, frozenset()):
        assert resolve_precision(explicit, flags).precision == explicit
    assert resolve_precision(explicit, X86).describe(explicit) == explicit


def test_without_flags_a_sub_second_measurement_decides() -> None:
    start = time.perf_counter()
    resolved = resolve_precision("auto", frozenset())  # another OS or architecture
    assert time.perf_counter() - start < 1.0
    assert resolved.precision in ("bf16", "fp32") and resolved.reason.startswith("measured bf16/fp32 matmul")
    assert matmul_gflops(torch.float32, n=64, seconds=0.01) > 0


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(x86) == {"fpu", "sse2", "avx512_bf16"}  # the first processor's
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_resolve_run_is_the_default_and_keeps_explicit_configs() -> None:
    cfg = RunConfig()
    assert cfg.train.precision == "auto"
    resolved = resolve_run(cfg)
    assert resolved.train.precision == resolved_for_this_cpu("auto").precision in ("bf16", "fp32")
    assert resolved.train.local_steps == cfg.train.local_steps and resolved.lora == cfg.lora
    explicit = RunConfig(train=TrainConfig(precision="fp32", checkpointing="off"))
    assert resolve_run(explicit) is explicit
    # train.checkpointing=auto: on for a quantised base (a mode for devices short of memory)
    assert resolved.train.checkpointing == "off"
    assert resolve_run(from_flat({"model.quantize": "int8"})).train.checkpointing == "on"
    assert resolve_run(from_flat({"model.quantize": "int8", "train.checkpointing": "off"})).train.checkpointing == "off"
    with pytest.raises(ConfigError, match="train.precision='fp16'"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="expected auto, bf16 or fp32"):
        resolve_precision("fp16")


def test_a_bf16_base_gives_the_same_loss_and_gradients_as_autocast_over_fp32(tiny_model, tiny_tokenizer) -> None:
    import copy

    from edgetune.adapters.lora import attach_lora
    from edgetune.config import LoraConfig

    torch.manual_seed(0)
    reference = attach_lora(tiny_model, LoraConfig(rank=4))
    for name, p in reference.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(0, 0.1)  # B = 0 would hide the adapter path
    held = copy.deepcopy(reference)
    embedding = held.get_base_model().model.embed_tokens.weight
    converted = hold_frozen_in_bf16(held)
    # What stays fp32 is copied (a loaded model's tensors are views into its weights file).
    kept = held.get_base_model().model.embed_tokens.weight
    assert kept.data_ptr() != embedding.data_ptr() and torch.equal(kept, embedding)
    # 2 layers x 7 projections + the LM head (untied from the embedding).
    assert converted == 15
    lm = held.get_base_model()
    assert lm.lm_head.weight.dtype == torch.bfloat16 and lm.model.embed_tokens.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for n, p in held.named_parameters() if "lora_" in n or "norm" in n)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for model in (reference, held):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)  # the same bf16 matmuls, bit for bit


def test_device_model_holds_the_base_in_bf16_only_for_bf16_and_trains_fp32_adapters() -> None:
    from edgetune.adapters.lora import device_model
    from edgetune.chat import iterate_batches
    from edgetune.client.train import train_local
    from edgetune.config import DataConfig, LoraConfig
    from edgetune.datasets.devices import tokenized_device
    from edgetune.lm import pad_id

    lora = LoraConfig(rank=4)
    held, tokenizer = device_model("tiny", lora, "none", "bf16")
    plain, _ = device_model("tiny", lora, "none", "fp32")
    assert held is not plain and device_model("tiny", lora, "none", "bf16")[0] is held  # cached per precision
    dtypes = {n: p.dtype for n, p in held.named_parameters()}
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    data = tokenized_device(DataConfig(max_length=128), "", 0, 4, 0, tokenizer)
    batches = iterate_batches(data.train, 2, 2, 0, pad_id(tokenizer))
    stats = train_local(held, batches, TrainConfig(local_steps=2, batch_size=2, precision="bf16"))
    assert stats.tokens > 0 and torch.isfinite(torch.tensor(stats.loss))
    assert all(p.dtype == torch.float32 for n, p in held.named_parameters() if p.requires_grad)


def test_the_measurement_picks_fp32_where_bf16_matmuls_are_emulated() -> None:
    """A CPU without bf16 units, emulated: oneDNN capped below AVX512-BF16 (and AMX)."""
    import os
    import subprocess
    import sys

    probe = "from edgetune.precision import resolve_precision as r; print(r('auto', frozenset()).precision)"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split()[0] == "fp32", out.stdout
