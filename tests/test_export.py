"""Export pipeline on the tiny Llama: .pte and GGUF export, load back, and match eager PyTorch.

Lowering to ExecuTorch takes tens of seconds even for the tiny model, so the fp32 export runs
once per module (``scope="module"`` fixtures) and several tests read its result; the 4-bit and
Core ML lowerings use a one-layer copy and are marked ``slow``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from edgetune import cli, models
from edgetune.adapters.lora import adapter_shapes, init_adapter
from edgetune.adapters.peft_io import save_adapter
from edgetune.cli import export as export_command
from edgetune.config import LoraConfig
from edgetune.edge_export import executorch_export, gguf_export, parity
from edgetune.edge_export.errors import ExportError
from edgetune.edge_export.pipeline import ExportOptions, ExportResult, formats, load_merged, run_export, stage_printer

# Byte-level test tokenizer: the chat-templated prompts are ~90 tokens.
SEQ_LEN = 128
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 PEFT adapter for the tiny model with non-zero B (so merging changes the logits)."""
    lora = LoraConfig(rank=4)
    state = init_adapter(adapter_shapes(models.model_skeleton("tiny"), lora), seed=1)
    gen = torch.Generator().manual_seed(2)
    state = {k: torch.randn(v.shape, generator=gen) * 0.5 if ".lora_B." in k else v for k, v in state.items()}
    folder = tmp_path_factory.mktemp("adapter")
    save_adapter(folder, state, lora, base_model=None)
    return folder


def _export(tmp: Path, adapter: Path | None, fmt: str, **options: object) -> ExportResult:
    opts = ExportOptions(out=tmp, max_seq_len=SEQ_LEN, **options)
    return run_export("tiny", adapter, fmt, opts, new_tokens=NEW_TOKENS, print_fn=lambda _: None)


@pytest.fixture(scope="module")
def pte_fp32(tmp_path_factory: pytest.TempPathFactory, adapter_dir: Path) -> ExportResult:
    return _export(tmp_path_factory.mktemp("pte"), adapter_dir, "pte")


@pytest.fixture(scope="module")
def gguf_fp32(tmp_path_factory: pytest.TempPathFactory, adapter_dir: Path) -> ExportResult:
    return _export(tmp_path_factory.mktemp("gguf"), adapter_dir, "gguf")


def _silent_stage():
    return stage_printer({}, lambda _: None)


def test_merge_matches_peft_model(adapter_dir: Path) -> None:
    from peft import PeftModel

    merged, _ = load_merged("tiny", adapter_dir, _silent_stage())
    base, _ = models.load_base("tiny")
    base_logits = base(torch.tensor([[5, 6, 7]])).logits
    peft_logits = PeftModel.from_pretrained(base, adapter_dir)(torch.tensor([[5, 6, 7]])).logits
    merged_logits = merged(torch.tensor([[5, 6, 7]])).logits
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-5, rtol=1e-5)
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapter did something


def test_pte_fp32_parity(pte_fp32: ExportResult) -> None:
    report = pte_fp32.parity
    assert pte_fp32.artefact.name == "model.pte" and pte_fp32.artefact.is_file()
    assert (pte_fp32.artefact.parent / parity.PARITY_FILE).is_file()
    assert report["top1_agreement"] == 1.0
    assert report["greedy_match"] == 1.0
    assert report["max_abs_logit_diff"] < 1e-4
    assert report["positions"] > 4 * NEW_TOKENS
    assert set(pte_fp32.seconds) == {"load", "merge", "export", "lower", "serialise", "parity"}


def test_pte_runner_kv_cache_matches_full_forward(pte_fp32: ExportResult, adapter_dir: Path) -> None:
    runner = executorch_export.FORMAT.load(pte_fp32.artefact)
    merged, _ = load_merged("tiny", adapter_dir, _silent_stage())
    ids = [7, 8, 9, 10]
    new = runner.generate(ids, 3)  # prefill, then one token per call through the cache
    sequence = ids + new
    want = merged(torch.tensor([sequence])).logits[0].detach().numpy()
    assert new == [int(t) for t in want[len(ids) - 1 : -1].argmax(-1)]
    np.testing.assert_allclose(runner.next_token_logits(sequence), want[-1], atol=1e-4)


