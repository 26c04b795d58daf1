"""Parity of an exported artefact with eager PyTorch: token agreement, logit error, speed.

Method (the same for every format, on :data:`PROMPTS`, each chat-templated with a
generation prompt):

1. Eager PyTorch greedily generates ``new_tokens`` tokens after the prompt (HF ``generate``,
   plain argmax at every step: no stop at EOS and no EOS suppression, like the runners).
   Call the result S = prompt + continuation.
2. Teacher-forced agreement: the artefact's runner and the eager model both score S; at
   every position t (prompt and continuation alike) we compare their top-1 next token and
   their logits. ``top1_agreement`` = matching positions / all positions, over all prompts;
   ``max_abs_logit_diff`` = the largest |runner - eager| over every position and vocabulary
   entry. Runners with a ``sequence_logits(ids)`` method score S in one call; others are
   called once per prefix (``next_token_logits``).
3. Free-running agreement: the runner's own greedy ``generate`` after the prompt;
   ``greedy_match`` = tokens equal to eager's continuation before the first difference,
   over all prompts.
4. Speed: wall time of the runner's ``generate`` and of eager ``generate`` for the same
   prompts and the same number of new tokens (prefill included in both);
   tokens/s = new tokens / seconds, and ``speedup`` = runner / eager.

The report is a flat JSON dict (``parity.json`` next to the artefact).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from edgetune.edge_export.errors import ExportError
from edgetune.fileio import atomic_write_text

if TYPE_CHECKING:
    from edgetune.edge_export.options import ExportOptions, Runner

__all__ = [
    "PARITY_FILE",
    "PROMPTS",
    "EagerRunner",
    "check",
    "encode_prompts",
    "format_table",
    "skipped_report",
    "write_report",
]

PARITY_FILE = "parity.json"
PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "How many legs does a spider have?",
    "Bonjour ! Comment vas-tu ?",
)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: tuple[str, ...] = PROMPTS) -> list[list[int]]:
    """Chat-template each prompt as one user turn, with the assistant generation prompt."""
    encoded = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        encoded.append([int(i) for i in ids])
    return encoded


class EagerRunner:
    """The reference: the merged model in eager PyTorch, driven like an exported runner."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def sequence_logits(self, ids: list[int]) -> np.ndarray:
        """Logits (len(ids), V) fp32 at every position."""
        return self.model(torch.tensor([ids])).logits[0].float().numpy()

    def next_token_logits(self, ids: list[int]) -> np.ndarray:
        """Logits (V,) for the token after ``ids``."""
        return self.sequence_logits(ids)[-1]

    @torch.no_grad()
    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Exactly ``max_new_tokens`` greedy ids with HF ``generate`` (its default dynamic KV cache).

        Plain argmax at every step, EOS included: no EOS stop and no EOS suppression, so the
        tokens are the ones an exported runner's greedy loop produces.
        """
        config = copy.deepcopy(self.model.generation_config)
        config.update(eos_token_id=[], do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=None)
        if config.pad_token_id is None:
            config.pad_token_id = 0  # never used: batch 1, no padding; silences generate's warning
        out = self.model.generate(
            torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long), generation_config=config
        )
        return out[0, len(ids) :].tolist()


def _all_logits(runner: Runner, ids: list[int]) -> np.ndarray:
    """Logits (len(ids), V) at every position, in one call when the runner can."""
    if hasattr(runner, "sequence_logits"):
        return np.asarray(runner.sequence_logits(ids), dtype=np.float32)
    return np.stack([np.asarray(runner.next_token_logits(ids[: t + 1]), dtype=np.float32) for t in range(len(ids))])


def _timed_generate(runner: Runner, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    outputs = [runner.generate(ids, new_tokens) for ids in prompts]
    return outputs, time.perf_counter() - start


def _prefix_match(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def check(
    runner: Runner,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    format_name: str,
    opts: ExportOptions,
    *,
    new_tokens: int = 16,
    prompts: tuple[str, ...] = PROMPTS,
) -> dict[str, Any]:
    """Compare ``runner`` with the eager ``model`` (see the module docstring for the method).

    Returns:
        The report: agreement, logit error, greedy match, tokens/s of both and the speedup.

    Raises:
        ExportError: the longest prompt plus ``new_tokens`` does not fit ``opts.max_seq_len``.
    """
    eager = EagerRunner(model)
    encoded = encode_prompts(tokenizer, prompts)
    need = max(len(ids) for ids in encoded) + new_tokens
    if need >= opts.max_seq_len:
        raise ExportError(
            f"--max-seq-len {opts.max_seq_len} is too short for the parity prompts: "
            f"they need {need} tokens, so use at least {need + 1}"
        )
    runner.generate(encoded[0], 2)  # warm-up: first calls allocate and plan memory
    eager.generate(encoded[0], 2)
    eager_new, eager_s = _timed_generate(eager, encoded, new_tokens)
    runner_new, runner_s = _timed_generate(runner, encoded, new_tokens)
    agree = positions = matched = 0
    max_diff = 0.0
    for ids, reference_new, own_new in zip(encoded, eager_new, runner_new, strict=True):
        sequence = ids + reference_new
        got, want = _all_logits(runner, sequence), eager.sequence_logits(sequence)
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        positions += len(sequence)
        max_diff = max(max_diff, float(np.abs(got - want).max()))
        matched += _prefix_match(own_new, reference_new)
    total_new = new_tokens * len(encoded)
    return {
        "format": format_name,
        "backend": opts.backend if format_name == "pte" else None,
        "quantize": opts.quantize,
        "prompts": len(encoded),
        "positions": positions,
        "top1_agreement": agree / positions,
        "max_abs_logit_diff": max_diff,
        "greedy_match": matched / total_new,
        "new_tokens": total_new,
        "tokens_per_s": total_new / runner_s,
        "eager_tokens_per_s": total_new / eager_s,
        "speedup": eager_s / runner_s,
        "skipped": None,
    }


def skipped_report(format_name: str, opts: ExportOptions, reason: str) -> dict[str, Any]:
    """The report of an artefact that cannot run here: every figure ``None``, with the reason."""
    return {
        "format": format_name,
        "backend": opts.backend if format_name == "pte" else None,
        "quantize": opts.quantize,
        "skipped": reason,
    }


def format_table(report: dict[str, Any]) -> str:
    """A small human-readable table of one report.

    Example::

        parity (pte, xnnpack, quantize=none): 4 prompts, 208 positions
          top-1 agreement      100.00 %
          max |logit diff|     2.1e-05
          greedy match         100.00 %   (64 new tokens)
          tokens/s             812.4   (eager PyTorch 95.1, 8.54x)
    """
    where = ", ".join(str(v) for v in (report["format"], report.get("backend")) if v)
    head = f"parity ({where}, quantize={report['quantize']})"
    if report.get("skipped"):
        return f"{head}: skipped: {report['skipped']}"
    return "\n".join(
        [
            f"{head}: {report['prompts']} prompts, {report['positions']} positions",
            f"  top-1 agreement      {100 * report['top1_agreement']:.2f} %",
            f"  max |logit diff|     {report['max_abs_logit_diff']:.2g}",
            f"  greedy match         {100 * report['greedy_match']:.2f} %   ({report['new_tokens']} new tokens)",
            f"  tokens/s             {report['tokens_per_s']:.1f}   "
            f"(eager PyTorch {report['eager_tokens_per_s']:.1f}, {report['speedup']:.2f}x)",
        ]
    )


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write the report as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
