"""Tests for the memory-first training path (``train.checkpointing=on``, the default on a
quantised base) and the quantising loader: the same loss, gradients and weights as the plain
paths, with less kept."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgetune import lm
from edgetune.adapters.lora import attach_lora, get_adapter
from edgetune.chat import IGNORE_INDEX, iterate_batches
from edgetune.client.train import set_checkpointing, train_local
from edgetune.config import LoraConfig, TrainConfig
from edgetune.models import tiny_llama
from edgetune.quantize import QuantizeError, load_quantized, torchao_config


def _adapter_model(tiny_model, seed: int = 0):
    torch.manual_seed(seed)
    model = attach_lora(tiny_model, LoraConfig(rank=4))
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(0, 0.1)  # B = 0 would hide the adapter path
    return model


def _batch(tokenizer, n: int = 3) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, len(tokenizer), (n, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :7] = IGNORE_INDEX  # a prompt: positions 7..39 carry labels, 33 per row
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _loss_and_grads(model, batch, chunked: bool) -> tuple[float, int, dict[str, torch.Tensor]]:
    loss, n = lm.summed_loss(model, batch, chunked=chunked)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), n, grads


def test_the_chunked_head_gives_the_same_loss_and_gradients(tiny_model, tiny_tokenizer, monkeypatch) -> None:
    model = _adapter_model(tiny_model)
    model.train()
    batch = _batch(tiny_tokenizer)
    plain = _loss_and_grads(model, batch, chunked=False)
    results = [_loss_and_grads(model, batch, chunked=True)]  # 99 label rows: one chunk of 64 rows, one of 35
    monkeypatch.setattr(lm, "HEAD_CHUNK_ROWS", 5)  # 20 chunks, the last one short
    results.append(_loss_and_grads(model, batch, chunked=True))
    assert plain[1] == 3 * 33
    for loss_value, n, grads in results:
        assert n == plain[1]
        assert loss_value == pytest.approx(plain[0], rel=1e-6)  # the same sum, another order
        torch.testing.assert_close(grads, plain[2], rtol=1e-5, atol=1e-6)


def test_checkpointed_training_reaches_the_same_adapter(tiny_tokenizer) -> None:
    from edgetune.config import DataConfig
    from edgetune.datasets.devices import tokenized_device

    data = tokenized_device(DataConfig(), "", 0, 2, 0, tiny_tokenizer)
    adapters = []
    for checkpointing in ("off", "on"):
        model = _adapter_model(tiny_llama(len(tiny_tokenizer)))
        cfg = TrainConfig(local_steps=3, batch_size=4, precision="fp32", checkpointing=checkpointing)
        batches = iterate_batches(data.train, cfg.batch_size, cfg.local_steps, 0, 0)
        stats = train_local(model, batches, cfg)
        assert model.get_base_model().is_activation_checkpointing == (checkpointing == "on")
        adapters.append((stats.loss, get_adapter(model)))
    assert adapters[1][0] == pytest.approx(adapters[0][0], rel=1e-5)
    torch.testing.assert_close(adapters[1][1], adapters[0][1], rtol=1e-4, atol=1e-6)
    set_checkpointing(model, False)
    assert not model.get_base_model().is_activation_checkpointing


def _saved_tiny(folder: Path, tokenizer) -> Path:
    tiny_llama(len(tokenizer), seed=3).save_pretrained(folder)
    return folder


def test_the_quantising_loader_matches_transformers_own(tmp_path: Path, tiny_tokenizer) -> None:
    from transformers import AutoModelForCausalLM, TorchAoConfig

    folder = _saved_tiny(tmp_path / "tiny", tiny_tokenizer)
    ours = load_quantized(folder, "int8")
    config = TorchAoConfig(quant_type=torchao_config("int8"), modules_to_not_convert=["lm_head"])
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=config).eval()
    q_ours, q_theirs = ours.model.layers[1].mlp.up_proj.weight, theirs.model.layers[1].mlp.up_proj.weight
    assert torch.equal(q_ours.qdata, q_theirs.qdata) and torch.equal(q_ours.scale, q_theirs.scale)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied, fp32, as in the folder
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=0)


def test_the_quantising_loader_names_what_is_wrong(tmp_path: Path, tiny_tokenizer) -> None:
    from safetensors.torch import load_file, save_file

    folder = _saved_tiny(tmp_path / "tiny", tiny_tokenizer)
    weights = folder / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.mlp.extra.weight"] = torch.zeros(2, 2)
    save_file(state, weights)
    with pytest.raises(QuantizeError, match="'model.layers.0.mlp.extra.weight' is not a parameter"):
        load_quantized(folder, "int8")
    weights.unlink()
    with pytest.raises(QuantizeError, match="has no model.safetensors"):
        load_quantized(folder, "int8")


def test_the_bf16_base_loads_tensorwise_as_the_held_base_of_a_full_load(tmp_path: Path, tiny_tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    from edgetune.adapters.lora import set_adapter
    from edgetune.memory import load_tensorwise
    from edgetune.precision import hold_frozen_in_bf16

    folder = _saved_tiny(tmp_path / "tiny", tiny_tokenizer)
    lora = LoraConfig(rank=4)
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference = _adapter_model(full)
    hold_frozen_in_bf16(reference)
    ours = attach_lora(load_tensorwise(folder, lambda weight: weight.to(torch.bfloat16)), lora)
    hold_frozen_in_bf16(ours)
    set_adapter(ours, get_adapter(reference))
    mine, theirs = ours.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys()
    for name, value in theirs.items():
        assert mine[name].dtype == value.dtype and torch.equal(mine[name], value), name
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = _loss_and_grads(ours, batch, False), _loss_and_grads(reference, batch, False)
    assert got[0] == want[0]
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)


@pytest.mark.parametrize("safetensors", [True, False])
def test_device_model_holds_a_folder_in_bf16_either_way(tmp_path: Path, tiny_tokenizer, safetensors: bool) -> None:
    """A safetensors folder loads a tensor at a time; one without (``pytorch_model.bin``) loads
    whole and is held afterwards: the same bf16-held model."""
    from edgetune.adapters.lora import device_model

    folder = _saved_tiny(tmp_path / "tiny", tiny_tokenizer)
    tiny_tokenizer.save_pretrained(folder)
    if not safetensors:  # transformers 5 writes safetensors only: make the older layout by hand
        torch.save(tiny_llama(len(tiny_tokenizer), seed=3).state_dict(), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    model, _ = device_model(str(folder), LoraConfig(rank=4), "none", "bf16")
    lm_model = model.get_base_model()
    assert lm_model.model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    assert lm_model.lm_head.weight.dtype == torch.bfloat16
    assert lm_model.model.embed_tokens.weight.dtype == torch.float32
    reference = tiny_llama(len(tiny_tokenizer), seed=3)
    up = reference.model.layers[0].mlp.up_proj.weight.to(torch.bfloat16)
    assert torch.equal(lm_model.model.layers[0].mlp.up_proj.base_layer.weight, up)
