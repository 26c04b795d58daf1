"""The ``onnx`` export format: the merged fp32 model as one ONNX decoder graph with a KV cache.

Stages (inside the pipeline's export / lower / serialise)::

    export     trace :class:`DecoderGraph` ``(input_ids, attention_mask, past.*) -> (logits,
               present.*)`` with the TorchScript-based exporter (opset 17, eager attention,
               dynamic batch, new-token and cache-length axes)
    lower      check the graph (onnx.checker) and let ONNX Runtime build an optimised
               session from it once, so that a broken graph fails here
    serialise  ``model.onnx`` (weights inside, < 2 GB for the models we ship) + tokenizer files

Why this exporter: onnxruntime-training 1.19.2 needs onnx 1.17 (opset <= 21 is fine), and the
TorchScript exporter traces transformers' Llama with an explicit attention mask and dynamic
shapes in about a second for the tiny model; the same :func:`trace` serves the on-device
training artefacts (``edge_export/ort_training.py``).

One graph does prefill and decode: the prompt goes in with an empty cache (length 0), then
each new token with the cache the previous call returned (:class:`OnnxRunner`).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from edgetune.edge_export.errors import ExportError
from edgetune.fileio import atomic_copy

if TYPE_CHECKING:
    import onnxruntime

    from edgetune.edge_export.options import ExportOptions, Stage

__all__ = [
    "FORMAT",
    "MODEL_FILE",
    "OPSET",
    "OnnxFormat",
    "OnnxRunner",
    "DecoderGraph",
    "cache_names",
    "export_decoder",
    "trace",
    "inference_session",
    "session_options",
]

OPSET = 17
MODEL_FILE = "model.onnx"
INPUTS = ("input_ids", "attention_mask")


class DecoderGraph(nn.Module):
    """The inference graph: new tokens + KV cache in, logits + grown KV cache out.

    Inputs: ``input_ids`` (B, T_new), ``attention_mask`` (B, T_past + T_new), and per layer i
    ``past.i.key`` / ``past.i.value`` (B, kv_heads, T_past, head_dim). Outputs: ``logits``
    (B, T_new, V) fp32 and ``present.i.key`` / ``present.i.value`` (B, kv_heads, T_past +
    T_new, head_dim). A prompt is one call with ``T_past = 0``; each decoded token is one call
    with ``T_new = 1``, feeding the presents back as pasts.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_layers = int(model.config.num_hidden_layers)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits.float(), *present)


def cache_names(prefix: str, num_layers: int) -> list[str]:
    """``past.0.key, past.0.value, past.1.key, ...`` (or ``present.*``)."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def _cache_shape(config: Any) -> tuple[int, int]:
    """(kv_heads, head_dim) of a Llama config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(config.num_key_value_heads), int(head_dim)


