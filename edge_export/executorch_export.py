"""The ``pte`` format: an ExecuTorch program with a static KV cache, delegated to a backend.

Stages (opened through the pipeline's ``stage``):

    export     transformers' ``TorchExportableModuleForDecoderOnlyLM`` wraps the merged model
               with a static KV cache of ``max_seq_len`` positions; ``torch.export`` (strict)
               captures ``forward(input_ids (1, T), cache_position (T,)) -> logits (1, T, V)``
               with T dynamic in [1, max_seq_len - 1], so one method does prefill and decode
               (Core ML and QNN: T = 1, as their compilers need static shapes).
               Optional weight quantisation (torchao) is applied just before capture.
    lower      ``to_edge_transform_and_lower`` with the backend's partitioner, ``to_executorch``.
    serialise  ``model.pte`` plus ``model.json`` (backend, quantisation, cache length).

Backends here: ``xnnpack`` (CPU, the default; runs here), ``portable`` (no delegate, reference
kernels), ``coreml`` (Apple Neural Engine/GPU/CPU; lowers on Linux with coremltools, but the
Core ML runtime exists only on Apple platforms, so the parity check is skipped here), ``qnn``
(Qualcomm NPUs; needs the Qualcomm AI Engine Direct SDK under ``QNN_SDK_ROOT``).

Quantisation (xnnpack only): ``8bit`` = int8 per-channel weights with dynamic int8
activations, ``4bit`` = int4 weights in groups of 32 with dynamic int8 activations (torchao
``Int8DynamicActivationIntxWeightConfig``, the "8da4w" scheme XNNPACK runs).

The runner decodes with the program's KV cache: the prompt in one call (prefill), then one
token per call at the next ``cache_position``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from edgetune.edge_export.errors import ExportError, RunnerUnavailable
from edgetune.edge_export.options import ExportOptions, Stage

__all__ = ["BACKENDS", "FORMAT", "PteFormat", "PteRunner"]

BACKENDS = {
    "xnnpack": "CPU via XNNPACK (default; runs on this machine)",
    "portable": "no delegate, ExecuTorch's portable reference kernels (slow; runs anywhere)",
    "coreml": "Apple Core ML (Neural Engine); lowers here, runs only on macOS/iOS",
    "qnn": "Qualcomm AI Engine Direct (Hexagon NPU); needs the QNN SDK in QNN_SDK_ROOT",
}
STATIC_SHAPE_BACKENDS = ("coreml", "qnn")
"""Backends exported with one token per call (their compilers reject the dynamic prefill)."""
QUANT_GROUP_SIZE = 32
_META_SUFFIX = ".json"
_COREML_RUNTIME = "CoreMLBackend"


def _check_options(opts: ExportOptions) -> None:
    if opts.backend not in BACKENDS:
        raise ExportError(f"--backend {opts.backend!r}: choose one of {', '.join(BACKENDS)}")
    if opts.quantize != "none" and opts.backend != "xnnpack":
        raise ExportError(f"--quantize {opts.quantize} is supported with --backend xnnpack only, not {opts.backend}")
    if opts.float_type != "f32":
        raise ExportError(f"--float-type {opts.float_type}: the pte format keeps f32 weights (use --quantize)")
    if opts.backend == "qnn":
        _check_qnn_sdk()


def _check_model(model: LlamaForCausalLM, opts: ExportOptions) -> None:
    if opts.quantize == "4bit":
        widths = {"hidden_size": model.config.hidden_size, "intermediate_size": model.config.intermediate_size}
        for key, width in widths.items():
            if width % QUANT_GROUP_SIZE:
                raise ExportError(f"--quantize 4bit: {key}={width} is not a multiple of group size {QUANT_GROUP_SIZE}")


def _check_qnn_sdk() -> None:
    """Fail with a one-line reason unless a QNN SDK is installed (executorch would try to download one)."""
    root = os.environ.get("QNN_SDK_ROOT")
    if not root:
        raise ExportError(
            "--backend qnn needs the Qualcomm AI Engine Direct (QNN) SDK: QNN_SDK_ROOT is not set "
            "(install the SDK, set QNN_SDK_ROOT=<sdk> and add $QNN_SDK_ROOT/lib/x86_64-linux-clang to LD_LIBRARY_PATH)"
        )
    if not (Path(root) / "lib" / "x86_64-linux-clang").is_dir():
        raise ExportError(f"--backend qnn: QNN_SDK_ROOT={root} has no lib/x86_64-linux-clang, so it is not a QNN SDK")


def _quantize(model: LlamaForCausalLM, quantize: str) -> None:
    """Replace every Linear weight by torchao's int8/int4 form (in place, on the export copy)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if quantize == "8bit":
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    else:
        config = Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(QUANT_GROUP_SIZE)
        )
    quantize_(model, config)


