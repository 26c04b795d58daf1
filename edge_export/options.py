"""What every export format shares: the user's options, the stage hook, the Runner and format protocols.

A small module of its own so that the pipeline (which imports every format) and the formats
(which need these types) do not import each other.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from edgetune.edge_export.errors import ExportError

__all__ = [
    "FLOAT_TYPES",
    "QUANTIZE",
    "STAGES",
    "ExportFormat",
    "ExportOptions",
    "Runner",
    "Stage",
    "stage_printer",
]

STAGES = ("load", "merge", "export", "lower", "serialise", "parity")
QUANTIZE = ("none", "8bit", "4bit")
FLOAT_TYPES = ("f32", "f16")

Stage = Callable[[str], AbstractContextManager[None]]
"""``stage("lower")`` opens a named pipeline stage; it prints its start and its wall time."""


@dataclass(frozen=True)
class ExportOptions:
    """What the user chose for one export (format-independent)."""

    out: Path
    """Output folder; created if missing. The artefact and ``parity.json`` go here."""
    quantize: str = "none"
    """Weight quantisation: ``none``, ``8bit`` or ``4bit`` (pte only; other formats reject
    anything but ``none`` with an :class:`ExportError`)."""
    backend: str = "xnnpack"
    """Lowering backend of the pte format: ``xnnpack``, ``coreml``, ``qnn``, ``portable``...
    Other formats ignore it."""
    max_seq_len: int = 256
    """KV-cache length / static sequence length of the exported model (prompt + new tokens)."""
    float_type: str = "f32"
    """Storage type of weights that are not quantised: ``f32`` or ``f16`` (gguf only; the
    other formats export fp32 and reject ``f16``)."""

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE:
            raise ExportError(f"--quantize {self.quantize!r}: choose one of {', '.join(QUANTIZE)}")
        if self.float_type not in FLOAT_TYPES:
            raise ExportError(f"--float-type {self.float_type!r}: choose one of {', '.join(FLOAT_TYPES)}")
        if self.max_seq_len < 8:
            raise ExportError(f"--max-seq-len {self.max_seq_len}: must be at least 8")


class Runner(Protocol):
    """A loaded artefact, as the parity check drives it (batch 1, greedy)."""

    def next_token_logits(self, ids: list[int]) -> np.ndarray:
        """Logits (vocab,) fp32 for the token after ``ids`` (a fresh sequence, no state kept)."""
        ...

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Exactly ``max_new_tokens`` greedy new ids after ``ids`` (no stop at EOS)."""
        ...


class ExportFormat(Protocol):
    """One artefact format: how to write it and how to run it back.

    A format may also define ``check_options(opts) -> None`` raising :class:`ExportError`;
    the pipeline calls it before loading the model, so a bad choice fails in a second.
    """

    name: str

    def export(
        self, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, opts: ExportOptions, stage: Stage
    ) -> Path:
        """Write the artefact for the merged ``model`` under ``opts.out`` and return its path.

        Raises:
            ExportError: an unsupported choice (backend, quantisation, architecture).
        """
        ...

    def load(self, artefact: Path) -> Runner:
        """Load an artefact this format wrote.

        Raises:
            RunnerUnavailable: the artefact cannot run on this machine (e.g. Core ML on Linux).
        """
        ...


def stage_printer(
    seconds: dict[str, float], print_fn: Callable[[str], None] = print, warned: list[str] | None = None
) -> Stage:
    """Make the ``stage`` context manager: numbered lines with wall times, recorded in ``seconds``.

    Python warnings raised inside a stage (transformers', torch.export's and ExecuTorch's notes
    about their own internals) do not reach the console: each distinct one is appended to
    ``warned`` as ``"stage: Category: message"`` (dropped when ``warned`` is None).

    Example:
        >>> times = {}
        >>> stage = stage_printer(times)
        >>> with stage("lower"):  # prints "[4/6] lower ..." then "[4/6] lower done in 0.0 s"
        ...     pass
    """

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        number = f"[{STAGES.index(name) + 1}/{len(STAGES)}]" if name in STAGES else "[-]"
        print_fn(f"{number} {name} ...")
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:  # the filters in force still apply
            yield
        if warned is not None:
            for w in caught:
                line = f"{name}: {w.category.__name__}: {str(w.message).splitlines()[0]}"
                if line not in warned:
                    warned.append(line)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        print_fn(f"{number} {name} done in {seconds[name]:.1f} s")

    return stage
