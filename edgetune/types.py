"""Names for the shapes and choices that every floor shares.

``StateDict`` is a set of named tensors (an adapter, a delta, a residual). The ``Literal``
types are the closed choices of the run config; :mod:`edgetune.config` validates them at the
boundary, so code below it may match on them without a fallback branch.
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import Tensor

__all__ = [
    "CODECS",
    "DP_ACCOUNTANTS",
    "DP_CLIP_SITES",
    "DP_SAMPLINGS",
    "ENGINES",
    "PARTITIONS",
    "PRECISIONS",
    "Codec",
    "DpAccountant",
    "DpClipSite",
    "DpSampling",
    "Engine",
    "Partition",
    "Precision",
    "TRAIN_PRECISIONS",
    "TrainPrecision",
    "StateDict",
]

StateDict = dict[str, Tensor]
"""Named tensors, e.g. ``{"...q_proj.lora_B.weight": Tensor (out, r)}``."""

Codec = Literal["1bit", "2bit", "fp16", "fp32"]
"""How an adapter update travels: sign bits + per-row scales, or plain floats."""
Precision = Literal["bf16", "fp32"]
"""The compute precision of local training and evaluation."""
TrainPrecision = Literal["auto", "bf16", "fp32"]
"""``train.precision``: a compute precision, or ``auto`` (chosen per CPU, ``edgetune/precision.py``)."""
Engine = Literal["pytorch", "onnxruntime"]
"""What trains on the device."""
Partition = Literal["lang-topic", "iid", "dirichlet"]
"""How the embedded corpus is split into simulated devices."""
DpClipSite = Literal["server", "device"]
DpAccountant = Literal["rdp", "pld"]
DpSampling = Literal["poisson", "fixed"]

CODECS: tuple[str, ...] = get_args(Codec)
PRECISIONS: tuple[str, ...] = get_args(Precision)
TRAIN_PRECISIONS: tuple[str, ...] = get_args(TrainPrecision)
ENGINES: tuple[str, ...] = get_args(Engine)
PARTITIONS: tuple[str, ...] = get_args(Partition)
DP_CLIP_SITES: tuple[str, ...] = get_args(DpClipSite)
DP_ACCOUNTANTS: tuple[str, ...] = get_args(DpAccountant)
DP_SAMPLINGS: tuple[str, ...] = get_args(DpSampling)
