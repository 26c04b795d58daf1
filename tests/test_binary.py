"""Tests for binary LoRA weights (adapters/binary.py, adapters/binary_io.py): the forward pass
is ``sign(W) * s`` applied by hand, the straight-through gradient reaches the latent weights,
the packed adapter round-trips bit for bit and merges into the base with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from edgetune.adapters.binary import BinaryLinear, binarize, binarized_state, binary_product_error
from edgetune.adapters.binary_io import BINARY_WEIGHTS, load_binary_adapter, pack, save_binary_adapter, unpack
from edgetune.adapters.lora import attach_lora, get_adapter, init_adapter, set_adapter
from edgetune.adapters.peft_io import ADAPTER_WEIGHTS, save_adapter
from edgetune.config import ConfigError, LoraConfig, from_flat
from edgetune.models import tiny_llama

BINARY = LoraConfig(rank=4, kind="binary")
PLAIN = LoraConfig(rank=4)
SEED = 11


def _latent(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """The run's initial adapter (A from ``SEED``) with a random latent B, as after training."""
    state = init_adapter(shapes, SEED)
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.05 if ".lora_B." in k else v for k, v in state.items()}


def test_binarize_by_hand() -> None:
    # A (r=2, in=4): one scale per row; B (out=4, r=2): one per column. Zero counts as +.
    # The scale is the row's rms: sqrt((9 + 16) / 4) = 2.5.
    a = torch.tensor([[3.0, -4.0, 0.0, 0.0], [-0.75, -0.75, 0.75, 0.75]])
    assert binarize(a).tolist() == [[2.5, -2.5, 2.5, 2.5], [-0.75, -0.75, 0.75, 0.75]]
    b = a.T.contiguous()
    assert binarize(b).tolist() == binarize(a).T.tolist()
    # The scale is rounded to fp16: rms 0.1 is stored as fp16(0.1).
    row = torch.tensor([[0.1, -0.1, 0.1, -0.1]])
    assert binarize(row)[0, 0].item() == torch.tensor(0.1).half().item()
    assert torch.count_nonzero(binarize(torch.zeros(4, 2))) == 0  # B at init stays zero


def test_binarize_is_idempotent() -> None:
    w = torch.randn(8, 300, generator=torch.Generator().manual_seed(0))
    once = binarize(w)
    assert torch.equal(binarize(once), once)
    assert torch.equal(torch.signbit(once), torch.signbit(w))


def test_binary_forward_is_sign_times_scale_by_hand(tiny_model, tiny_shapes) -> None:
    model = attach_lora(tiny_model, BINARY)
    latent = _latent(tiny_shapes)
    set_adapter(model, latent)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.lora_A["default"], BinaryLinear) and isinstance(layer.lora_B["default"], BinaryLinear)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = latent[f"{prefix}.lora_A.weight"], latent[f"{prefix}.lora_B.weight"]  # (4, 64), (64, 4)
    sa = a.square().mean(dim=1).sqrt().half().float()  # (4,)  one per row of A
    sb = b.square().mean(dim=0).sqrt().half().float()  # (4,)  one per column of B
    a_bin = torch.where(a >= 0, 1.0, -1.0) * sa[:, None]
    b_bin = torch.where(b >= 0, 1.0, -1.0) * sb[None, :]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    expected = x @ layer.get_base_layer().weight.T + (BINARY.alpha / BINARY.rank) * (x @ a_bin.T @ b_bin.T)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_straight_through_gradient_reaches_the_latent_weights(tiny_shapes, tiny_tokenizer) -> None:
    """d loss / d latent W == d loss / d bin(W): the same as a plain LoRA model holding bin(W)."""
    latent = _latent(tiny_shapes)
    binary = attach_lora(tiny_llama(len(tiny_tokenizer)), BINARY)
    plain = attach_lora(tiny_llama(len(tiny_tokenizer)), PLAIN)
    set_adapter(binary, latent)
    set_adapter(plain, binarized_state(latent))
    ids = tiny_tokenizer("binary adapters, straight through", return_tensors="pt").input_ids
    for model in (binary, plain):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in binary.named_parameters() if p.requires_grad}
    plain_grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert grads.keys() == plain_grads.keys() and len(grads) == 14
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7)


def test_a_training_step_changes_the_latent_b(tiny_model, tiny_shapes, tiny_tokenizer) -> None:
    model = attach_lora(tiny_model, BINARY)
    set_adapter(model, init_adapter(tiny_shapes, SEED))  # B = 0: bin(B) = 0
    params = [p for p in model.parameters() if p.requires_grad]
    ids = tiny_tokenizer("one step", return_tensors="pt").input_ids
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD(params, lr=0.1).step()
    after = get_adapter(model)
    assert all(after[k].abs().sum() > 0 for k in after if ".lora_B." in k)


