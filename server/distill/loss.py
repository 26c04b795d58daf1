"""Token-level distillation losses: forward, reverse and skew KL on softened distributions.

The teacher's distribution is kept as its top-k log-probabilities (at temperature ``T``)
plus one "rest" bucket holding the mass of every other token, so the cache stores k values
and k indices per supervised position instead of the whole vocabulary. The student's
distribution is coarsened onto the same k + 1 buckets, and the divergence is taken between
the two coarsened distributions. With ``k`` equal to the vocabulary size the rest bucket is
empty and the divergence is exact; with smaller ``k`` it is a lower bound of the full one
(coarsening never increases a KL divergence).

For teacher p and student q over the same buckets:

    forward   KL(p || q)              = sum_i p_i (log p_i - log q_i)
    reverse   KL(q || p)              = sum_i q_i (log q_i - log p_i)
    skew      KL(p || l p + (1 - l) q) = sum_i p_i (log p_i - log(l p_i + (1 - l) q_i))

(skew KL as in DistiLLM, Ko et al. 2024, with skew ``l`` in [0, 1): ``l = 0`` is forward KL;
larger ``l`` keeps the target finite where the student puts almost no mass).

The training loss on the supervised positions is

    loss = alpha * T^2 * mean_positions(KL) + (1 - alpha) * CE(student logits at T = 1, labels)

The ``T^2`` factor keeps the gradient scale of the soft term independent of ``T`` (Hinton et al.).
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgetune.server.distill.config import KL_KINDS

__all__ = ["KL_KINDS", "coarsen_student", "distill_loss", "divergence", "teacher_topk"]


_TINY = 1e-12  # floor for probabilities before a log, so an empty rest bucket stays finite


def teacher_topk(logits: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """The teacher's top-k log-probabilities at temperature ``T`` and their token ids.

    Args:
        logits: ``(N, V)`` teacher logits at the supervised positions.
        k: How many tokens to keep; ``k >= V`` keeps all of them.
        temperature: Softening temperature ``T > 0``.

    Returns:
        ``(logp, index)``, each ``(N, min(k, V))``: ``log softmax(logits / T)`` of the kept
        tokens (highest first) and their vocabulary ids.
    """
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    values, index = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return values, index


def _with_rest(probs: Tensor) -> Tensor:
    """Append the rest bucket ``1 - sum(probs)`` (clamped at 0): ``(N, k) -> (N, k + 1)``."""
    rest = (1.0 - probs.sum(dim=-1, keepdim=True)).clamp_min(0.0)
    return torch.cat([probs, rest], dim=-1)


def coarsen_student(student_logits: Tensor, index: Tensor, temperature: float) -> Tensor:
    """The student's softened distribution on the teacher's k tokens plus the rest bucket.

    Args:
        student_logits: ``(N, V)`` student logits.
        index: ``(N, k)`` token ids of the teacher's kept tokens.
        temperature: Softening temperature ``T > 0``.

    Returns:
        ``(N, k + 1)`` probabilities summing to 1 per row.
    """
    probs = torch.softmax(student_logits.float() / temperature, dim=-1)
    return _with_rest(probs.gather(-1, index.long()))


def divergence(p: Tensor, q: Tensor, kind: str, skew: float = 0.1) -> Tensor:
    """KL-type divergence between teacher ``p`` and student ``q`` per row.

    Args:
        p: ``(..., K)`` teacher probabilities (rows sum to 1).
        q: ``(..., K)`` student probabilities over the same buckets.
        kind: ``forward-kl``, ``reverse-kl`` or ``skew-kl`` (formulas in the module docstring).
        skew: ``l`` of the skew KL, in ``[0, 1)``.

    Returns:
        ``(...)`` divergences, >= 0.

    Raises:
        ValueError: unknown ``kind`` or ``skew`` outside ``[0, 1)``.
    """
    if kind == "forward-kl":
        return (torch.xlogy(p, p) - p * q.clamp_min(_TINY).log()).sum(-1)
    if kind == "reverse-kl":
        return (torch.xlogy(q, q) - q * p.clamp_min(_TINY).log()).sum(-1)
    if kind == "skew-kl":
        if not 0.0 <= skew < 1.0:
            raise ValueError(f"skew KL needs skew in [0, 1), got {skew}")
        mix = skew * p + (1.0 - skew) * q
        return (torch.xlogy(p, p) - p * mix.clamp_min(_TINY).log()).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; expected one of {KL_KINDS}")


def distill_loss(
    student_logits: Tensor,
    labels: Tensor,
    teacher_logp: Tensor,
    teacher_index: Tensor,
    *,
    kind: str,
    temperature: float,
    alpha: float,
    skew: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """``alpha * T^2 * KL + (1 - alpha) * CE``, each averaged over the N supervised positions.

    Args:
        student_logits: ``(N, V)`` student logits at the supervised positions.
        labels: ``(N,)`` next-token ids at those positions.
        teacher_logp: ``(N, k)`` cached teacher log-probabilities at temperature ``T``.
        teacher_index: ``(N, k)`` their token ids.
        kind: The divergence (see :func:`divergence`).
        temperature: ``T``, the same one the teacher cache was written with.
        alpha: Weight of the soft term in ``[0, 1]``.
        skew: ``l`` of the skew KL.

    Returns:
        ``(loss, kl, ce)``: the combined loss and its two parts (means over positions).
    """
    p = _with_rest(teacher_logp.float().exp())
    q = coarsen_student(student_logits, teacher_index, temperature)
    kl = divergence(p, q, kind, skew).mean()
    ce = torch.nn.functional.cross_entropy(student_logits.float(), labels)
    return alpha * temperature**2 * kl + (1.0 - alpha) * ce, kl, ce