def _capture(model: LlamaForCausalLM, max_seq_len: int, dynamic: bool) -> torch.export.ExportedProgram:
    """Strict ``torch.export`` of the static-KV-cache decoder.

    ``dynamic``: T (tokens per call) in [1, max_seq_len - 1], so prefill is one call; else
    T = 1 (decode-only; the runner feeds a prompt token by token), which is what NPU
    compilers that need static shapes accept.
    """
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    eager_config = model.generation_config
    model.generation_config = GenerationConfig(
        use_cache=True,
        cache_implementation="static",
        max_length=max_seq_len,
        cache_config={"batch_size": 1, "max_cache_len": max_seq_len},
    )
    try:
        wrapped = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_seq_len)
    finally:  # the eager reference keeps generating with its own settings
        model.generation_config = eager_config
    length = 2 if dynamic else 1
    tokens = torch.export.Dim("tokens", min=1, max=max_seq_len - 1)
    shapes = {"input_ids": {1: tokens}, "cache_position": {0: tokens}} if dynamic else None
    try:
        return wrapped.export(
            input_ids=torch.zeros((1, length), dtype=torch.long),  # (1, T)
            cache_position=torch.arange(length),  # (T,)
            dynamic_shapes=shapes,
            strict=True,
        )
    except Exception as err:  # torch.export raises many types; the reason is what matters
        raise ExportError(f"torch.export could not capture this model: {_first_line(err)}", bad_choice=False) from err


def _partitioners(backend: str) -> list[Any]:
    if backend == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return [XnnpackPartitioner()]
    if backend == "coreml":
        return [_coreml_partitioner()]
    if backend == "qnn":
        return [_qnn_partitioner()]
    return []  # portable: no delegate


def _coreml_partitioner() -> Any:
    try:
        import coremltools as ct
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner
    except ImportError as err:
        raise ExportError(f"--backend coreml needs coremltools: {err}") from err
    # Stateful (KV cache) models need iOS 18 / macOS 15; the cache buffers stay outside the
    # delegate because coremltools cannot convert transformers' cache-length state.
    specs = CoreMLBackend.generate_compile_specs(
        minimum_deployment_target=ct.target.iOS18, compute_unit=ct.ComputeUnit.ALL
    )
    return CoreMLPartitioner(compile_specs=specs, take_over_mutable_buffer=False)


def _qnn_partitioner() -> Any:
    from executorch.backends.qualcomm.partition.qnn_partitioner import QnnPartitioner
    from executorch.backends.qualcomm.serialization.qc_schema import QcomChipset
    from executorch.backends.qualcomm.utils.utils import (
        generate_htp_compiler_spec,
        generate_qnn_executorch_compiler_spec,
    )

    specs = generate_qnn_executorch_compiler_spec(
        soc_model=QcomChipset.SM8650, backend_options=generate_htp_compiler_spec(use_fp16=True)
    )
    return QnnPartitioner(specs)


def _lower(program: torch.export.ExportedProgram, backend: str) -> bytes:
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    try:
        edge = to_edge_transform_and_lower(
            program,
            partitioner=_partitioners(backend),
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
        )
        return edge.to_executorch().buffer
    except ExportError:
        raise
    except Exception as err:  # lowering failures come from many backends and types
        raise ExportError(f"lowering to {backend} failed: {_first_line(err)}", bad_choice=False) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclass(frozen=True)
