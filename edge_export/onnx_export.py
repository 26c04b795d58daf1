"""The ``onnx`` export format: the merged fp32 model as one ONNX graph, run by ONNX Runtime.

Stages (inside the pipeline's export / lower / serialise)::

    export     trace ``(input_ids, attention_mask) -> logits`` with the TorchScript-based
               exporter (opset 17, eager attention, dynamic batch and sequence axes)
    lower      check the graph (onnx.checker, shape inference) and let ONNX Runtime build an
               optimised session from it once, so that a broken graph fails here
    serialise  ``model.onnx`` (weights inside, < 2 GB for the models we ship) + tokenizer files

Why this exporter: onnxruntime-training 1.19.2 needs onnx 1.17 (opset <= 21 is fine), and the
TorchScript exporter traces transformers' Llama with an explicit attention mask and dynamic
shapes in about a second for the tiny model; the same graph builder serves the on-device
training artefacts (``edge_export/ort_training.py``).

The graph has no KV cache: :class:`OnnxRunner` re-runs the whole sequence for every new token
(O(T^2) per generated sequence). That keeps one graph for prompt and decode and is exact; it
is slower than a cached decoder for long outputs, which the parity table's tokens/s shows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from edge_export.errors import ExportError

if TYPE_CHECKING:
    import onnxruntime

    from edge_export.pipeline import ExportOptions, Stage

__all__ = [
    "FORMAT",
    "MODEL_FILE",
    "OPSET",
    "OnnxFormat",
    "OnnxRunner",
    "export_graph",
    "inference_session",
    "session_options",
]

OPSET = 17
MODEL_FILE = "model.onnx"
INPUTS = ("input_ids", "attention_mask")
_DYNAMIC = {0: "batch", 1: "sequence"}


class LogitsGraph(nn.Module):
    """What the inference graph computes: ``(B, T)`` ids and mask -> ``(B, T, V)`` fp32 logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()


def _example_inputs(module: nn.Module, names: tuple[str, ...]) -> tuple[Tensor, ...]:
    """A (2, 12) right-padded example batch: two rows, so no axis is traced as a constant 1."""
    ids = torch.arange(24, dtype=torch.long).reshape(2, 12) % 200 + 1
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[:, :4] = -100
    by_name = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return tuple(by_name[n] for n in names)


def export_graph(
    module: nn.Module, path: Path, input_names: tuple[str, ...], output_names: tuple[str, ...], *, training: bool
) -> Path:
    """Trace ``module`` to an ONNX file with dynamic batch and sequence axes on every input.

    Args:
        module: takes ``input_names`` (int64 ``(B, T)`` tensors) positionally.
        path: the ``.onnx`` file to write.
        input_names: graph input names, in ``forward`` order.
        output_names: graph output names (logits get dynamic ``(B, T)`` axes; a loss is a scalar).
        training: export for ONNX Runtime training (no constant folding, parameters kept as
            named initializers so gradients can be built for them).

    Returns:
        ``path``.

    Raises:
        ExportError: the tracer could not export the model (its first message line).
    """
    dynamic = {n: _DYNAMIC for n in input_names} | {n: _DYNAMIC for n in output_names if n == "logits"}
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    model = getattr(module, "model", module)
    was_training = model.training
    model.train(training)
    try:
        with warnings.catch_warnings():
            # The tracer warns about every Python-side shape check in transformers' Llama; the
            # shapes it freezes are the mask-padding branches, which the dynamic-shape check
            # in the tests covers. The legacy exporter's own deprecation notice is not ours.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            # Boolean-mask indexing (the loss's label positions) becomes NonZero + Gather, whose
            # indices are never negative, which is the case this warning is about.
            warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
            torch.onnx.export(
                module,
                _example_inputs(module, input_names),
                str(path),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic,
                opset_version=OPSET,
                dynamo=False,
                training=mode,
                do_constant_folding=not training,
                export_params=True,
            )
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"ONNX export of {type(model).__name__} failed: {first}", bad_choice=False) from err
    finally:
        model.train(was_training)
    return path


def session_options() -> onnxruntime.SessionOptions:
    """ONNX Runtime CPU session options: quiet logging, worker threads that sleep when idle.

    ORT's intra-op threads spin between calls by default, which starves PyTorch (and other
    processes) on a small CPU; a device runs both engines side by side.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about every unused traced constant
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def inference_session(path: Path) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session for ``path`` (all graph optimisations)."""
    import onnxruntime

    options = session_options()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_graph(path: Path) -> None:
    """Validate the ONNX file and build a session once (what the ``lower`` stage does).

    Raises:
        ExportError: the checker or ONNX Runtime rejects the graph.
    """
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        inference_session(path)
    except Exception as err:  # onnx and ORT raise their own unrelated exception types
        raise ExportError(f"{path.name} is not a valid ONNX Runtime graph: {err}", bad_choice=False) from err


class OnnxRunner:
    """Greedy decoding with an ONNX logits graph (batch 1, full recompute per token)."""

    def __init__(self, path: Path) -> None:
        self.session = inference_session(path)

    def sequence_logits(self, ids: list[int]) -> np.ndarray:
        """(T, vocab) fp32 logits at every position of ``ids`` (one graph run)."""
        batch = np.asarray([ids], dtype=np.int64)  # (1, T)
        feeds = {"input_ids": batch, "attention_mask": np.ones_like(batch)}
        return self.session.run(["logits"], feeds)[0][0].astype(np.float32)

    def next_token_logits(self, ids: list[int]) -> np.ndarray:
        """(vocab,) fp32 logits for the token after ``ids``."""
        return self.sequence_logits(ids)[-1]

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Exactly ``max_new_tokens`` greedy new ids after ``ids`` (no stop at EOS)."""
        seq = list(ids)
        for _ in range(max_new_tokens):
            seq.append(int(np.argmax(self.next_token_logits(seq))))
        return seq[len(ids) :]


def reject_unsupported(name: str, opts: ExportOptions) -> None:
    """The ONNX formats export fp32 weights only.

    Raises:
        ExportError: ``opts.quantize`` is not ``none`` or ``opts.float_type`` is not ``f32``.
    """
    if opts.quantize != "none":
        raise ExportError(f"--quantize {opts.quantize} is not supported by --format {name}; use --format pte for it")
    if opts.float_type != "f32":
        raise ExportError(f"--float-type {opts.float_type} is not supported by --format {name} (fp32 only)")


def _write_atomically(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(src, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(dest)


class OnnxFormat:
    """``--format onnx``: merged fp32 model -> ``model.onnx`` for ONNX Runtime inference."""

    name = "onnx"

    def export(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, opts: ExportOptions, stage: Stage) -> Path:
        """Write ``opts.out / model.onnx`` (and the tokenizer beside it); return its path.

        Raises:
            ExportError: ``opts.quantize`` is not ``none``, or the export/check failed.
        """
        reject_unsupported(self.name, opts)
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            traced = Path(tmp) / MODEL_FILE
            with stage("export"):
                export_graph(LogitsGraph(model), traced, INPUTS, ("logits",), training=False)
            with stage("lower"):
                check_graph(traced)
            with stage("serialise"):
                _write_atomically(traced, out / MODEL_FILE)
                tokenizer.save_pretrained(out)
        return out / MODEL_FILE

    def check_options(self, opts: ExportOptions) -> None:
        """Reject quantisation and fp16 before the model loads (see :func:`reject_unsupported`)."""
        reject_unsupported(self.name, opts)

    def load(self, artefact: Path) -> OnnxRunner:
        """A runner over ``model.onnx``."""
        return OnnxRunner(Path(artefact))


FORMAT = OnnxFormat()
