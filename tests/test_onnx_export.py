"""ONNX inference export and ONNX Runtime training artefacts on the tiny random Llama.

Parity is checked the way the export pipeline does it: top-1 agreement at every position of
a chat-templated prompt (and equal greedy continuations), and max |logit difference|, against
eager PyTorch in fp32. The training artefacts are built once for the module (about 3 s).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel

from edgetune import models, wire
from edgetune.adapters.lora import attach_lora, get_adapter, set_adapter
from edgetune.adapters.peft_io import save_adapter
from edgetune.client.ort_engine import ORT, select_engine
from edgetune.config import LoraConfig, from_flat
from edgetune.edge_export import onnx_export, ort_trainer, ort_training
from edgetune.edge_export.errors import ExportError
from edgetune.edge_export.pipeline import ExportOptions
from edgetune.lm import summed_loss

PROMPTS = ("What is the capital of France?", "Tell me a joke about robots.")


@contextlib.contextmanager
def _stage(name: str) -> Iterator[None]:
    yield


def _prompt_ids(tokenizer, text: str) -> list[int]:  # noqa: ANN001
    messages = [{"role": "user", "content": text}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def _random_lora(lora: LoraConfig, seed: int = 1) -> PeftModel:
    """Tiny model with a LoRA whose B is non-zero (so the adapter changes the logits)."""
    tokenizer = models.tiny_tokenizer()
    model = attach_lora(models.tiny_llama(len(tokenizer)), lora)
    gen = torch.Generator().manual_seed(seed)
    state = {
        k: (torch.randn(v.shape, generator=gen) * 0.1 if ".lora_B." in k else v) for k, v in get_adapter(model).items()
    }
    set_adapter(model, state)
    return model.eval()


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """(3, 40) right-padded batch; the first 10 positions and the padding carry no label."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (3, 40), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0
    labels = ids.clone()
    labels[:, :10] = -100
    labels[2, 30:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _assert_parity(runner, model, tokenizer) -> None:  # noqa: ANN001
    for text in PROMPTS:
        ids = _prompt_ids(tokenizer, text)
        with torch.no_grad():
            eager = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()  # (T, V)
        exported = runner.sequence_logits(ids)  # (T, V), one graph run
        assert exported.shape == eager.shape
        assert (exported.argmax(-1) == eager.argmax(-1)).all()  # top-1 at every prompt position
        assert np.abs(exported - eager).max() < 1e-4
        np.testing.assert_allclose(runner.next_token_logits(ids), eager[-1], atol=1e-4)
        with torch.no_grad():
            greedy = model.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert runner.generate(ids, 6) == greedy[0, len(ids) :].tolist()


def test_onnx_export_loads_back_with_full_top1_parity(tmp_path: Path) -> None:
    tokenizer = models.tiny_tokenizer()
    model = models.tiny_llama(len(tokenizer))
    model.set_attn_implementation("eager")
    artefact = onnx_export.FORMAT.export(model, tokenizer, ExportOptions(out=tmp_path), _stage)
    assert artefact == tmp_path / onnx_export.MODEL_FILE and (tmp_path / "tokenizer.json").is_file()
    _assert_parity(onnx_export.FORMAT.load(artefact), model, tokenizer)


def test_decoder_graph_batches_padding_and_cache_chunks(tmp_path: Path) -> None:
    """Dynamic axes: a right-padded batch of 3 with an empty cache, and a 4-token chunk after
    a 10-token cache, both match eager logits."""
    tokenizer = models.tiny_tokenizer()
    model = models.tiny_llama(len(tokenizer))
    model.set_attn_implementation("eager")
    runner = onnx_export.OnnxRunner(onnx_export.export_decoder(model, tmp_path / "m.onnx"))
    batch = _batch()
    empty = {i.name: np.zeros((3, i.shape[1], 0, i.shape[3]), np.float32) for i in runner.past}
    feeds = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy(), **empty}
    with torch.no_grad():
        eager = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.numpy()
    real = batch["attention_mask"].bool().numpy()
    assert np.abs(runner.session.run(["logits"], feeds)[0][real] - eager[real]).max() < 1e-4

    ids = batch["input_ids"][0, :14].tolist()
    _, cache = runner.run(ids[:10], None, 10)
    chunk, _ = runner.run(ids[10:], cache, 14)
    assert np.abs(chunk - eager[0, 10:14]).max() < 1e-4