class PteFormat:
    """ExecuTorch ``.pte`` (see the module docstring)."""

    name: str = "pte"

    def check_options(self, opts: ExportOptions) -> None:
        """Reject an unknown backend, quantisation off XNNPACK, f16, or QNN without its SDK."""
        _check_options(opts)

    def export(
        self, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, opts: ExportOptions, stage: Stage
    ) -> Path:
        """Capture, lower and write ``<out>/model.pte`` (+ ``model.json``); returns the .pte path."""
        _check_options(opts)
        _check_model(model, opts)
        opts.out.mkdir(parents=True, exist_ok=True)
        with stage("export"):
            if opts.quantize != "none":
                model = _clone(model)
                _quantize(model, opts.quantize)
            program = _capture(model, opts.max_seq_len, dynamic=opts.backend not in STATIC_SHAPE_BACKENDS)
        with stage("lower"):
            buffer = _lower(program, opts.backend)
        with stage("serialise"):
            artefact = opts.out / "model.pte"
            artefact.write_bytes(buffer)
            meta = {
                "backend": opts.backend,
                "quantize": opts.quantize,
                "max_seq_len": opts.max_seq_len,
                "vocab_size": model.config.vocab_size,
            }
            artefact.with_suffix(_META_SUFFIX).write_text(json.dumps(meta, indent=2) + "\n")
        return artefact

    def load(self, artefact: Path) -> PteRunner:
        """Load ``model.pte`` with ExecuTorch's Python runtime.

        Raises:
            RunnerUnavailable: the program delegates to a backend this runtime lacks (Core ML on Linux).
        """
        return PteRunner(artefact)


def _clone(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A deep copy, so quantisation never touches the eager reference the parity check uses."""
    import copy

    return copy.deepcopy(model)


class PteRunner:
    """Greedy decoding with an exported program's own KV cache (batch 1)."""

    def __init__(self, artefact: Path) -> None:
        from executorch.runtime import Runtime

        meta_file = artefact.with_suffix(_META_SUFFIX)
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        self.backend: str = meta.get("backend", "xnnpack")
        runtime = Runtime.get()
        if self.backend == "coreml" and _COREML_RUNTIME not in runtime.backend_registry.registered_backend_names:
            raise RunnerUnavailable(
                "the .pte delegates to Core ML, whose runtime exists only on macOS/iOS; this ExecuTorch build has "
                + ", ".join(runtime.backend_registry.registered_backend_names)
            )
        self._forward = runtime.load_program(artefact).load_method("forward")
        self._chunk: int = self._forward.metadata.input_tensor_meta(0).sizes()[1]  # most tokens per call
        self.max_seq_len: int = meta.get("max_seq_len", self._chunk + 1)

    def _run(self, ids: list[int], start: int) -> torch.Tensor:
        """Feed ``ids`` at cache positions ``start..``, in calls of at most ``_chunk`` tokens.

        Returns:
            Logits (len(ids), V).
        """
        logits = []
        for offset in range(0, len(ids), self._chunk):
            piece = ids[offset : offset + self._chunk]
            input_ids = torch.tensor([piece], dtype=torch.long)  # (1, T)
            positions = torch.arange(start + offset, start + offset + len(piece), dtype=torch.long)  # (T,)
            logits.append(self._forward.execute([input_ids, positions])[0][0])
        return torch.cat(logits)

    def _check_length(self, total: int) -> None:
        if total > self.max_seq_len - 1:
            raise ValueError(f"{total} tokens do not fit the exported cache (max_seq_len {self.max_seq_len})")

    def sequence_logits(self, ids: list[int]) -> np.ndarray:
        """Logits (len(ids), V) fp32 at every position, from one prefill call."""
        self._check_length(len(ids))
        return self._run(ids, 0).float().numpy()

    def next_token_logits(self, ids: list[int]) -> np.ndarray:
        """Logits (V,) for the token after ``ids``."""
        return self.sequence_logits(ids)[-1]

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Exactly ``max_new_tokens`` greedy ids: prefill ``ids`` once, then one token per call."""
        self._check_length(len(ids) + max_new_tokens)
        token = int(self._run(ids, 0)[-1].argmax())
        new = [token]
        for position in range(len(ids), len(ids) + max_new_tokens - 1):
            token = int(self._run([token], position)[-1].argmax())
            new.append(token)
        return new


FORMAT = PteFormat()
