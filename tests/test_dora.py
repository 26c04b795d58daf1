"""Tests for DoRA (``lora.kind=dora``): what trains and travels, the version-0 magnitudes, PEFT
file round-trip, and the aggregation error of averaging DoRA parameters (adapters/dora.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from edgetune.adapters.dora import dora_base, dora_weight, dora_weight_error
from edgetune.adapters.lora import (
    adapter_shapes,
    attach_lora,
    dora_magnitudes,
    exchanged_names,
    get_adapter,
    init_adapter,
    set_adapter,
)
from edgetune.adapters.peft_io import save_adapter
from edgetune.config import LoraConfig
from edgetune.models import model_skeleton, tiny_llama

DORA = LoraConfig(rank=4, kind="dora")
TARGETS = 7 * 2
SCALING = DORA.alpha / DORA.rank


def test_dora_trains_and_exchanges_b_and_the_magnitude(tiny_model) -> None:
    model = attach_lora(tiny_model, DORA)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * TARGETS
    assert sum(".lora_magnitude_vector." in n for n in trainable) == TARGETS
    shapes = adapter_shapes(model_skeleton("tiny"), DORA)
    sent = exchanged_names(shapes, DORA)
    assert len(sent) == 2 * TARGETS and not any(".lora_A." in n for n in sent)
    assert shapes["base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"] == (128,)


def test_version0_magnitudes_are_the_base_row_norms(tiny_model) -> None:
    model = attach_lora(tiny_model, DORA)
    mags = dora_magnitudes(model)
    peft_init = get_adapter(model)  # PEFT's own initialisation: ||W0 + s B A|| with B = 0
    assert len(mags) == TARGETS
    for k, v in mags.items():
        torch.testing.assert_close(v, peft_init[k], rtol=1e-6, atol=0)
    shapes = adapter_shapes(model_skeleton("tiny"), DORA)
    with pytest.raises(ValueError, match="row norms"):
        init_adapter(shapes, 0)
    initial = init_adapter(shapes, 0, mags)
    assert all(torch.equal(initial[k], mags[k]) for k in mags)
    server_mags, w0 = dora_base("tiny", DORA)  # what the server loads: the same numbers
    assert all(torch.equal(server_mags[k], mags[k]) for k in mags) and w0.keys() == mags.keys()


def test_dora_one_step_and_peft_round_trip(tmp_path: Path, tiny_model, tiny_tokenizer) -> None:
    model = attach_lora(tiny_model, DORA)
    shapes = {k: tuple(v.shape) for k, v in get_adapter(model).items()}
    set_adapter(model, init_adapter(shapes, 3, dora_magnitudes(model)))
    params = [p for p in model.parameters() if p.requires_grad]
    ids = tiny_tokenizer("dora trains", return_tensors="pt").input_ids
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD(params, lr=0.5).step()
    state = get_adapter(model)
    mags = dora_magnitudes(model)
    assert any(not torch.equal(state[k], mags[k]) for k in mags)  # the magnitude moved
    save_adapter(tmp_path, state, DORA, base_model=None)
    theirs = PeftModel.from_pretrained(tiny_llama(len(tiny_tokenizer)), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_dora_weight_matches_peft_layer(tiny_model) -> None:
    model = attach_lora(tiny_model, DORA)
    gen = torch.Generator().manual_seed(0)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in get_adapter(model).items()}
    set_adapter(model, state)
    prefix = "base_model.model.model.layers.1.self_attn.v_proj"
    layer = model.get_submodule(prefix)
    w0 = layer.get_base_layer().weight
    keys = [f"{prefix}.lora_magnitude_vector", f"{prefix}.lora_B.weight", f"{prefix}.lora_A.weight"]
    x = torch.randn(2, 64, generator=gen)
    with torch.no_grad():
        expected = x.double() @ dora_weight(w0, *(state[k] for k in keys), SCALING).T
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-6)


def _two_layer_case() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    p = "layer"
    w0 = {f"{p}.lora_magnitude_vector": torch.randn(6, 5, generator=gen)}
    base = {
        f"{p}.lora_magnitude_vector": torch.linalg.norm(w0[f"{p}.lora_magnitude_vector"], dim=1),
        f"{p}.lora_B.weight": torch.zeros(6, 2),
        f"{p}.lora_A.weight": torch.randn(2, 5, generator=gen),
    }
    return w0, base


def test_dora_error_is_zero_when_only_magnitudes_move() -> None:
    """With B fixed, W' = m * V / ||V|| is linear in m: averaging m is exact."""
    w0, base = _two_layer_case()
    deltas = [{"layer.lora_magnitude_vector": torch.full((6,), 0.1 * (i + 1))} for i in range(3)]
    assert dora_weight_error(w0, base, deltas, [1.0, 2.0, 3.0], SCALING) < 1e-12
    assert dora_weight_error(w0, base, deltas[:1], [1.0], SCALING) == 0.0


def test_dora_error_is_positive_when_directions_differ() -> None:
    w0, base = _two_layer_case()
    gen = torch.Generator().manual_seed(2)
    deltas = [{"layer.lora_B.weight": torch.randn(6, 2, generator=gen)} for _ in range(2)]
    error = dora_weight_error(w0, base, deltas, [1.0, 1.0], SCALING)
    assert 1e-3 < error < 1.0
