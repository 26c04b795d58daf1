"""The export pipeline: one linear path from a base model (plus a federated adapter) to an
on-device artefact with a parity report beside it.

Stages, in order (each printed with its wall time)::

    [1/6] load       base model (fp32, eval) and tokenizer, offline (edgetune.models.load_base)
    [2/6] merge      PEFT adapter folded into the weights (merge_and_unload), eager attention
    [3/6] export     format-specific graph capture or tensor conversion
    [4/6] lower      format-specific lowering (delegation, quantisation, Q/K permutation ...)
    [5/6] serialise  artefact written under ``ExportOptions.out``
    [6/6] parity     the artefact reloaded and compared with eager PyTorch (edge_export.parity)

Stages 3-5 belong to the format: :class:`ExportFormat.export` receives ``stage`` and opens
them itself. Formats are looked up by name in :data:`FORMATS`; each format module defines a
module-level ``FORMAT`` object and imports its heavy toolchain (executorch, onnx, ...) inside
its functions, so that importing this registry stays cheap. The types they share live in
:mod:`edgetune.edge_export.options`, which imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from edgetune.edge_export import executorch_export, gguf_export, onnx_export, ort_training
from edgetune.edge_export.errors import ExportError, RunnerUnavailable
from edgetune.edge_export.options import (
    FLOAT_TYPES,
    QUANTIZE,
    STAGES,
    ExportFormat,
    ExportOptions,
    Runner,
    Stage,
    stage_printer,
)
from edgetune.fileio import atomic_write_text

__all__ = [
    "FLOAT_TYPES",
    "QUANTIZE",
    "STAGES",
    "ExportFormat",
    "ExportOptions",
    "ExportResult",
    "Runner",
    "Stage",
    "formats",
    "load_merged",
    "run_export",
    "stage_printer",
]

FORMATS: dict[str, ExportFormat] = {
    m.FORMAT.name: m.FORMAT for m in (executorch_export, onnx_export, ort_training, gguf_export)
}
"""Format name (the ``--format`` choice) -> format object, in ``--help`` order."""
WARNINGS_FILE = "warnings.txt"
"""Beside the artefact: the libraries' Python warnings the stages kept out of the console."""


def formats() -> dict[str, ExportFormat]:
    """:data:`FORMATS` (a copy)."""
    return dict(FORMATS)


@dataclass
class ExportResult:
    """What one pipeline run produced."""

    artefact: Path
    """The written artefact (a file, or a folder for multi-file formats)."""
    parity: dict[str, Any] | None
    """The parity report (also written as ``parity.json``), ``None`` when the check was off."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time per stage name."""


def _flush_print(line: str) -> None:
    print(line, flush=True)


def load_merged(base: str, adapter: Path | None, stage: Stage) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Stages 1-2: load the base model and fold the adapter into its weights.

    Args:
        base: a model spec for :func:`edgetune.models.load_base` (smollm2, tiny, folder, .gguf).
        adapter: a PEFT adapter folder, or ``None`` to export the base model alone.
        stage: the stage context manager from :func:`stage_printer`.

    Returns:
        The merged model (fp32, eval, eager attention, plain ``transformers`` modules) and its
        tokenizer.

    Raises:
        ExportError: the base is not a Llama model, or the adapter folder does not fit it.
    """
    from edgetune.models import ModelError, load_base

    with stage("load"):
        try:
            model, tokenizer = load_base(base)
        except ModelError as err:
            raise ExportError(str(err)) from err
    if model.config.model_type != "llama":
        raise ExportError(f"base {base!r} is a {model.config.model_type!r} model; the exporters handle llama only")
    with stage("merge"):
        model = _merge(model, adapter) if adapter is not None else model
        model.set_attn_implementation("eager")
    return model.float().eval(), tokenizer


def _merge(model: PreTrainedModel, adapter: Path) -> PreTrainedModel:
    """Fold a PEFT adapter folder into ``model``; a packed binary adapter (1-bit file) is
    unpacked to its dense form ``sign(W) * s`` first, which plain LoRA then merges exactly."""
    from peft import PeftModel

    from edgetune.adapters.binary_io import is_binary_folder

    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(f"--adapter {adapter}: no adapter_config.json there, so it is not a PEFT adapter folder")
    try:
        if is_binary_folder(adapter):
            return _binary_peft_model(model, adapter).merge_and_unload()
        peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except (ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"--adapter {adapter} does not fit this base model: {first}") from err
    return peft_model.merge_and_unload()


def _binary_peft_model(model: PreTrainedModel, adapter: Path) -> PreTrainedModel:
    """A plain PEFT LoRA model holding the unpacked binary adapter of ``adapter``.

    Raises:
        KeyError: the packed adapter's tensors do not match the model's LoRA layers.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, set_peft_model_state_dict

    from edgetune.adapters.binary_io import load_binary_adapter

    state = load_binary_adapter(adapter)
    peft_model = get_peft_model(model, PeftLoraConfig.from_pretrained(adapter))
    result = set_peft_model_state_dict(peft_model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"binary adapter has tensors the model lacks, e.g. {unexpected[0]}")
    return peft_model


