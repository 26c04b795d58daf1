"""Tests for adapters/peft_io.py: adapter folders round-trip, load in PEFT itself with the same
logits as our attach+set path (parity), and writes are atomic and errors name the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file

from edgetune.adapters.lora import attach_lora, set_adapter
from edgetune.adapters.peft_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter
from edgetune.config import LoraConfig
from edgetune.fileio import atomic_save, load_tensors
from edgetune.models import tiny_llama


def _random_adapter(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * 0.2 for k, s in sorted(shapes.items())}


def test_save_and_load_adapter_round_trip(tmp_path: Path, tiny_shapes, lora_cfg: LoraConfig) -> None:
    state = _random_adapter(tiny_shapes)
    save_adapter(tmp_path / "adapter", state, lora_cfg, base_model="tiny")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    loaded = load_adapter(tmp_path / "adapter")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_saved_config_describes_the_adapter(tmp_path: Path, tiny_shapes) -> None:
    lora = LoraConfig(rank=4, alpha=8.0, targets=("v_proj", "q_proj"))
    save_adapter(tmp_path, _random_adapter(tiny_shapes), lora, base_model="some/base")
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "some/base"
    assert config["lora_dropout"] == 0.0


def test_saved_folder_loads_in_peft_with_identical_logits(
    tmp_path: Path, tiny_shapes, lora_cfg: LoraConfig, tiny_tokenizer
) -> None:
    vocab = len(tiny_tokenizer)
    state = _random_adapter(tiny_shapes, seed=4)
    save_adapter(tmp_path, state, lora_cfg, base_model="tiny")

    ours = attach_lora(tiny_llama(vocab), lora_cfg)
    set_adapter(ours, state)
    theirs = PeftModel.from_pretrained(tiny_llama(vocab), tmp_path).eval()
    base = tiny_llama(vocab)

    ids = tiny_tokenizer("federated hello", return_tensors="pt").input_ids
    with torch.no_grad():
        ours_logits, theirs_logits, base_logits = (m(input_ids=ids).logits for m in (ours, theirs, base))
    torch.testing.assert_close(theirs_logits, ours_logits, rtol=0, atol=1e-6)
    assert (ours_logits - base_logits).abs().max() > 1e-3  # the adapter does change the output

    out = theirs.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    assert out.shape[0] == 1 and ids.shape[1] < out.shape[1] <= ids.shape[1] + 4
    assert torch.equal(out[:, : ids.shape[1]], ids)


def test_atomic_save_leaves_only_the_target(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.safetensors"
    atomic_save({"w": torch.arange(6.0).reshape(2, 3).t()}, path, metadata={"version": "3"})  # non-contiguous
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]
    assert torch.equal(load_tensors(path)["w"], torch.arange(6.0).reshape(2, 3).t())


def test_atomic_save_failure_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    atomic_save({"w": torch.ones(2)}, path)
    shared = torch.zeros(4)
    with pytest.raises(RuntimeError):  # safetensors refuses tensors that share memory
        atomic_save({"a": shared, "b": shared}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
    assert torch.equal(load_tensors(path)["w"], torch.ones(2))


@pytest.mark.parametrize(
    "content",
    [b"", b"not a safetensors file at all", b"\xff" * 64],
)
def test_load_tensors_names_a_corrupt_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.safetensors"):
        load_tensors(path)


def test_load_tensors_names_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_tensors(path)


def test_load_tensors_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_tensors(tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError):
        load_adapter(tmp_path)