def test_onnx_formats_reject_quantisation(tmp_path: Path) -> None:
    tokenizer = models.tiny_tokenizer()
    for fmt in (onnx_export.FORMAT, ort_training.FORMAT):
        with pytest.raises(ExportError, match="--quantize 8bit"):
            fmt.export(
                models.tiny_llama(len(tokenizer)), tokenizer, ExportOptions(out=tmp_path, quantize="8bit"), _stage
            )


@pytest.fixture(scope="module")
def ort_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[PeftModel, Path]:
    """The ort-training format's folder for a tiny model with a random rank-4 adapter.

    The adapter goes through its PEFT folder and ``attach_adapter``, as in ``edgetune export``.
    """
    lora = LoraConfig(rank=4)
    out = tmp_path_factory.mktemp("ort")
    save_adapter(out / "adapter", get_adapter(_random_lora(lora)), lora, None)
    tokenizer = models.tiny_tokenizer()
    model = ort_training.FORMAT.attach_adapter(models.tiny_llama(len(tokenizer)), out / "adapter")
    folder = ort_training.FORMAT.export(model, tokenizer, ExportOptions(out=out), _stage)
    return model, folder


def test_ort_training_artefacts_and_inference_parity(ort_export: tuple[PeftModel, Path]) -> None:
    model, folder = ort_export
    names = {p.name for p in folder.iterdir()}
    assert {"training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint"} <= names
    assert ort_training.INFERENCE_FILE in names
    _assert_parity(ort_training.FORMAT.load(folder), model, models.tiny_tokenizer())


def test_ort_step_matches_pytorch_step(ort_export: tuple[PeftModel, Path]) -> None:
    """Same batch, same start, fp32: equal loss, and one AdamW step lands on the same adapter."""
    model, folder = ort_export
    start = get_adapter(model)
    batch = _batch()
    trainer = ort_trainer.OrtTrainer(folder, start, learning_rate=1e-2)
    ort_loss, n = trainer.step(batch)
    with torch.no_grad():
        loss_sum, count = summed_loss(model, batch)
    assert n == count and ort_loss == pytest.approx(float(loss_sum) / count, rel=1e-5)

    lr = 1e-2
    params = {n.replace(".default", ""): p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=lr, eps=ort_training.ADAMW_EPS, weight_decay=0.0)
    loss_sum, count = summed_loss(model, batch)
    (loss_sum / count).backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    optimizer.step()
    torch_after, ort_after = get_adapter(model), trainer.adapter()
    set_adapter(model, start)
    for name in start:
        _assert_first_adamw_step_close(ort_after[name], torch_after[name], grads.get(name), lr, start[name])


def _assert_first_adamw_step_close(
    ort: torch.Tensor, ref: torch.Tensor, grad: torch.Tensor | None, lr: float, before: torch.Tensor
) -> None:
    """The tolerance of one AdamW step from the arithmetic, not from one machine's result.

    The first step (bias-corrected, no weight decay) is ``p - lr g / (|g| + eps)``. Both
    engines compute ``g`` in fp32 with a different summation order, an error far below 1% of
    any ``|g| >= 1000 eps`` here; there the step's sensitivity ``lr eps / |g|`` keeps the two
    results within ``lr * 1e-5`` plus fp32 rounding of ``p`` (so 1e-6 + 1e-6 |p|). Where
    ``|g| < 1000 eps`` a last-bit change of ``g`` can move the step anywhere in
    ``[-lr, lr]``, so only ``|difference| <= 2 lr`` holds for every machine. A tensor with no
    gradient (frozen A) must not move at all.
    """
    if grad is None:
        torch.testing.assert_close(ort, before, atol=0.0, rtol=0.0)
        torch.testing.assert_close(ref, before, atol=0.0, rtol=0.0)
        return
    steady = grad.abs() >= 1000 * ort_training.ADAMW_EPS
    bound = torch.where(steady, 1e-6 + 1e-6 * ref.abs(), torch.full_like(ref, 2 * lr + 1e-6))
    diff = (ort - ref).abs()
    assert bool((diff <= bound).all()), f"max excess {float((diff - bound).max()):.3g} ({int(steady.sum())} steady)"
    assert int(steady.sum()) >= steady.numel() // 2, "too few well-conditioned elements for the test to mean much"