def test_gguf_fp32_parity_and_layout(gguf_fp32: ExportResult) -> None:
    from gguf import GGUFReader

    report = gguf_fp32.parity
    assert report["top1_agreement"] == 1.0 and report["greedy_match"] == 1.0
    assert report["max_abs_logit_diff"] < 1e-4
    reader = GGUFReader(gguf_fp32.artefact)
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight", "output_norm.weight"} <= names
    assert "output.weight" not in names  # tied embeddings, as llama.cpp writes them
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"


def test_gguf_tokenizer_round_trips(gguf_fp32: ExportResult, tiny_tokenizer) -> None:
    loaded = AutoTokenizer.from_pretrained(gguf_fp32.artefact.parent, gguf_file=gguf_fp32.artefact.name)
    assert parity.encode_prompts(loaded) == parity.encode_prompts(tiny_tokenizer)
    assert loaded.eos_token == tiny_tokenizer.eos_token


def test_permute_interleaves_rotary_halves() -> None:
    # One head of dim 4 (rows 0..3): halves (0, 1 | 2, 3) interleave to 0, 2, 1, 3.
    weight = np.arange(8, dtype=np.float32).reshape(4, 2)
    np.testing.assert_array_equal(gguf_export._permute(weight, n_heads=1)[:, 0], [0, 4, 2, 6])


@pytest.mark.parametrize(("float_type", "quantize"), [("f16", "none"), ("f32", "8bit")])
def test_gguf_half_and_q8_export(tmp_path: Path, float_type: str, quantize: str) -> None:
    result = _export(tmp_path, None, "gguf", float_type=float_type, quantize=quantize)
    assert result.parity["top1_agreement"] > 0.9  # reported, not required to be exact
    assert result.parity["max_abs_logit_diff"] < 0.5


