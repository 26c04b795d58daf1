"""``edgetune export`` of a deployed binary adapter (the packed 1-bit folder) on the tiny Llama:
the merge equals the binary model's forward pass, and pte and GGUF pass the parity check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgetune import models
from edgetune.adapters.binary_io import BINARY_WEIGHTS, save_binary_adapter
from edgetune.adapters.lora import adapter_shapes, attach_lora, init_adapter, set_adapter
from edgetune.config import LoraConfig
from edgetune.edge_export.pipeline import ExportOptions, load_merged, run_export, stage_printer

BINARY = LoraConfig(rank=4, kind="binary")
SEQ_LEN = 128


@pytest.fixture(scope="module")
def latent() -> dict[str, torch.Tensor]:
    state = init_adapter(adapter_shapes(models.model_skeleton("tiny"), BINARY), seed=1)
    gen = torch.Generator().manual_seed(2)
    return {k: torch.randn(v.shape, generator=gen) * 0.5 if ".lora_B." in k else v for k, v in state.items()}


@pytest.fixture(scope="module")
def binary_dir(tmp_path_factory: pytest.TempPathFactory, latent: dict[str, torch.Tensor]) -> Path:
    """The deployed form only: adapter_config.json + the packed file (no dense weights)."""
    folder = tmp_path_factory.mktemp("binary")
    save_binary_adapter(folder, latent, BINARY, None, seed=1)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["adapter_config.json", BINARY_WEIGHTS])
    return folder


def test_merged_binary_adapter_matches_the_binary_model(binary_dir: Path, latent, tiny_tokenizer) -> None:
    merged, _ = load_merged("tiny", binary_dir, stage_printer({}, lambda _: None))
    binary = attach_lora(models.tiny_llama(len(tiny_tokenizer)), BINARY)
    set_adapter(binary, latent)
    ids = tiny_tokenizer("exported bits", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, binary(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["pte", "gguf"])
def test_binary_adapter_exports_with_parity(tmp_path: Path, binary_dir: Path, fmt: str) -> None:
    opts = ExportOptions(out=tmp_path, max_seq_len=SEQ_LEN)
    result = run_export("tiny", binary_dir, fmt, opts, new_tokens=4, print_fn=lambda _: None)
    assert result.artefact.exists()
    assert result.parity is not None and result.parity["top1_agreement"] >= 0.99
