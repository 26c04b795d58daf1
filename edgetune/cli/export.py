"""``edgetune export``: compile a base model plus a federated adapter for on-device runtimes.

edgetune export --base smollm2 --adapter runs/default/adapter --format pte --out export/pte
edgetune export --base smollm2 --adapter runs/default/adapter --format pte --quantize 4bit --out export/pte4
edgetune export --base smollm2 --format gguf --float-type f16 --out export/gguf
edgetune export --base tiny --format pte --backend coreml --out export/coreml

Every export ends with a parity check against eager PyTorch (``parity.json`` next to the
artefact); ``--no-parity`` skips it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register"]

# Kept here (not imported from edge_export) so that ``edgetune --help`` stays fast.
_FORMATS = {
    "pte": "ExecuTorch program with a KV cache (see --backend)",
    "onnx": "ONNX graph for ONNX Runtime inference",
    "ort-training": "ONNX Runtime on-device training artifacts (LoRA parameters trainable)",
    "gguf": "GGUF in llama.cpp's llama layout (loadable by transformers and llama.cpp)",
}
_BACKENDS = {
    "xnnpack": "CPU via XNNPACK (default; runs here)",
    "portable": "no delegate, reference kernels",
    "coreml": "Apple Core ML / Neural Engine: lowers here, runs only on macOS/iOS (parity skipped)",
    "qnn": "Qualcomm NPU: needs the QNN SDK (QNN_SDK_ROOT)",
}


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` to the ``edgetune`` sub-commands."""
    parser = sub.add_parser(
        "export",
        help="export a base model (+ adapter) to .pte, ONNX, ORT training artifacts or GGUF",
        description="Linear pipeline: load the base model, merge the PEFT adapter, export, lower, serialise, "
        "and check parity against eager PyTorch (top-1 agreement, max |logit diff|, tokens/s; parity.json "
        "next to the artefact).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="formats:\n"
        + "".join(f"  {k:<13} {v}\n" for k, v in _FORMATS.items())
        + "pte backends:\n"
        + "".join(f"  {k:<13} {v}\n" for k, v in _BACKENDS.items())
        + "exit codes: 0 ok, 1 export or parity failed, 2 unsupported choice or bad input",
    )
    parser.add_argument(
        "--base", required=True, metavar="MODEL", help="smollm2 (embedded), tiny, or a local HF folder / .gguf file"
    )
    parser.add_argument(
        "--adapter", type=Path, metavar="DIR", help="PEFT adapter folder to merge (e.g. RUN/adapter); default: none"
    )
    parser.add_argument("--format", required=True, choices=list(_FORMATS), help="artefact format (see below)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument(
        "--quantize",
        default="none",
        choices=["none", "8bit", "4bit"],
        help="weight quantisation: pte+xnnpack 8bit (int8 per channel) or 4bit (int4, groups of 32), "
        "both with dynamic int8 activations; gguf 8bit = Q8_0 (default: none)",
    )
    parser.add_argument(
        "--backend", default="xnnpack", choices=list(_BACKENDS), help="pte lowering backend (default: xnnpack)"
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=256,
        metavar="N",
        help="KV-cache length / static sequence length: prompt + new tokens (default: 256)",
    )
    parser.add_argument(
        "--float-type", default="f32", choices=["f32", "f16"], help="gguf storage of unquantised weights (default: f32)"
    )
    parser.add_argument(
        "--parity-tokens", type=int, default=16, metavar="N", help="greedy tokens per parity prompt (default: 16)"
    )
    parser.add_argument("--no-parity", action="store_true", help="skip the parity check")
    parser.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from edgetune.edge_export.errors import ExportError
    from edgetune.edge_export.pipeline import ExportOptions, run_export

    if args.adapter is not None and not args.adapter.is_dir():
        print(f"edgetune export: --adapter {args.adapter}: no such folder", file=sys.stderr)
        return 2
    if args.parity_tokens < 1:
        print(f"edgetune export: --parity-tokens {args.parity_tokens}: must be >= 1", file=sys.stderr)
        return 2
    backend = f"backend {args.backend}, " if args.format == "pte" else ""
    print(
        f"edgetune export: {args.base}" + (f" + {args.adapter}" if args.adapter else "") + f" -> {args.format}"
        f" ({backend}quantize {args.quantize}, max-seq-len {args.max_seq_len}) in {args.out}",
        flush=True,
    )
    try:
        opts = ExportOptions(
            out=args.out,
            quantize=args.quantize,
            backend=args.backend,
            max_seq_len=args.max_seq_len,
            float_type=args.float_type,
        )
        result = run_export(
            args.base, args.adapter, args.format, opts, check_parity=not args.no_parity, new_tokens=args.parity_tokens
        )
    except ExportError as err:
        print(f"edgetune export: {err}", file=sys.stderr)
        return 2 if err.bad_choice else 1
    total = sum(result.seconds.values())
    print(f"edgetune export: wrote {result.artefact} in {total:.1f} s")
    return 0