def export_decoder(model: nn.Module, path: Path) -> Path:
    """Trace :class:`DecoderGraph` of ``model`` (fp32, eval) to ``path``; see :func:`trace`.

    The example call is batch 2, 5 cached + 3 new tokens, so that no axis is traced as 1.
    """
    graph = DecoderGraph(model)
    kv_heads, head_dim = _cache_shape(model.config)
    ids = torch.arange(6, dtype=torch.long).reshape(2, 3) + 1
    mask = torch.ones(2, 8, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    past = [torch.randn(2, kv_heads, 5, head_dim, generator=gen) for _ in range(2 * graph.num_layers)]
    inputs, outputs = cache_names("past", graph.num_layers), cache_names("present", graph.num_layers)
    dynamic = {"input_ids": {0: "batch", 1: "new"}, "attention_mask": {0: "batch", 1: "total"}}
    dynamic |= {"logits": {0: "batch", 1: "new"}}
    dynamic |= {n: {0: "batch", 2: "past"} for n in inputs} | {n: {0: "batch", 2: "total"} for n in outputs}
    return trace(graph, (ids, mask, *past), path, [*INPUTS, *inputs], ["logits", *outputs], dynamic, training=False)


def trace(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    *,
    training: bool,
) -> Path:
    """Trace ``module(*args)`` to an ONNX file with the TorchScript exporter (opset 17).

    Args:
        module: a wrapper whose ``.model`` is the transformers model (put in train or eval
            mode for the trace, then restored).
        args: example inputs, positionally.
        path: the ``.onnx`` file to write.
        input_names: graph input names, in ``forward`` order.
        output_names: graph output names.
        dynamic_axes: per name, axis -> symbolic dimension name.
        training: export for ONNX Runtime training (no constant folding, parameters kept as
            named initializers so gradients can be built for them).

    Returns:
        ``path``.

    Raises:
        ExportError: the tracer could not export the model (its first message line).
    """
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    model = getattr(module, "model", module)
    was_training = model.training
    model.train(training)
    try:
        with warnings.catch_warnings():
            # The tracer warns about every Python-side shape check in transformers' Llama; the
            # shapes it freezes are the mask-padding branches, which the dynamic-shape tests
            # cover. The legacy exporter's own deprecation notice is not ours.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            # Boolean-mask indexing (the loss's label positions) becomes NonZero + Gather, whose
            # indices are never negative, which is the case this warning is about.
            warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
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
    """Greedy decoding with a :class:`DecoderGraph` file (batch 1, KV cache between tokens)."""

    def __init__(self, path: Path) -> None:
        self.session = inference_session(path)
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past.")]
        self.present = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]

    def run(self, new: list[int], cache: dict[str, np.ndarray] | None, total: int) -> tuple[np.ndarray, dict]:
        """Logits (T_new, V) for ``new`` after ``cache`` (None: empty), and the grown cache."""
        if cache is None:  # (1, kv_heads, 0, head_dim) per tensor: nothing cached yet
            cache = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in self.past}
        feeds = {"input_ids": np.asarray([new], np.int64), "attention_mask": np.ones((1, total), np.int64), **cache}
        logits, *present = self.session.run(["logits", *self.present], feeds)
        grown = {name.replace("present.", "past.", 1): t for name, t in zip(self.present, present, strict=True)}
        return logits[0].astype(np.float32), grown

    def sequence_logits(self, ids: list[int]) -> np.ndarray:
        """(T, vocab) fp32 logits at every position of ``ids`` (one prefill call)."""
        return self.run(ids, None, len(ids))[0]

    def next_token_logits(self, ids: list[int]) -> np.ndarray:
        """(vocab,) fp32 logits for the token after ``ids``."""
        return self.sequence_logits(ids)[-1]

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Exactly ``max_new_tokens`` greedy new ids after ``ids`` (no stop at EOS)."""
        logits, cache = self.run(ids, None, len(ids))
        new: list[int] = []
        while True:
            new.append(int(np.argmax(logits[-1])))
            if len(new) == max_new_tokens:
                return new
            logits, cache = self.run(new[-1:], cache, len(ids) + len(new))


def reject_unsupported(name: str, opts: ExportOptions) -> None:
    """The ONNX formats export fp32 weights only.

    Raises:
        ExportError: ``opts.quantize`` is not ``none`` or ``opts.float_type`` is not ``f32``.
    """
    if opts.quantize != "none":
        raise ExportError(f"--quantize {opts.quantize} is not supported by --format {name}; use --format pte for it")
    if opts.float_type != "f32":
        raise ExportError(f"--float-type {opts.float_type} is not supported by --format {name} (fp32 only)")


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
                export_decoder(model, traced)
            with stage("lower"):
                check_graph(traced)
            with stage("serialise"):
                atomic_copy(traced, out / MODEL_FILE)
                tokenizer.save_pretrained(out)
        return out / MODEL_FILE

    def check_options(self, opts: ExportOptions) -> None:
        """Reject quantisation and fp16 before the model loads (see :func:`reject_unsupported`)."""
        reject_unsupported(self.name, opts)

    def load(self, artefact: Path) -> OnnxRunner:
        """A runner over ``model.onnx``."""
        return OnnxRunner(Path(artefact))


FORMAT = OnnxFormat()
