"""Tests for edgetune/quantize.py: an int8 base trains LoRA on top; int4 fails in one line on a
CPU without its kernels; ``model.quantize`` is validated."""

from __future__ import annotations

import pytest
import torch

from edgetune.adapters.lora import attach_lora, get_adapter
from edgetune.config import ConfigError, LoraConfig, from_flat
from edgetune.models import load_base
from edgetune.quantize import LeanQuantizedLinear, QuantizeError, quantize_model


def test_int8_base_trains_lora_one_step(tiny_tokenizer) -> None:
    model, _ = load_base("tiny", "int8")
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert "Int8" in type(weight).__name__  # an int8 torchao tensor, not fp32
    assert model.lm_head.weight.dtype == torch.float32
    peft_model = attach_lora(model, LoraConfig(rank=4))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    before = get_adapter(peft_model)
    ids = tiny_tokenizer("int8 base", return_tensors="pt").input_ids
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    torch.optim.SGD(params, lr=0.1).step()
    after = get_adapter(peft_model)
    assert any(not torch.equal(after[k], before[k]) for k in after if ".lora_B." in k)


def _saved_tensors(model, ids: torch.Tensor, precision: str) -> tuple[list[tuple[tuple[int, ...], torch.dtype]], dict]:
    """Shapes and dtypes autograd saves in one forward pass, and the adapter's gradients."""
    from edgetune.lm import autocast

    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast(precision):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return saved, grads


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_int8_training_keeps_no_dequantised_weight_copies(tiny_tokenizer, monkeypatch, precision: str) -> None:
    """Autograd saves no de-quantised (out, in) weight; the gradients equal torchao's own path's."""
    model, _ = load_base("tiny", "int8")
    assert isinstance(model.model.layers[0].mlp.down_proj, LeanQuantizedLinear)
    peft_model = attach_lora(model, LoraConfig(rank=4))
    weight_shapes = {(64, 64), (32, 64), (64, 32), (128, 64), (64, 128)}  # the tiny Llama's Linears, either way
    ids = tiny_tokenizer("int8 base, no copies", return_tensors="pt").input_ids
    saved, grads = _saved_tensors(peft_model, ids, precision)
    assert saved and not [s for s in saved if s[0] in weight_shapes]
    monkeypatch.setattr(LeanQuantizedLinear, "forward", torch.nn.Linear.forward)  # torchao's linear as is
    saved_plain, plain_grads = _saved_tensors(peft_model, ids, precision)
    # One fp32 copy per quantised Linear whose input needs a gradient: all 14 but layer 0's q, k, v.
    assert len([s for s in saved_plain if s[0] in weight_shapes]) == 11
    assert grads.keys() == plain_grads.keys() and len(grads) == 14
    # The same maths, summed in another order: fp32 rounding (2^-24 relative per step, a few
    # hundred terms), bf16 rounding (2^-8) where the matmuls run in bf16.
    rel = 1e-4 if precision == "fp32" else 2e-2
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=rel, atol=rel * float(plain_grads[name].abs().max()))


def test_int8_logits_stay_close_to_fp32(tiny_tokenizer) -> None:
    fp32, _ = load_base("tiny")
    int8, _ = load_base("tiny", "int8")
    ids = tiny_tokenizer("close enough", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = fp32(input_ids=ids).logits, int8(input_ids=ids).logits
    # Per-channel int8 rounding moves each weight by at most half a step (|w|max / 254).
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_int4_fails_in_one_line_saying_why() -> None:
    model, _ = load_base("tiny")
    try:
        quantize_model(model, "int4")
    except QuantizeError as err:
        message = str(err)
        assert "\n" not in message
        assert message.startswith("model.quantize=int4 cannot train on this CPU: torchao")
        assert "use model.quantize=int8" in message
    else:  # a machine whose torchao has CPU int4 kernels: then it must train
        peft_model = attach_lora(model, LoraConfig(rank=4))
        ids = torch.tensor([[1, 2, 3, 4]])
        peft_model(input_ids=ids, labels=ids).loss.backward()


def test_quantize_key_is_validated() -> None:
    assert from_flat({"model.quantize": "int8"}).model.quantize == "int8"
    with pytest.raises(ConfigError, match="model.quantize='int3'"):
        from_flat({"model.quantize": "int3"})


def test_simulate_with_int4_exits_2_in_one_line(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgetune.cli import main
    from edgetune.quantize import check_trainable

    try:
        check_trainable("int4")
    except QuantizeError:
        pass
    else:
        pytest.skip("this machine's torchao trains through int4 on the CPU")
    code = main(["simulate", "--base", "tiny", "--set", "model.quantize=int4", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("edgetune: model.quantize=int4 cannot train on this CPU") and "\n" not in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_dora_on_a_quantised_base_is_refused() -> None:
    with pytest.raises(ConfigError, match="lora.kind='dora': needs an unquantised base"):
        from_flat({"lora.kind": "dora", "model.quantize": "int8"})
    with pytest.raises(ConfigError, match="train.engine=pytorch only"):
        from_flat({"lora.kind": "binary", "train.engine": "onnxruntime"})
