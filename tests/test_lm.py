"""Tests for edgetune/lm.py's loss: ``summed_cross_entropy`` is PyTorch's summed cross-entropy
in value and gradient, in fp32 and on bf16 logits, and the model's loss built on it is too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgetune import lm
from edgetune.adapters.lora import attach_lora
from edgetune.chat import IGNORE_INDEX
from edgetune.config import LoraConfig

# bf16 gradients: each element rounded once more (scaled after the cast, not before).
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-7}, torch.bfloat16: {"rtol": 8e-3, "atol": 1e-7}}


def _logits(rows: int, vocab: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rows)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    return logits, torch.randint(0, vocab, (rows,), generator=g)


def _composite(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PyTorch's summed cross-entropy, as ``summed_loss`` computed it before."""
    return F.cross_entropy(x.float(), y, reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, lm.CE_CHUNK_ROWS, 3 * lm.CE_CHUNK_ROWS + 5])
def test_summed_cross_entropy_is_pytorch_s_in_value_and_gradient(dtype: torch.dtype, rows: int) -> None:
    logits, labels = _logits(rows, 301, dtype)
    results = []
    for loss_fn in (lm.summed_cross_entropy, _composite):
        x = logits.clone().requires_grad_()
        loss = loss_fn(x, labels)
        (loss / 7).backward()  # a scale, as training divides by the label count
        assert loss.dtype == torch.float32 and x.grad is not None and x.grad.dtype == dtype
        results.append((loss.detach(), x.grad))
    (ours, our_grad), (theirs, their_grad) = results
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(our_grad, their_grad, **TOLERANCE[dtype])


def test_without_gradients_it_keeps_no_gradient_and_gives_the_same_value() -> None:
    logits, labels = _logits(40, 97, torch.float32)
    with torch.no_grad():
        loss = lm.summed_cross_entropy(logits, labels)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _composite(logits, labels))


def test_a_second_backward_through_the_same_loss_is_refused() -> None:
    logits, labels = _logits(5, 11, torch.float32)
    x = logits.requires_grad_()
    loss = lm.summed_cross_entropy(x, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_its_gradient_is_a_saved_tensor_that_checkpointing_can_drop() -> None:
    logits, labels = _logits(20, 97, torch.bfloat16)
    packed: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm.summed_cross_entropy(logits.requires_grad_(), labels)
    assert packed == [(20, 97)]


def _model_loss_and_grads(model, batch, precision: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    with lm.autocast(precision):  # type: ignore[arg-type]
        loss, n = lm.summed_loss(model, batch)
    (loss / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_model_loss_is_as_exact_as_pytorch_s(tiny_model, tiny_tokenizer, monkeypatch, precision: str) -> None:
    torch.manual_seed(0)
    model = attach_lora(tiny_model, LoraConfig(rank=4))
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data.normal_(0, 0.1)  # B = 0 would hide the adapter path
    ids = torch.randint(3, len(tiny_tokenizer), (3, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :7] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    ours = _model_loss_and_grads(model, batch, precision)
    truth = _model_loss_and_grads(model, batch, "fp32")  # fp32 throughout: the reference for bf16
    monkeypatch.setattr(lm, "summed_cross_entropy", _composite)
    theirs = _model_loss_and_grads(model, batch, precision)
    if precision == "fp32":
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        return
    # bf16: both round; ours rounds each logit's gradient once more (scaled after the cast),
    # so it is held to PyTorch's own distance from the fp32 gradients, not to PyTorch's digits
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-3, atol=0.0)
    for name, exact in truth[1].items():
        our_error, their_error = (ours[1][name] - exact).norm(), (theirs[1][name] - exact).norm()
        assert our_error <= 1.5 * their_error + 1e-3 * exact.norm(), name