def test_packed_adapter_round_trips_bit_for_bit(tmp_path: Path, tiny_shapes) -> None:
    latent = _latent(tiny_shapes)
    path = save_binary_adapter(tmp_path / "one", latent, BINARY, None, SEED)
    dense = load_binary_adapter(tmp_path / "one")
    expected = binarized_state(latent)
    assert dense.keys() == latent.keys()
    assert all(torch.equal(dense[k], expected[k]) for k in dense)
    # Saving the loaded (dense) adapter again gives the same file, byte for byte.
    again = save_binary_adapter(tmp_path / "two", dense, BINARY, None, SEED)
    assert path.read_bytes() == again.read_bytes()
    # One bit per B parameter (A comes from the seed) and one fp16 scale per rank channel.
    with safe_open(str(path), framework="pt") as fh:
        signs, scales = fh.get_tensor("signs"), fh.get_tensor("scales")
    b_numel = [s[0] * s[1] for k, s in tiny_shapes.items() if ".lora_B." in k]
    assert signs.dtype == torch.uint8 and signs.numel() == sum((n + 7) // 8 for n in b_numel)
    assert scales.dtype == torch.float16 and scales.numel() == 4 * len(b_numel)


def test_both_factor_mode_stores_a_too(tiny_shapes) -> None:
    latent = {k: v + 0.01 if ".lora_A." in k else v for k, v in _latent(tiny_shapes).items()}
    tensors, meta = pack(latent, SEED, store_a=True)
    dense = unpack(tensors, meta)
    assert all(torch.equal(dense[k], binarize(latent[k])) for k in latent)
    with pytest.raises(ValueError, match="truncated"):
        unpack({"signs": tensors["signs"][:-1], "scales": tensors["scales"]}, meta)
    with pytest.raises(ValueError, match="not a binary adapter"):
        unpack(tensors, {**meta, "format": "other"})


def test_packed_adapter_merges_into_the_base_with_the_same_logits(tmp_path: Path, tiny_shapes, tiny_tokenizer) -> None:
    """binary model (latent) == plain PEFT model of the unpacked file == its merged weights."""
    vocab = len(tiny_tokenizer)
    latent = _latent(tiny_shapes, seed=3)
    binary = attach_lora(tiny_llama(vocab), BINARY)
    set_adapter(binary, latent)
    save_binary_adapter(tmp_path, latent, BINARY, None, SEED)
    plain = attach_lora(tiny_llama(vocab), PLAIN)
    set_adapter(plain, load_binary_adapter(tmp_path))
    ids = tiny_tokenizer("merge me exactly", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, unmerged = binary(input_ids=ids).logits, plain(input_ids=ids).logits
        merged = plain.merge_and_unload()(input_ids=ids).logits
        base = tiny_llama(vocab)(input_ids=ids).logits
    torch.testing.assert_close(unmerged, ours, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged, ours, rtol=0, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3  # the adapter does change the output


def test_saved_binary_run_adapter_loads_in_plain_peft(tmp_path: Path, tiny_shapes, tiny_tokenizer) -> None:
    """``save_adapter`` with ``kind=binary`` writes bin(W): PEFT alone reproduces the binary forward."""
    vocab = len(tiny_tokenizer)
    latent = _latent(tiny_shapes, seed=5)
    save_adapter(tmp_path, latent, BINARY, base_model=None)
    assert (tmp_path / ADAPTER_WEIGHTS).is_file() and not (tmp_path / BINARY_WEIGHTS).exists()
    theirs = PeftModel.from_pretrained(tiny_llama(vocab), tmp_path).eval()
    ours = attach_lora(tiny_llama(vocab), BINARY)
    set_adapter(ours, latent)
    ids = tiny_tokenizer("plain peft", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_lora_kind_is_validated() -> None:
    assert from_flat({"lora.kind": "binary", "federation.codec": "fp16"}).lora.kind == "binary"
    with pytest.raises(ConfigError, match="lora.kind='binary': needs federation.codec=fp16 or fp32"):
        from_flat({"lora.kind": "binary"})  # the 1-bit default: signs decided per column, diverged
    with pytest.raises(ConfigError, match="lora.kind='ternary'"):
        from_flat({"lora.kind": "ternary"})


def test_binary_product_error_by_hand() -> None:
    """One layer, A = [[1, 1]] (bin(A) = A), B (1, 1)... two devices: B = +1 and B = -3."""
    a = torch.tensor([[1.0, 1.0]])  # (r=1, in=2)
    base = {"l.lora_A.weight": a, "l.lora_B.weight": torch.zeros(1, 1)}
    deltas = [{"l.lora_B.weight": torch.tensor([[1.0]])}, {"l.lora_B.weight": torch.tensor([[-3.0]])}]
    # bin of a 1x1 B is B itself: mean of products = [[-1, -1]]; bin(mean B = -1) A = [[-1, -1]].
    assert binary_product_error(base, deltas, [1.0, 1.0]) == 0.0
    # B (2, 1): bin keeps one scale per column: [1, 7] -> [5, 5] (rms 5); [1, -1] -> [1, -1].
    base2 = {"l.lora_A.weight": a, "l.lora_B.weight": torch.zeros(2, 1)}
    d2 = [{"l.lora_B.weight": torch.tensor([[1.0], [7.0]])}, {"l.lora_B.weight": torch.tensor([[1.0], [-1.0]])}]
    # mean of bin(B_i) = [3, 2]; bin(mean B = [1, 3]) = fp16(sqrt(5)) [1, 1]; the error is
    # ||bin(mean B) - [3, 2]|| / ||[3, 2]|| (||A|| cancels).
    s = torch.tensor(5.0).sqrt().half().item()
    expected = ((s - 3) ** 2 + (s - 2) ** 2) ** 0.5 / 13**0.5
    assert binary_product_error(base2, d2, [1.0, 1.0]) == pytest.approx(expected, abs=1e-12)