def test_ort_steps_lower_loss_and_touch_only_lora_b(ort_export: tuple[PeftModel, Path]) -> None:
    model, folder = ort_export
    start = get_adapter(model)
    trainer = ort_trainer.OrtTrainer(folder, start, learning_rate=1e-2)
    trainable = {n for n, p in trainer.state.parameters if p.requires_grad}
    assert trainable and all(".lora_B." in n for n in trainable)
    batch = _batch()
    before = trainer.eval_loss(batch)
    for _ in range(3):
        trainer.step(batch)
    assert trainer.eval_loss(batch) < before
    after = trainer.adapter()
    assert after.keys() == start.keys()
    for name in start:
        changed = not torch.equal(after[name], start[name])
        assert changed == (".lora_B." in name), name


def test_benchmark_step_reports_both_engines(ort_export: tuple[PeftModel, Path]) -> None:
    model, folder = ort_export
    start = get_adapter(model)
    result = ort_trainer.benchmark_step(model, _batch(), folder, learning_rate=1e-3, repeats=1)
    assert result.ort_seconds > 0 and result.torch_seconds > 0 and result.label_tokens == 30 + 30 + 20
    assert result.ort_loss == pytest.approx(result.torch_loss, rel=1e-5)
    assert all(torch.equal(v, get_adapter(model)[k]) for k, v in start.items())  # adapter restored


def test_peft_name_drops_wrapper_and_adapter_name() -> None:
    onnx_name = "model.base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"
    assert ort_training.peft_name(onnx_name) == "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"


def test_select_engine_node_config_then_ort_devices_then_default() -> None:
    cfg = from_flat({"train.ort-devices": "0,3"})
    assert select_engine(cfg, {wire.PARTITION_ID: 3}) == ORT
    assert select_engine(cfg, {wire.PARTITION_ID: 1}) == "pytorch"
    assert select_engine(cfg, {wire.PARTITION_ID: 1, wire.TRAIN_ENGINE: ORT}) == ORT
    assert select_engine(from_flat({"train.engine": ORT}), {}) == ORT
    with pytest.raises(ValueError, match="train-engine='tensorflow'"):
        select_engine(cfg, {wire.TRAIN_ENGINE: "tensorflow"})
    with pytest.raises(ValueError, match="train.max-grad-norm=1"):
        select_engine(from_flat({"train.max-grad-norm": "1"}), {wire.TRAIN_ENGINE: ORT})


def test_trainer_rejects_an_adapter_of_another_shape(ort_export: tuple[PeftModel, Path]) -> None:
    model, folder = ort_export
    start = get_adapter(model)
    extra = {**start, "base_model.model.model.layers.9.mlp.up_proj.lora_B.weight": torch.zeros(128, 4)}
    with pytest.raises(ValueError, match=r"layers\.9\.mlp\.up_proj"):
        ort_trainer.OrtTrainer(folder, extra, learning_rate=1e-3)


def test_pipeline_hands_ort_training_the_adapter_unmerged(tmp_path: Path) -> None:
    """``edgetune export --format ort-training --adapter A``: the checkpoint starts from A's own B."""
    from onnxruntime.training.api import CheckpointState

    from edgetune.edge_export.pipeline import run_export

    lora = LoraConfig(rank=4)
    adapter = get_adapter(_random_lora(lora))
    save_adapter(tmp_path / "adapter", adapter, lora, None)
    result = run_export("tiny", tmp_path / "adapter", "ort-training", ExportOptions(out=tmp_path), check_parity=False)
    state = CheckpointState.load_checkpoint(str(result.artefact / ort_training.CHECKPOINT_FILE))
    trained = {ort_training.peft_name(n): state.parameters[n].data for n, _ in state.parameters if ".lora_B." in n}
    assert trained.keys() == {k for k in adapter if ".lora_B." in k}
    assert all(np.array_equal(v, adapter[k].numpy()) for k, v in trained.items())
