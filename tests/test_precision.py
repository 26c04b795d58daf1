"""Tests for edgetune/precision.py: ``train.precision=auto`` follows the CPU's bf16 units;
an explicit choice wins; devices resolve it where they parse the run config."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from edgetune.config import ConfigError, RunConfig, TrainConfig
from edgetune.precision import cpu_flags, matmul_gflops, resolve_precision, resolve_run, resolved_for_this_cpu

X86 = frozenset({"sse2", "avx", "avx2", "avx512f"})


@pytest.mark.parametrize(
    ("flags", "expect", "reason"),
    [
        (X86 | {"avx512_bf16"}, "bf16", "avx512_bf16"),
        (X86 | {"amx_bf16", "amx_tile"}, "bf16", "amx_bf16"),
        (X86 | {"amx_bf16", "avx512_bf16"}, "bf16", "amx_bf16+avx512_bf16"),
        (X86, "fp32", "no bf16 units"),  # AVX-512 alone: bf16 matmuls are emulated and slow
    ],
)
def test_auto_follows_the_bf16_matrix_units(flags: frozenset[str], expect: str, reason: str) -> None:
    assert resolve_precision("auto", flags) == resolve_precision("auto", flags)
    resolved = resolve_precision("auto", flags)
    assert (resolved.precision, resolved.reason) == (expect, reason)
    assert resolved.describe("auto") == f"{expect} (auto: {reason})"


@pytest.mark.parametrize("explicit", ["bf16", "fp32"])
def test_an_explicit_choice_wins_on_any_cpu(explicit: str) -> None:
    for flags in (X86, X86 | {"amx_bf16"}, frozenset()):
        assert resolve_precision(explicit, flags).precision == explicit
    assert resolve_precision(explicit, X86).describe(explicit) == explicit


def test_without_flags_a_sub_second_measurement_decides() -> None:
    start = time.perf_counter()
    resolved = resolve_precision("auto", frozenset())  # another OS or architecture
    assert time.perf_counter() - start < 1.0
    assert resolved.precision in ("bf16", "fp32") and resolved.reason.startswith("measured bf16/fp32 matmul")
    assert matmul_gflops(torch.float32, n=64, seconds=0.01) > 0


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(x86) == {"fpu", "sse2", "avx512_bf16"}  # the first processor's
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(arm) == {"fp", "asimd", "bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_resolve_run_is_the_default_and_keeps_explicit_configs() -> None:
    cfg = RunConfig()
    assert cfg.train.precision == "auto"
    resolved = resolve_run(cfg)
    assert resolved.train.precision == resolved_for_this_cpu("auto").precision in ("bf16", "fp32")
    assert resolved.train.local_steps == cfg.train.local_steps and resolved.lora == cfg.lora
    explicit = RunConfig(train=TrainConfig(precision="fp32"))
    assert resolve_run(explicit) is explicit
    with pytest.raises(ConfigError, match="train.precision='fp16'"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="expected auto, bf16 or fp32"):
        resolve_precision("fp16")
