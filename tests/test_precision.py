"""Tests for edgetune/precision.py: ``train.precision=auto`` follows the CPU's bf16 units;
an explicit choice wins; devices resolve it where they parse the run config."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from edgetune.config import ConfigError, RunConfig, TrainConfig, from_flat
from edgetune.precision import (
    COMPILE_MIN_STEPS,
    DEVICE_ATTENTION,
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
    explicit = RunConfig(train=TrainConfig(precision="fp32", checkpointing="off", compile="off"))
    assert resolve_run(explicit) is explicit
    # train.checkpointing=auto: on for a quantised base (a mode for devices short of memory)
    assert resolved.train.checkpointing == "off"
    assert resolve_run(from_flat({"model.quantize": "int8"})).train.checkpointing == "on"
    assert resolve_run(from_flat({"model.quantize": "int8", "train.checkpointing": "off"})).train.checkpointing == "off"
    with pytest.raises(ConfigError, match="train.precision='fp16'"):
        TrainConfig(precision="fp16")
    with pytest.raises(ConfigError, match="train.compile='yes'"):
        TrainConfig(compile="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("flat", "expect"),
    [
        ({}, "off"),  # the default run: 3 rounds of 8 steps do not repay compiling
        ({"model.base": "smollm2", "federation.rounds": 25}, "on"),  # 25 x 8 = COMPILE_MIN_STEPS
        ({"model.base": "smollm2", "federation.rounds": 24}, "off"),
        ({"model.base": "tiny", "federation.rounds": 200}, "off"),  # the embedded tiny model never repays it
        ({"model.base": "smollm2", "federation.rounds": 200, "model.quantize": "int8"}, "off"),
        ({"model.base": "smollm2", "federation.rounds": 200, "lora.kind": "dora"}, "off"),
        ({"model.base": "smollm2", "federation.rounds": 200, "train.checkpointing": "on"}, "off"),
        ({"model.base": "smollm2", "federation.rounds": 200, "train.engine": "onnxruntime"}, "off"),
        ({"train.compile": "on"}, "on"),  # an explicit choice wins
        ({"model.base": "smollm2", "federation.rounds": 200, "train.compile": "off"}, "off"),
    ],
)
def test_compile_auto_turns_on_where_it_pays(flat: dict[str, object], expect: str) -> None:
    assert COMPILE_MIN_STEPS == 25 * TrainConfig().local_steps
    assert resolve_run(from_flat(flat)).train.compile == expect
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


def test_bf16_device_models_attend_eagerly_when_short_and_in_fp32_when_long(monkeypatch) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from edgetune import precision
    from edgetune.adapters.lora import device_model
    from edgetune.config import LoraConfig
    from edgetune.lm import causal_lm

    held, _ = device_model("tiny", LoraConfig(rank=4), "none", "bf16")
    plain, _ = device_model("tiny", LoraConfig(rank=4), "none", "fp32")
    assert causal_lm(held).config._attn_implementation == DEVICE_ATTENTION
    assert causal_lm(plain).config._attn_implementation == "sdpa"  # fp32 keeps transformers' default
    gen = torch.Generator().manual_seed(0)
    config, layer = causal_lm(held).config, causal_lm(held).model.layers[0].self_attn
    heads, dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    q = torch.randn(2, heads, 6, dim, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(2, config.num_key_value_heads, 6, dim, generator=gen).to(torch.bfloat16) for _ in "kv")
    causal = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    additive = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # Short: transformers' eager attention with the mask made additive; no mask is causal.
        short, _ = precision._device_attention(layer, q, k, v, causal, scaling=0.5)
        eager, _ = eager_attention_forward(layer, q, k, v, additive, scaling=0.5)
        unmasked, _ = precision._device_attention(layer, q, k, v, None, scaling=0.5)
        one_query, _ = precision._device_attention(layer, q[:, :, -1:], k, v, None, scaling=0.5)
        monkeypatch.setattr(precision, "EAGER_SCORES", q.numel() // dim - 1)
        # Long: SDPA on fp32 inputs, handed back in bf16.
        long, _ = precision._device_attention(layer, q, k, v, causal, scaling=0.5)
    assert torch.equal(short, eager) and torch.equal(unmasked, eager)
    torch.testing.assert_close(one_query, eager[:, -1:])
    expected, _ = sdpa_attention_forward(layer, q.float(), k.float(), v.float(), causal, scaling=0.5)
    assert long.dtype == torch.bfloat16 and torch.equal(long, expected.to(torch.bfloat16))
    torch.testing.assert_close(short.float(), expected, rtol=0.02, atol=0.02)  # bf16 scores
    # Padding is masked both ways: a left-padded row's logits match the row alone.
    ids = torch.randint(3, 100, (1, 7), generator=gen)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    attention = (padded != 0).long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    for scores in (0, 2**22):  # SDPA in fp32, eager
        monkeypatch.setattr(precision, "EAGER_SCORES", scores)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            alone = held(input_ids=ids).logits
            left = held(input_ids=padded, attention_mask=attention, position_ids=positions).logits
        torch.testing.assert_close(left[:, 3:].float(), alone.float(), rtol=0.02, atol=0.02)


def test_compiled_training_matches_eager_and_evaluation_stays_uncompiled(tiny_model, tiny_tokenizer) -> None:
    import copy

    from edgetune.adapters.lora import attach_lora
    from edgetune.chat import iterate_batches
    from edgetune.client.train import train_local, uncompiled
    from edgetune.config import DataConfig, LoraConfig
    from edgetune.datasets.devices import tokenized_device
    from edgetune.lm import causal_lm, evaluate, pad_id

    torch._dynamo.reset()
    eager = attach_lora(tiny_model, LoraConfig(rank=4))
    compiled = copy.deepcopy(eager)
    data = tokenized_device(DataConfig(max_length=128), "", 0, 4, 0, tiny_tokenizer)
    stats = []
    for model, mode in ((eager, "off"), (compiled, "on")):
        batches = iterate_batches(data.train, 2, 3, 0, pad_id(tiny_tokenizer))  # lengths vary: no recompiles
        stats.append(train_local(model, batches, TrainConfig(local_steps=3, batch_size=2, compile=mode)))
    layers = causal_lm(compiled).model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert all(getattr(layer, "_compiled_call_impl", None) is None for layer in causal_lm(eager).model.layers)
    assert stats[1].loss == pytest.approx(stats[0].loss, rel=1e-4)
    trained = [{n: p for n, p in m.named_parameters() if p.requires_grad} for m in (eager, compiled)]
    torch.testing.assert_close(trained[0], trained[1], rtol=1e-3, atol=1e-5)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with uncompiled():
        held_out = [evaluate(m, data.heldout[:4], pad_id(tiny_tokenizer), 2, "fp32").loss for m in (eager, compiled)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # nothing compiled for evaluation
    assert held_out[1] == pytest.approx(held_out[0], rel=1e-4)


def test_without_a_cpp_compiler_auto_does_not_compile_and_on_fails_in_one_line(monkeypatch, tiny_model) -> None:
    import edgetune.client.train as client_train
    import edgetune.precision as precision
    from edgetune.adapters.lora import attach_lora
    from edgetune.config import LoraConfig

    monkeypatch.setattr(precision, "compiler_found", lambda: False)
    monkeypatch.setattr(client_train, "compiler_found", lambda: False)
    long_run = from_flat({"model.base": "smollm2", "federation.rounds": 200})
    assert resolve_run(long_run).train.compile == "off"
    with pytest.raises(ValueError, match=r"^train.compile=on: torch.compile's CPU backend needs a C\+\+ compiler"):
        client_train.compile_decoder(attach_lora(tiny_model, LoraConfig(rank=4)))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_packed_rows_give_the_padded_batchs_loss_and_gradients(precision: str) -> None:
    from edgetune.adapters.lora import device_model
    from edgetune.chat import collate, pack_rows
    from edgetune.config import DataConfig, LoraConfig
    from edgetune.datasets.devices import tokenized_device
    from edgetune.lm import autocast, pad_id, summed_loss

    model, tokenizer = device_model("tiny", LoraConfig(rank=4), "none", precision)
    data = tokenized_device(DataConfig(max_length=128), "", 1, 4, 0, tokenizer)
    ends = [{k: v[-n:] for k, v in e.items()} for e, n in zip(data.train, (90, 60, 45, 30, 20), strict=False)]
    batch = collate(ends, pad_id(tokenizer))  # the answers' ends: labelled, of different lengths
    packed = pack_rows(batch)
    assert "position_ids" in packed and len(packed["input_ids"]) < len(batch["input_ids"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # B = 0 would hide a wrong mask from the adapter's gradients' inputs
        torch.nn.init.normal_(p, std=0.02)
    results = []
    for b in (batch, packed):
        with autocast(precision):  # type: ignore[arg-type]
            loss, n = summed_loss(model, b)
        loss.backward()
        results.append((loss.detach(), n, [p.grad.clone() for p in trainable]))
        model.zero_grad(set_to_none=True)
    (padded_loss, padded_n, padded_grads), (packed_loss, packed_n, packed_grads) = results
    assert packed_n == padded_n
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if precision == "fp32" else {"rtol": 2e-2, "atol": 1e-3}
    torch.testing.assert_close(packed_loss, padded_loss, **tolerance)
    torch.testing.assert_close(packed_grads, padded_grads, **tolerance)
