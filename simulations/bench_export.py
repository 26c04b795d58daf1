"""Export benchmark on SmolLM2 with a federated adapter: XNNPACK .pte and GGUF parity and
speed against eager PyTorch, and the ONNX Runtime training step next to PyTorch's.

    flock /tmp/edgetune-heavy.lock nice -n 5 python -m edgetune.simulations.bench_export
    python -m edgetune.simulations.bench_export --base tiny --adapter '' --new-tokens 8 --out bench-out/export-tiny
    python -m edgetune.simulations.bench_export --quantize 4bit     # add an 8da4w .pte row

Method: the base model and the adapter (default ``runs/default/adapter``, a PEFT folder from
``edgetune simulate``) are loaded and merged once; each artefact is exported from that same
merged model and checked with :func:`edge_export.parity.check` (top-1 agreement over every
teacher-forced position of prompt + eager greedy continuation, max |logit diff|, and greedy
``generate`` tokens/s of the artefact vs eager PyTorch ``generate`` on the same prompts and
the same number of new tokens, timed in the same run). The ORT row times one AdamW step on
the same batch with ONNX Runtime training artifacts and with PyTorch (fp32), from
:func:`edge_export.ort_trainer.benchmark_step`. Ends with one JSON line, also written to
``<out>/result.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from edgetune.edge_export import parity
from edgetune.edge_export.pipeline import ExportOptions, formats, load_merged, stage_printer

DEFAULT_ADAPTER = "runs/default/adapter"


def _export_and_check(
    name: str, model: Any, tokenizer: Any, opts: ExportOptions, new_tokens: int, seconds: dict[str, float]
) -> dict[str, Any]:
    fmt = formats()[name]
    stage = stage_printer(seconds, lambda line: print(f"  {name}/{opts.backend}/{opts.quantize}: {line}", flush=True))
    start = time.perf_counter()
    with torch.no_grad():
        artefact = fmt.export(model, tokenizer, opts, stage)
    export_s = time.perf_counter() - start
    with stage("parity"):
        report = parity.check(fmt.load(artefact), model, tokenizer, name, opts, new_tokens=new_tokens)
    parity.write_report(report, artefact.parent / parity.PARITY_FILE)
    print(parity.format_table(report), flush=True)
    return {**report, "export_seconds": round(export_s, 1), "artefact_mib": round(artefact.stat().st_size / 2**20, 1)}


def _ort_step(base: str, adapter: Path | None, out: Path, batch_size: int) -> dict[str, Any]:
    """ORT training step vs PyTorch step on one batch of device data (export-B's ``benchmark_step``)."""
    from edgetune.adapters.lora import attach_lora, set_adapter
    from edgetune.adapters.peft_io import load_adapter
    from edgetune.chat import iterate_batches
    from edgetune.config import DataConfig, LoraConfig
    from edgetune.datasets.devices import tokenized_device
    from edgetune.edge_export import ort_trainer, ort_training
    from edgetune.lm import pad_id
    from edgetune.models import load_base

    model, tokenizer = load_base(base)
    peft_model = attach_lora(model, LoraConfig())
    if adapter is not None:
        set_adapter(peft_model, load_adapter(adapter))
    data = tokenized_device(DataConfig(), "", 0, 8, 0, tokenizer)
    batch = next(iter(iterate_batches(data.train, batch_size, 1, 0, pad_id(tokenizer))))
    start = time.perf_counter()
    folder = ort_training.build_artifacts(peft_model, out / "ort-training")
    build_s = time.perf_counter() - start
    step = ort_trainer.benchmark_step(peft_model, batch, folder, learning_rate=1e-3)
    row = {
        "ort_build_seconds": round(build_s, 1),
        "ort_step_seconds": round(step.ort_seconds, 3),
        "torch_step_seconds": round(step.torch_seconds, 3),
        "ort_speedup_over_torch": round(step.speedup, 2),
        "ort_loss": round(step.ort_loss, 5),
        "torch_loss": round(step.torch_loss, 5),
        "batch_label_tokens": step.label_tokens,
    }
    print(
        f"ORT training step {step.ort_seconds:.3f} s vs PyTorch {step.torch_seconds:.3f} s "
        f"({step.speedup:.2f}x), loss {step.ort_loss:.4f} vs {step.torch_loss:.4f}",
        flush=True,
    )
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'artefact':<22} {'top-1':>8} {'max|dlogit|':>12} {'greedy':>8} {'tok/s':>8} {'eager':>8} {'speedup':>8}",
    ]
    for r in rows:
        label = f"{r['format']} {r.get('backend') or ''} {r['quantize']}".replace("  ", " ")
        lines.append(
            f"{label:<22} {100 * r['top1_agreement']:>7.2f}% {r['max_abs_logit_diff']:>12.3g} "
            f"{100 * r['greedy_match']:>7.1f}% {r['tokens_per_s']:>8.1f} {r['eager_tokens_per_s']:>8.1f} "
            f"{r['speedup']:>7.2f}x"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2", help="base model spec (default: smollm2)")
    parser.add_argument(
        "--adapter", default=DEFAULT_ADAPTER, help=f"PEFT adapter folder; '' for none (default: {DEFAULT_ADAPTER})"
    )
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per parity prompt (default: 32)")
    parser.add_argument("--max-seq-len", type=int, default=160, help="exported KV-cache length (default: 160)")
    parser.add_argument("--quantize", choices=["none", "8bit", "4bit"], default="none", help="also a quantised .pte")
    parser.add_argument("--skip-ort", action="store_true", help="leave out the ORT training step row")
    parser.add_argument("--ort-batch-size", type=int, default=4, help="conversations in the ORT step batch")
    parser.add_argument("--out", default="bench-out/export", help="output folder (default: bench-out/export)")
    args = parser.parse_args()
    out = Path(args.out)
    adapter = Path(args.adapter) if args.adapter else None
    seconds: dict[str, float] = {}
    model, tokenizer = load_merged(args.base, adapter, stage_printer(seconds, lambda line: print(line, flush=True)))
    plans = [("pte", "none"), ("gguf", "none")] + ([("pte", args.quantize)] if args.quantize != "none" else [])
    rows = []
    for name, quantize in plans:
        opts = ExportOptions(out=out / f"{name}-{quantize}", quantize=quantize, max_seq_len=args.max_seq_len)
        rows.append(_export_and_check(name, model, tokenizer, opts, args.new_tokens, {}))
    print(_table(rows))
    result: dict[str, Any] = {
        "benchmark": "export",
        "base": args.base,
        "adapter": str(adapter) if adapter else None,
        "threads": torch.get_num_threads(),
        "new_tokens_per_prompt": args.new_tokens,
        "rows": rows,
    }
    if not args.skip_ort:
        result["ort_training"] = _ort_step(args.base, adapter, out, args.ort_batch_size)
    out.mkdir(parents=True, exist_ok=True)
    line = json.dumps(result)
    (out / "result.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