@pytest.fixture(scope="module")
def one_layer_base(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local Hugging Face folder holding a 1-layer tiny Llama (half the lowering time)."""
    folder = tmp_path_factory.mktemp("one-layer")
    tokenizer = models.tiny_tokenizer()
    model = models.tiny_llama(len(tokenizer))
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow  # ~25 s of lowering even for one layer
def test_pte_4bit_exports_and_runs(tmp_path: Path, one_layer_base: str) -> None:
    opts = ExportOptions(out=tmp_path, max_seq_len=SEQ_LEN, quantize="4bit")
    result = run_export(one_layer_base, None, "pte", opts, new_tokens=NEW_TOKENS, print_fn=lambda _: None)
    report = result.parity
    assert 0.0 <= report["top1_agreement"] <= 1.0 and report["new_tokens"] == 4 * NEW_TOKENS
    assert np.isfinite(report["max_abs_logit_diff"])
    assert executorch_export.PteRunner(result.artefact).generate([1, 2, 3], 2) != []


@pytest.mark.slow  # ~25 s: coremltools converts every partition
def test_coreml_lowers_here_and_skips_parity_with_the_reason(tmp_path: Path, one_layer_base: str) -> None:
    opts = ExportOptions(out=tmp_path, max_seq_len=SEQ_LEN, backend="coreml")
    result = run_export(one_layer_base, None, "pte", opts, new_tokens=NEW_TOKENS, print_fn=lambda _: None)
    assert result.artefact.is_file() and result.artefact.stat().st_size > 0
    assert "Core ML" in result.parity["skipped"] and "macOS/iOS" in result.parity["skipped"]
    assert "top1_agreement" not in result.parity


def test_qnn_without_sdk_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    code = cli.main(["export", "--base", "tiny", "--format", "pte", "--backend", "qnn", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("edgetune export: --backend qnn needs the Qualcomm AI Engine Direct (QNN) SDK")
    assert "\n" not in err


@pytest.mark.parametrize(
    ("fmt", "options", "message"),
    [
        ("pte", {"quantize": "4bit", "backend": "portable"}, "--backend xnnpack only"),
        ("pte", {"float_type": "f16"}, "f32 weights"),
        ("gguf", {"quantize": "4bit"}, "Q8_0"),
    ],
)
def test_unsupported_choices_fail_before_loading(tmp_path: Path, fmt: str, options: dict, message: str) -> None:
    with pytest.raises(ExportError, match=message) as info:
        formats()[fmt].check_options(ExportOptions(out=tmp_path, **options))
    assert info.value.bad_choice


def test_bad_format_and_options(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--format 'tflite'"):
        run_export("tiny", None, "tflite", ExportOptions(out=tmp_path))
    with pytest.raises(ExportError, match="--quantize '2bit'"):
        ExportOptions(out=tmp_path, quantize="2bit")


def test_too_short_cache_names_the_needed_length(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="--max-seq-len 64 is too short"):
        run_export("tiny", None, "gguf", ExportOptions(out=tmp_path, max_seq_len=64), print_fn=lambda _: None)


def test_non_llama_architecture_is_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "gpt2"
    tokenizer = models.tiny_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with pytest.raises(ExportError, match="'gpt2' model; the exporters handle llama only"):
        run_export(str(folder), None, "pte", ExportOptions(out=tmp_path / "out"), print_fn=lambda _: None)


def test_rope_scaling_is_rejected_by_gguf() -> None:
    model = models.tiny_llama(259)
    model.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0}
    with pytest.raises(ExportError, match="RoPE type 'llama3'"):
        gguf_export._check_architecture(model)


def test_adapter_that_does_not_fit_is_rejected(tmp_path: Path) -> None:
    lora = LoraConfig(rank=4)
    shapes = adapter_shapes(models.model_skeleton("tiny"), lora)
    wrong = {k: torch.zeros(shape[0] + 1, *shape[1:]) for k, shape in shapes.items()}
    save_adapter(tmp_path / "bad", wrong, lora, base_model=None)
    with pytest.raises(ExportError, match="does not fit this base model"):
        load_merged("tiny", tmp_path / "bad", _silent_stage())


def test_cli_lists_the_exporters_backends_and_formats() -> None:
    assert list(export_command._BACKENDS) == list(executorch_export.BACKENDS)
    assert set(export_command._FORMATS) == set(formats())


@pytest.mark.slow  # reads SmolLM2's tokenizer and its source GGUF (~10 s)
def test_smollm2_tokenizer_fields_match_the_source_gguf() -> None:
    from gguf import GGUFReader

    try:
        tokenizer = AutoTokenizer.from_pretrained(models.resolve_base("smollm2"))
        reader = GGUFReader(models.embedded_gguf())
    except models.ModelError as err:
        pytest.skip(f"embedded SmolLM2 not installed: {err}")
    fields = gguf_export.tokenizer_fields(tokenizer, 49152)

    def values(key: str) -> list:
        field = reader.fields[key]
        return [field.parts[i] for i in field.data]

    assert fields["tokens"] == [bytes(v).decode() for v in values("tokenizer.ggml.tokens")]
    assert fields["merges"] == [bytes(v).decode() for v in values("tokenizer.ggml.merges")]
    assert [int(t) for t in fields["types"]] == [int(v[0]) for v in values("tokenizer.ggml.token_type")]
    assert fields["pre"] == "smollm"


def test_eager_generate_is_plain_argmax_through_eos() -> None:
    model = models.tiny_llama(259)
    ids = [5, 6, 7, 8]
    sequence = list(ids)
    for _ in range(6):
        sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    model.generation_config.eos_token_id = sequence[len(ids)]  # the first greedy token is "EOS"
    assert parity.EagerRunner(model).generate(ids, 6) == sequence[len(ids) :]


def test_stage_keeps_library_warnings_off_the_console(capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    warned: list[str] = []
    stage = stage_printer({}, lines.append, warned)
    with stage("lower"):
        for _ in range(3):
            warnings.warn("a note about a library's internals\nsecond line", UserWarning, stacklevel=1)
    with stage("parity"):
        warnings.warn("another", FutureWarning, stacklevel=1)
    assert warned == [
        "lower: UserWarning: a note about a library's internals",
        "parity: FutureWarning: another",
    ]
    assert lines == ["[4/6] lower ...", lines[1], "[6/6] parity ...", lines[3]]
    assert capsys.readouterr().err == ""
