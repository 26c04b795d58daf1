"""Local training throughput: tokens/s of one device's K steps, and the share of this
machine's matrix-multiply peak in the same precision that it reaches, measured in one run.

    python -m edgetune.simulations.bench_throughput                 # SmolLM2, english/tech_support data
    python -m edgetune.simulations.bench_throughput --base tiny --steps 3 --out bench-out/throughput

Method: each precision's peak is the median GFLOP/s of repeated square matmuls (n=2048, bf16
and fp32) with all threads, measured again before every repeat (each repeat's fraction is
against the peak just before it, so a busy spell slows both); training FLOPs per step are counted exactly by
``torch.utils.flop_counter`` on one step (forward + backward, the matmuls that really run);
throughput is tokens (prompt included, padding excluded) over wall time of ``--steps``
steps, median over ``--repeats`` (CPU seconds beside), on the batches packed as training
packs them (``edgetune.chat.pack_rows``). Each precision (bf16 autocast, fp32) is measured
on the same batches, as a fraction of its own peak, as training runs it (bf16: frozen base
held in bf16, eager attention on short sequences; AdamW's default per-tensor step), compiled
as ``train.compile=on`` runs it (a model loaded apart, with its stacked projections, each
decoder layer ``torch.compile(dynamic=True)``'d, warmed up on every batch first, the compile
time reported beside it; ``--no-compile`` skips these), and with one change each
(``bf16-sdpa-bf16``: transformers' SDPA attention in bf16; ``bf16-sdpa-fp32``: SDPA in fp32
at every length; ``bf16-fp32-base``: the base left fp32 under autocast; ``bf16-per-layer``:
each projection its own matmuls, without ``stack_projections``; ``*-peft-lora``: PEFT's own
LoRA forward instead of ``FusedLoraLinear``'s; ``*-fused``: PyTorch's fused AdamW, no
consistent gain here and so not used), the repeats interleaved across variants.
The CPU's features and what ``train.precision=auto`` picks on it are reported too. On a CPU
without bf16 units (where ``auto`` picks fp32) bf16 is measured only as forced training runs
it, once, on the first 2 steps (a step there takes 10-30x fp32's), and a bf16 matmul too
slow for n=2048 is measured at n=512; ``auto_speedup`` is the chosen precision's tokens/s
over the other's. Beside the variants, the steps' own matmuls are replayed alone, back to
back (the same operators, shapes, strides and dtypes, recorded below autocast on one pass;
``*_matmuls_alone_*``): their fraction of the peak is the most any step of these shapes could
reach, so it separates what the shapes cost (small M, rank-8 adapter products, attention's
batched products) from what everything else in the step costs; each kind of matmul
(projections, rank-r adapter products, attention, LM head) is then replayed on its own, with
its share of their time and FLOPs and its GFLOP/s (``*_matmuls_alone_by_kind``). Ends with
one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from edgetune.adapters.fused import fuse_lora_forward
from edgetune.adapters.lora import device_model
from edgetune.chat import iterate_batches, pack_rows
from edgetune.client.train import adapter_optimizer, compile_decoder
from edgetune.config import DataConfig, LoraConfig, TrainConfig
from edgetune.datasets.devices import tokenized_device
from edgetune.lm import autocast, causal_lm, pad_id, summed_loss
from edgetune.precision import DEVICE_ATTENTION, FP32_ATTENTION, cpu_flags, resolved_for_this_cpu


def peak_size(dtype: torch.dtype, n: int = 2048, small: int = 512, seconds: float = 0.5) -> int:
    """``n``, or ``small`` where an (n, n) @ (n, n) matmul in ``dtype`` would take over ``seconds``
    (a bf16 one on a CPU without bf16 units: 57 s at n=2048 on one measured)."""
    a = torch.randn(small, small, dtype=dtype)
    a @ a
    start = time.perf_counter()
    a @ a
    return n if (time.perf_counter() - start) * (n / small) ** 3 <= seconds else small


def matmul_peak_gflops(dtype: torch.dtype = torch.bfloat16, n: int = 2048, repeats: int = 7) -> float:
    """Median GFLOP/s of an (n, n) @ (n, n) matmul in ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        rates.append(4 * 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def step_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor], precision: str) -> int:
    """FLOPs of one training step (forward + backward) as the matmuls report them."""
    counter = FlopCounterMode(display=False)
    with counter, autocast(precision):
        loss, n = summed_loss(model, batch)
        (loss / max(n, 1)).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def timed_steps(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], precision: str, lr: float, fused: bool = False
) -> tuple[float, float]:
    """Wall and CPU seconds for one optimizer step per batch: ``train_local``'s step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adapter_optimizer(params, lr, fused)
    start, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        with autocast(precision):
            loss, n = summed_loss(model, batch)
        (loss / max(n, 1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start, time.process_time() - cpu


MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


class MatmulRecorder(TorchDispatchMode):
    """Notes every matmul that runs inside it (after autocast: the dtypes that really
    multiply), as its operator and each operand's shape, strides and dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[object, tuple[object, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in MATMULS:
            spec = tuple((a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
            self.calls.append((func, spec))
        return func(*args, **(kwargs or {}))


def operand(shape: torch.Size, stride: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A random tensor laid out as recorded (a transposed or sliced view stays one)."""
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    return torch.randn(size).to(dtype).as_strided(shape, stride)


def matmul_kind(func: object, shapes: list[torch.Size], rank: int, vocab: int) -> str:
    """What a step's matmul computes, from its operator and operand shapes: attention's
    batched products, the LM head (a vocabulary-wide side), the adapter's rank-r products
    (``A x``'s output through ``B``, and their gradients), or the base projections."""
    if func is torch.ops.aten.bmm.default:
        return "attention"
    dims = {d for shape in shapes for d in shape}
    if vocab in dims:
        return "LM head"
    return f"rank-{rank} adapter" if rank in dims else "projections"


class MatmulReplay:
    """The matmuls of ``model``'s steps on ``batches`` (forward and backward, as
    :func:`timed_steps` runs them), replayed alone and back to back on operands of the same
    shapes, strides and dtypes (one per distinct layout, so they stay warm in cache): what
    the steps would take if everything but their matmuls cost nothing. Its GFLOP/s over the
    square-matmul peak is the most a step of these shapes can reach; :meth:`by_kind` says
    which matmuls hold it down (``model``: a PEFT LoRA model of one adapter)."""

    def __init__(self, model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], precision: str) -> None:
        recorder = MatmulRecorder()
        with recorder:
            timed_steps(model, batches, precision, 1e-3)
        operands: dict[tuple[object, ...], torch.Tensor] = {}
        self.calls = [
            (func, [operands.setdefault(a, operand(*a)) if isinstance(a, tuple) else a for a in spec])
            for func, spec in recorder.calls
        ]
        (rank,) = {c.r for c in model.peft_config.values()}  # type: ignore[operator, union-attr]
        vocab = int(causal_lm(model).config.vocab_size)
        self.groups: dict[str, list[tuple[object, list[object]]]] = {}  # kinds in the order they first run
        for func, args in self.calls:
            kind = matmul_kind(func, [a.shape for a in args if isinstance(a, torch.Tensor)], rank, vocab)
            self.groups.setdefault(kind, []).append((func, args))
        self.kind_flops: dict[str, int] = {}
        for kind, calls in self.groups.items():
            counter = FlopCounterMode(display=False)
            with counter:
                _replay(calls)
            self.kind_flops[kind] = int(counter.get_total_flops())
        self.flops = sum(self.kind_flops.values())

    def run(self) -> float:
        """Wall seconds of one pass over the recorded matmuls, in the steps' order."""
        return _replay(self.calls)

    def by_kind(self) -> dict[str, tuple[float, int]]:
        """Wall seconds and FLOPs of each kind of matmul (:func:`matmul_kind`), each kind's
        calls replayed back to back."""
        return {kind: (_replay(calls), self.kind_flops[kind]) for kind, calls in self.groups.items()}


def _replay(calls: list[tuple[object, list[object]]]) -> float:
    start = time.perf_counter()
    for func, args in calls:
        func(*args)  # type: ignore[operator]
    return time.perf_counter() - start


def cpu_features() -> dict[str, object]:
    """What decides the precision: bf16 matrix units, AVX-512, PyTorch's CPU capability."""
    flags = cpu_flags()
    wanted = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")
    return {
        "flags": [f for f in wanted if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "auto_precision": resolved_for_this_cpu("auto").describe("auto"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2", metavar="MODEL", help="base model (default: smollm2)")
    parser.add_argument("--steps", type=int, default=8, metavar="K", help="optimizer steps per measurement")
    parser.add_argument(
        "--batch-size", type=int, default=TrainConfig().batch_size, metavar="N", help="conversations per step"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, metavar="N", help="measurements per variant (median is reported)"
    )
    parser.add_argument("--out", default="bench-out/throughput", metavar="DIR", help="output folder for result.json")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip the compiled variants (each compiles for 20-45 s first)"
    )
    args = parser.parse_args()

    lora = LoraConfig()
    loaded = {held: device_model(args.base, lora, "none", "bf16" if held else "fp32") for held in (False, True)}
    tokenizer = loaded[False][1]
    models = {"fp32": loaded[False][0], "bf16": loaded[True][0]}
    if not args.no_compile:  # loaded again (device_model caches), not deep copies: a copy's layers lose the stacks
        for precision in ("bf16", "fp32"):
            models[f"{precision}-compiled"] = device_model.__wrapped__(args.base, lora, "none", precision)[0]
            compile_decoder(models[f"{precision}-compiled"])
    data = tokenized_device(DataConfig(), "", 0, 8, 0, tokenizer)
    collated = iterate_batches(data.train, args.batch_size, args.steps, 0, pad_id(tokenizer))
    batches = [pack_rows(b) for b in collated]  # as train_local steps them
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(int(b["attention_mask"].numel()) for b in batches)
    features = cpu_features()
    print(
        f"CPU: {', '.join(features['flags']) or 'no listed flags'}; torch capability "  # type: ignore[arg-type]
        f"{features['torch_cpu_capability']}; train.precision=auto -> {features['auto_precision']}",
        flush=True,
    )
    result: dict[str, object] = {
        "benchmark": "throughput",
        "base": args.base,
        "device": data.name,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "tokens_per_run": tokens,
        "padding_fraction": round(1 - tokens / padded, 4),  # what pack_rows leaves
        "threads": torch.get_num_threads(),
        "cpu": features,
    }
    # (name, precision, model, fused AdamW, attention): the first of each precision is what
    # training runs by default, "-compiled" what train.compile=on (long runs) adds; the others
    # are one change each against the first: transformers' SDPA in bf16 (attention=sdpa) or in
    # fp32 at every length, the base left fp32 under autocast, no stacked projections, PEFT's
    # LoRA forward, fused AdamW.
    # (A deep copy of a model takes each layer's own forward: the stacks stay with the original.)
    variants = [
        ("bf16", "bf16", "bf16", False, None),
        ("bf16-compiled", "bf16", "bf16-compiled", False, None),
        ("bf16-sdpa-bf16", "bf16", "bf16", False, "sdpa"),
        ("bf16-sdpa-fp32", "bf16", "bf16", False, FP32_ATTENTION),
        ("bf16-fp32-base", "bf16", "fp32", False, DEVICE_ATTENTION),
        ("bf16-per-layer", "bf16", "bf16-per-layer", False, None),
        ("bf16-peft-lora", "bf16", "bf16-peft-lora", False, None),
        ("bf16-fused", "bf16", "bf16", True, None),
        ("fp32", "fp32", "fp32", False, None),
        ("fp32-compiled", "fp32", "fp32-compiled", False, None),
        ("fp32-peft-lora", "fp32", "fp32-peft-lora", False, None),
        ("fp32-fused", "fp32", "fp32", True, None),
    ]
    chosen = resolved_for_this_cpu("auto").precision
    # On a CPU without bf16 units, bf16 only as forced training runs it, once, on 2 steps.
    forced_only = chosen == "fp32"
    if forced_only:
        variants = [v for v in variants if v[1] == "fp32" or v[0] == "bf16"]
    measured = {"fp32": batches, "bf16": batches[:2] if forced_only else batches}
    repeats = {"fp32": args.repeats, "bf16": 1 if forced_only else args.repeats}
    counted = {p: sum(int(b["attention_mask"].sum()) for b in measured[p]) for p in measured}
    flops = {p: sum(step_flops(models[p].train(), b, p) for b in measured[p]) for p in measured}
    # the steps' own matmuls alone (not for bf16 forced on a CPU without bf16 units)
    replays = {p: MatmulReplay(models[p].train(), measured[p], p) for p in (("fp32",) if forced_only else measured)}
    models["bf16-per-layer"] = copy.deepcopy(models["bf16"])
    for precision in ("bf16", "fp32"):
        models[f"{precision}-peft-lora"] = peft_lora = copy.deepcopy(models[precision])
        fuse_lora_forward(peft_lora, fused=False)
    if args.no_compile:
        variants = [v for v in variants if not v[2].endswith("-compiled")]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in variants}

    def timed(
        model: str, precision: str, fused: bool, attention: str | None, warm: list[dict[str, torch.Tensor]]
    ) -> tuple[float, float]:
        lm = causal_lm(models[model])
        own = lm.config._attn_implementation
        lm.set_attn_implementation(attention or own)
        try:
            return timed_steps(models[model].train(), warm, precision, 1e-3, fused)
        finally:
            lm.set_attn_implementation(own)

    for name, precision, model, fused, attention in variants:  # warm-up; compiling takes every batch shape
        compiled = model.endswith("-compiled")
        seconds, _ = timed(model, precision, fused, attention, batches if compiled else batches[:1])
        if compiled:
            result[f"{name}_warmup_seconds"] = round(seconds, 1)
            print(f"{name:>15}: compiled and warmed up on {len(batches)} steps in {seconds:.1f} s", flush=True)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    sizes = {p: peak_size(dtype) for p, dtype in dtypes.items()}
    peak_runs: dict[str, list[float]] = {"bf16": [], "fp32": []}
    replay_runs: dict[str, list[float]] = {p: [] for p in replays}
    for repeat in range(args.repeats):  # interleaved, so that a busy spell hits every variant alike, and the peaks
        for precision, dtype in dtypes.items():
            peak_runs[precision].append(matmul_peak_gflops(dtype, sizes[precision]))
        for precision, replay in replays.items():
            replay_runs[precision].append(replay.run())
        for name, precision, model, fused, attention in variants:
            if repeat < repeats[precision]:
                runs[name].append(timed(model, precision, fused, attention, measured[precision]))
    peaks = {p: statistics.median(g) for p, g in peak_runs.items()}
    for precision, gflops in peak_runs.items():
        result[f"{precision}_matmul_peak_gflops"] = round(peaks[precision], 1)
        result[f"{precision}_matmul_peak_gflops_runs"] = [round(g, 1) for g in gflops]
        result[f"{precision}_matmul_peak_n"] = sizes[precision]
    for precision, replay in replays.items():
        alone = replay_runs[precision]
        peaks_before = peak_runs[precision]
        fraction = statistics.median(replay.flops / w / 1e9 / g for w, g in zip(alone, peaks_before, strict=True))
        seconds = statistics.median(alone)
        result[f"{precision}_matmuls_alone_seconds"] = round(seconds, 3)
        result[f"{precision}_matmuls_alone_fraction_of_peak"] = round(fraction, 4)
        print(
            f"{precision + ' matmuls':>15}: {replay.flops / seconds / 1e9:7.1f} GFLOP/s = {fraction:6.1%} "
            f"of the {precision} matmul peak, the steps' {len(replay.calls)} matmuls alone, back to back "
            f"({seconds:.2f} s): the most steps of these shapes can reach",
            flush=True,
        )
        kinds = replay.by_kind()
        kinds_seconds = sum(t for t, _ in kinds.values())
        by_kind = {
            kind: {
                "time_share": round(t / kinds_seconds, 4),
                "flops_share": round(f / replay.flops, 4),
                "gflops": round(f / t / 1e9, 1),
            }
            for kind, (t, f) in kinds.items()
        }
        result[f"{precision}_matmuls_alone_by_kind"] = by_kind
        for kind, share in by_kind.items():
            print(
                f"{'':>17}{kind + ':':<16}{share['time_share']:6.1%} of their time, "
                f"{share['flops_share']:6.1%} of their FLOPs, {share['gflops']:6.1f} GFLOP/s",
                flush=True,
            )
    for name, precision, *_ in variants:
        seconds = statistics.median(w for w, _ in runs[name])
        # each repeat against the peak measured just before it
        peaks_before = peak_runs[precision][: len(runs[name])]
        fractions = [flops[precision] / w / 1e9 / g for (w, _), g in zip(runs[name], peaks_before, strict=True)]
        cpu_s = statistics.median(c for _, c in runs[name])
        steps, run_tokens = len(measured[precision]), counted[precision]
        result[f"{name}_steps"] = steps
        result[f"{name}_tokens_per_s"] = round(run_tokens / seconds, 1)
        result[f"{name}_seconds"] = round(seconds, 3)
        result[f"{name}_cpu_seconds"] = round(cpu_s, 3)
        result[f"{name}_gflops"] = round(flops[precision] / seconds / 1e9, 1)
        result[f"{name}_fraction_of_peak"] = round(statistics.median(fractions), 4)
        result[f"{name}_fraction_of_peak_runs"] = [round(f, 4) for f in fractions]
        print(
            f"{name:>15}: {run_tokens / seconds:8.1f} tokens/s, {flops[precision] / seconds / 1e9:7.1f} GFLOP/s "
            f"= {statistics.median(fractions):6.1%} of the {precision} matmul peak ({peaks[precision]:.0f} GFLOP/s); "
            f"{seconds:.2f} s wall, {cpu_s:.2f} s CPU per {steps} steps",
            flush=True,
        )
    result["bf16_speedup_over_fp32"] = round(float(result["bf16_tokens_per_s"]) / float(result["fp32_tokens_per_s"]), 2)
    other = "fp32" if chosen == "bf16" else "bf16"
    result["auto_speedup"] = round(float(result[f"{chosen}_tokens_per_s"]) / float(result[f"{other}_tokens_per_s"]), 2)
    print(f"train.precision=auto -> {chosen}: {result['auto_speedup']}x the tokens/s of {other}", flush=True)
    result["auto_fraction_of_peak"] = result[f"{chosen}_fraction_of_peak"]
    if not args.no_compile:
        result["auto_compiled_fraction_of_peak"] = result[f"{chosen}-compiled_fraction_of_peak"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