def run_export(
    base: str,
    adapter: Path | None,
    format_name: str,
    opts: ExportOptions,
    *,
    check_parity: bool = True,
    new_tokens: int = 16,
    print_fn: Callable[[str], None] = _flush_print,
) -> ExportResult:
    """Run the whole pipeline: load, merge, export, lower, serialise, check parity.

    A format with ``keeps_adapter`` (ort-training) gets the adapter attached, not merged.

    Args:
        base: model spec (see :func:`load_merged`).
        adapter: PEFT adapter folder or ``None``.
        format_name: a key of :func:`formats` (also ``FORMATS``).
        opts: output folder, quantisation, backend, sequence length.
        check_parity: run stage 6 (on by default; the benchmark drives parity itself).
        new_tokens: greedy tokens per prompt in the parity check.
        print_fn: where stage lines and the parity table go.

    Returns:
        The artefact path, the parity report and the per-stage wall times.

    Raises:
        ExportError: an unsupported choice, or an export that failed.
    """
    registry = formats()
    if format_name not in registry:
        raise ExportError(f"--format {format_name!r}: choose one of {', '.join(registry)}")
    fmt = registry[format_name]
    check_options = getattr(fmt, "check_options", None)
    if check_options is not None:  # optional: reject a bad choice before the model loads
        check_options(opts)
    seconds: dict[str, float] = {}
    warned: list[str] = []
    stage = stage_printer(seconds, print_fn, warned)
    # ort-training keeps the adapter as LoRA tensors the device goes on training: attach, don't merge.
    keeps_adapter = getattr(fmt, "keeps_adapter", False)
    model, tokenizer = load_merged(base, None if keeps_adapter else adapter, stage)
    if keeps_adapter:
        model = fmt.attach_adapter(model, adapter)  # type: ignore[attr-defined]
    opts.out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        artefact = fmt.export(model, tokenizer, opts, stage)
    print_fn(f"artefact: {artefact} ({_size_mib(artefact):.1f} MiB)")
    report = _parity_stage(fmt, artefact, model, tokenizer, opts, new_tokens, stage, print_fn) if check_parity else None
    if warned:
        notes = opts.out / WARNINGS_FILE
        atomic_write_text(notes, "\n".join(warned) + "\n")
        print_fn(f"{len(warned)} library warning(s) kept out of the console: {notes}")
    return ExportResult(artefact=artefact, parity=report, seconds=seconds)


def _parity_stage(
    fmt: ExportFormat,
    artefact: Path,
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    opts: ExportOptions,
    new_tokens: int,
    stage: Stage,
    print_fn: Callable[[str], None],
) -> dict[str, Any]:
    from edgetune.edge_export import parity

    out = artefact.parent / parity.PARITY_FILE
    with stage("parity"):
        try:
            runner = fmt.load(artefact)
        except RunnerUnavailable as err:
            report = parity.skipped_report(fmt.name, opts, str(err))
        else:
            report = parity.check(runner, model, tokenizer, fmt.name, opts, new_tokens=new_tokens)
        parity.write_report(report, out)
    print_fn(parity.format_table(report))
    print_fn(f"parity report: {out}")
    return report


def _size_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20
