"""The ``ort-training`` format: ONNX Runtime on-device training artefacts for the LoRA adapter.

Stages (inside the pipeline's export / lower / serialise)::

    export     trace ``(input_ids, attention_mask, labels) -> loss`` of the base model with the
               LoRA adapter attached (not merged), for training (no constant folding)
    lower      ``onnxruntime.training.artifacts.generate_artifacts``: gradient graph for the
               trainable LoRA tensors only (B by default, A and B with lora.train-a), the eval
               graph, an AdamW optimizer graph and the parameter checkpoint
    serialise  those four files, plus ``inference_model.onnx`` (the KV-cache decoder graph of
               ``onnx_export``, adapter unmerged, for generation and the parity check) and
               the tokenizer, in one folder

The loss is exactly the device's PyTorch loss (``edgetune.lm.summed_loss`` divided by the
label-token count, computed in the graph): next-token cross-entropy over positions whose label
is not -100, the LM head run on those positions only. ORT CPU training runs in fp32 (no bf16
autocast); the PyTorch device path defaults to bf16.

Parameter names: the checkpoint names a tensor ``model.<PEFT module name>`` (e.g.
``model.base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight``);
:func:`peft_name` maps it to the adapter-file name the federation exchanges.

Running the artefacts (a training session, the ORT-vs-PyTorch step benchmark) is
``edge_export/ort_trainer.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from edgetune.chat import IGNORE_INDEX
from edgetune.edge_export.errors import ExportError
from edgetune.edge_export.onnx_export import (
    OnnxRunner,
    check_graph,
    export_decoder,
    reject_unsupported,
    trace,
)
from edgetune.lm import label_mask, summed_loss

if TYPE_CHECKING:
    from edgetune.edge_export.options import ExportOptions, Stage

__all__ = [
    "CHECKPOINT_FILE",
    "EVAL_FILE",
    "FORMAT",
    "INFERENCE_FILE",
    "INPUTS",
    "MANIFEST_FILE",
    "OPTIMIZER_FILE",
    "TRAINING_FILE",
    "OrtTrainingFormat",
    "build_artifacts",
    "label_tokens",
    "peft_name",
]

ADAPTER_NAME = "default"
TRAINING_FILE = "training_model.onnx"
EVAL_FILE = "eval_model.onnx"
OPTIMIZER_FILE = "optimizer_model.onnx"
CHECKPOINT_FILE = "checkpoint"
INFERENCE_FILE = "inference_model.onnx"
MANIFEST_FILE = "artifacts.json"
INPUTS = ("input_ids", "attention_mask", "labels")
_DYNAMIC = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
ADAMW_EPS = 1e-8
"""torch.optim.AdamW's default epsilon (ORT's AdamW block defaults to 1e-6)."""


class LossGraph(nn.Module):
    """``(B, T)`` ids, mask, labels -> scalar mean cross-entropy per label token.

    Same maths as the device's PyTorch step (``summed_loss / n``); the token count is a graph
    tensor (not a traced constant), clamped to 1 so a batch without labels gives 0, not NaN.
    """

    def __init__(self, model: PeftModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        loss_sum, _ = summed_loss(self.model, batch)
        count = label_mask(batch).sum().clamp(min=1)
        return loss_sum / count


def _example_batch() -> tuple[Tensor, Tensor, Tensor]:
    """A (2, 12) right-padded batch with unlabelled prompt positions (the trace's example)."""
    ids = torch.arange(24, dtype=torch.long).reshape(2, 12) % 200 + 1
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    labels[:, :4] = IGNORE_INDEX
    return ids, mask, labels


def peft_name(onnx_name: str) -> str:
    """The adapter-file name of a checkpoint parameter.

    Example:
        >>> peft_name("model.base_model.model.model.layers.0.mlp.up_proj.lora_B.default.weight")
        'base_model.model.model.layers.0.mlp.up_proj.lora_B.weight'
    """
    return onnx_name.removeprefix("model.").replace(f".{ADAPTER_NAME}.", ".")


def label_tokens(labels: np.ndarray) -> int:
    """Positions that carry a next-token label (what the loss averages over)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Trace with eager attention (the exporter's explicit-mask path), then restore the setting."""
    config = model.config
    before = config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@contextlib.contextmanager
def _quiet_ort_builder() -> Iterator[None]:
    """Hold back the gradient builder's native log lines; replay them if the build fails.

    ORT 1.19's ``GradientGraphBuilder`` logs every graph pass at INFO straight to the process's
    stderr (file descriptor 2) and takes no logging option through ``generate_artifacts``;
    ``onnxblock`` also logs at INFO on Python's root logger.
    """
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            logger.setLevel(level)


def trace_training_graph(model: PeftModel, path: Path) -> list[str]:
    """Export the loss graph of ``model`` and return the trainable parameters' graph names.

    Trainable = ``requires_grad`` on the PEFT model (``adapters.lora.attach_lora`` sets it:
    LoRA B, plus A in both-factor mode).

    Raises:
        ExportError: the model has no trainable LoRA tensor, or the trace failed.
    """
    trainable = [f"model.{n}" for n, p in model.named_parameters() if p.requires_grad]
    if not trainable or not all(".lora_" in n for n in trainable):
        raise ExportError(f"ort-training needs trainable LoRA tensors only; found {trainable[:3] or 'none'}")
    with _eager_attention(model.get_base_model()), torch.enable_grad():
        trace(LossGraph(model), _example_batch(), path, list(INPUTS), ["loss"], _DYNAMIC, training=True)
    return trainable


def _use_torch_adamw(path: Path) -> None:
    """Switch the optimizer graph's AdamW node to PyTorch's formula (``adam_mode=0``).

    ORT's AdamW block hard-codes ``adam_mode=1`` (Hugging Face's AdamW, whose epsilon sits
    outside the bias correction: on the first step it acts about 30x larger), so tiny
    gradients would move differently from the PyTorch device path's ``torch.optim.AdamW``.
    """
    import onnx

    graph = onnx.load(str(path))
    nodes = [n for n in graph.graph.node if n.op_type == "AdamWOptimizer"]
    if len(nodes) != 1:
        raise ExportError(f"{path.name}: expected one AdamWOptimizer node, found {len(nodes)}", bad_choice=False)
    for attribute in nodes[0].attribute:
        if attribute.name == "adam_mode":
            attribute.i = 0
    onnx.save(graph, str(path))


def build_artifacts(model: PeftModel, out: Path) -> Path:
    """Write training, eval and AdamW optimizer graphs and the checkpoint for ``model``'s LoRA.

    Args:
        model: a base model with the LoRA adapter attached (PEFT, not merged).
        out: folder to write (created; files are replaced).

    Returns:
        ``out``.

    Raises:
        ExportError: see :func:`trace_training_graph`; or ONNX Runtime could not build the
            gradient graph.
    """
    import onnx
    from onnxruntime.training import artifacts, onnxblock

    out.mkdir(parents=True, exist_ok=True)
    traced = out / "loss_model.onnx"
    trainable = trace_training_graph(model, traced)
    graph = onnx.load(str(traced))
    names = [t.name for t in graph.graph.initializer]
    missing = sorted(set(trainable) - set(names))
    if missing:
        raise ExportError(f"the traced graph lost trainable tensor {missing[0]}", bad_choice=False)
    frozen = [n for n in names if n not in set(trainable)]
    try:
        with _quiet_ort_builder():
            artifacts.generate_artifacts(
                graph,
                requires_grad=trainable,
                frozen_params=frozen,
                loss=None,  # the graph's output already is the loss
                optimizer=onnxblock.optim.AdamW(eps=ADAMW_EPS, weight_decay=0.0),
                artifact_directory=out,
            )
    except RuntimeError as err:
        raise ExportError(f"onnxruntime could not build training artefacts: {err}", bad_choice=False) from err
    traced.unlink()
    _use_torch_adamw(out / OPTIMIZER_FILE)
    manifest = {"trainable": [peft_name(n) for n in trainable], "inputs": list(INPUTS), "precision": "fp32"}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


class OrtTrainingFormat:
    """``--format ort-training``: LoRA training artefacts + an inference graph, in one folder.

    ``keeps_adapter``: the pipeline should hand :meth:`export` the base model with the adapter
    attached, not merged (:meth:`attach_adapter`). Given a plain model (adapter merged or
    none), a fresh default LoRA (rank 8, all projections, B zero) is attached in place, so
    that the device goes on learning on top of the merged weights.
    """

    name = "ort-training"
    keeps_adapter = True

    def export(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, opts: ExportOptions, stage: Stage) -> Path:
        """Write the artefact folder ``opts.out / ort-training`` and return it.

        Raises:
            ExportError: ``opts.quantize`` is not ``none``, or a build step failed.
        """
        reject_unsupported(self.name, opts)
        peft_model = model if isinstance(model, PeftModel) else _fresh_lora(model)
        folder = Path(opts.out) / self.name
        staging = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with stage("export"), _eager_attention(peft_model.get_base_model()):
            export_decoder(peft_model, staging / INFERENCE_FILE)
        with stage("lower"):
            build_artifacts(peft_model, staging)
            check_graph(staging / INFERENCE_FILE)
        with stage("serialise"):
            tokenizer.save_pretrained(staging)
            shutil.rmtree(folder, ignore_errors=True)
            staging.replace(folder)
        return folder

    def attach_adapter(self, model: nn.Module, adapter: Path | None) -> PeftModel:
        """``model`` with the PEFT adapter folder ``adapter`` attached, not merged, LoRA B trainable.

        What :meth:`export` should receive in place of the merged model. ``None`` attaches a
        fresh default LoRA (B zero).

        Raises:
            ExportError: ``adapter`` is not a PEFT adapter folder that fits ``model``.
        """
        if adapter is None:
            return _fresh_lora(model)
        try:
            peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        except (ValueError, KeyError, RuntimeError, OSError) as err:
            raise ExportError(f"--adapter {adapter} does not fit this base model: {err}") from err
        for name, param in peft_model.named_parameters():
            param.requires_grad = ".lora_B." in name  # the federation's default: A frozen from the seed
        return peft_model.eval()

    def check_options(self, opts: ExportOptions) -> None:
        """Reject quantisation and fp16 before the model loads (ORT trains in fp32)."""
        reject_unsupported(self.name, opts)

    def load(self, artefact: Path) -> OnnxRunner:
        """A runner over the folder's inference graph (same weights as the training checkpoint)."""
        return OnnxRunner(Path(artefact) / INFERENCE_FILE)


def _fresh_lora(model: nn.Module) -> PeftModel:
    from edgetune.adapters.lora import attach_lora
    from edgetune.config import LoraConfig

    return attach_lora(model, LoraConfig())


FORMAT = OrtTrainingFormat()
