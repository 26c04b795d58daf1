"""Local training of the adapter on one device's batches.

The loss and the held-out loop are the kernel's (:mod:`edgetune.lm`); the model is the
process-wide one of :func:`edgetune.adapters.lora.device_model`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from peft import PeftModel

from edgetune.adapters.fused import prepare_stacks
from edgetune.chat import pack_rows
from edgetune.config import TrainConfig
from edgetune.lm import StepStats, autocast, causal_lm, summed_loss
from edgetune.memory import return_free_heap
from edgetune.precision import compiler_found

__all__ = ["adapter_optimizer", "compile_decoder", "set_checkpointing", "train_local", "uncompiled"]


def set_checkpointing(model: PeftModel, on: bool) -> None:
    """Recompute each decoder layer's activations in the backward pass (``on``) or keep them.

    Non-reentrant checkpointing: gradients reach the adapter without the inputs needing one.
    """
    lm = model.get_base_model()
    if on and not lm.is_activation_checkpointing:
        lm.activation_checkpointing_enable({"use_reentrant": False})
    elif not on and lm.is_activation_checkpointing:
        lm.activation_checkpointing_disable()


def compile_decoder(model: PeftModel) -> None:
    """``torch.compile`` each decoder layer of ``model`` in place, once per process.

    Regional compilation: every layer is the same code, so Dynamo traces it once and the
    graph serves all of them; ``dynamic=True`` lets batch and sequence lengths vary without
    recompiling. The compiled code runs the first time a layer is called (20-45 s on
    SmolLM2 with the inductor cache cold). Evaluation runs without it
    (:func:`uncompiled`). The graphs multiply by the stacked projections, checked here
    eagerly before every run of steps (:func:`prepare_stacks <edgetune.adapters.fused.prepare_stacks>`).

    Raises:
        ValueError: no C++ compiler for inductor's kernels on this machine.
    """
    if not compiler_found():
        raise ValueError("train.compile=on: torch.compile's CPU backend needs a C++ compiler (g++, clang++ or $CXX)")
    prepare_stacks(model)
    for layer in causal_lm(model).model.layers:  # type: ignore[union-attr]
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile(dynamic=True)


def uncompiled() -> contextlib.AbstractContextManager[None]:
    """Run compiled modules eagerly inside this block: the held-out loop (no gradient) would
    otherwise compile graphs of its own, which a few dozen conversations a round never repay."""
    return torch.compiler.set_stance("force_eager")


def adapter_optimizer(params: list[torch.Tensor], lr: float, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over the adapter tensors (PyTorch's default on CPU: one tensor at a time).

    ``fused=True`` (PyTorch's CPU fused AdamW) showed no consistent gain on SmolLM2's 210
    small B-only tensors (``bench_throughput``, three runs on a busy machine: 9-22% more CPU
    seconds in one, 2-12% fewer in two; docs/performance.md), so it is off; the benchmark
    keeps measuring it.
    """
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused)


def train_local(model: PeftModel, batches: Iterator[dict[str, torch.Tensor]], cfg: TrainConfig) -> StepStats:
    """Run ``cfg.local_steps`` AdamW steps on the trainable adapter tensors.

    The optimizer is fresh each round (devices keep no optimizer state between rounds).
    Each batch's examples are packed into as few rows as hold them (:func:`pack_rows`), so
    padding costs no work.
    ``cfg.checkpointing`` (resolved: ``on`` or ``off``) sets activation checkpointing on the
    decoder layers and the LM head (:func:`edgetune.lm.summed_loss`, ``chunked``); with it on,
    the freed heap goes back to the OS after every step (:mod:`edgetune.memory`).
    ``cfg.compile`` (resolved) compiles the decoder layers first (:func:`compile_decoder`).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adapter_optimizer(params, cfg.learning_rate)
    recompute = cfg.checkpointing == "on"
    set_checkpointing(model, recompute)
    if cfg.compile == "on":
        compile_decoder(model)
    model.train()
    total_loss, total_tokens, seen, start = 0.0, 0, 0, time.perf_counter()
    for _, batch in zip(range(cfg.local_steps), batches, strict=False):
        with autocast(cfg.precision):
            loss_sum, n = summed_loss(model, pack_rows(batch), chunked=recompute)
        (loss_sum / max(n, 1)).backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if recompute:
            return_free_heap()
        total_loss += loss_sum.item()
        total_tokens += n
        seen += int(batch["attention_mask"].sum())
    model.eval()
    return StepStats(total_loss / max(total_tokens, 1), total_tokens, seen, time.perf_counter() - start)
