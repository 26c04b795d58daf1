"""Shared fixtures: the tiny random Llama of the unit tests, its tokenizer and a rank-4 LoRA.

``tiny_model`` is built fresh for every test because ``attach_lora`` wraps it in place.
"""

from __future__ import annotations

import pytest
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from edgetune import models
from edgetune.adapters.lora import adapter_shapes
from edgetune.config import LoraConfig


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level test tokenizer (one token per byte, ChatML specials)."""
    return models.tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A fresh tiny random Llama (hidden 64, 2 layers, seed 0), in eval mode."""
    return models.tiny_llama(len(tiny_tokenizer))


@pytest.fixture
def lora_cfg() -> LoraConfig:
    """Rank-4 LoRA on every projection, A frozen (the default mode)."""
    return LoraConfig(rank=4)


@pytest.fixture
def tiny_shapes(lora_cfg: LoraConfig) -> dict[str, tuple[int, ...]]:
    """PEFT-file names and shapes of the tiny model's adapter for ``lora_cfg``.

    Example: ``base_model.model.model.layers.0.mlp.up_proj.lora_B.weight -> (128, 4)``.
    """
    return adapter_shapes(models.model_skeleton("tiny"), lora_cfg)
