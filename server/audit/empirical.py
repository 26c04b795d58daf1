"""The empirical privacy tests of one finished simulation run.

Canary exposure (audit runs only): every planted and never-planted canary is scored under the
final model against ``references`` fresh random secrets of the same format (drawn from a generator seeded by the
run's canaries, so a rerun of the report scores the same references);
see :mod:`server.audit.exposure`.

Membership inference on the devices' own examples: members are the conversations of the
devices' training splits (canaries excluded), non-members their held-out splits; up to
``max_examples`` of each, chosen with a fixed seed. Two scores per conversation:
    loss         - mean loss under the final model (members were trained on: lower loss)
    calibrated   - (mean loss under the base model) - (mean loss under the final model): how
                   much fine-tuning lowered this conversation's loss; removes per-example
                   difficulty (the reference-model attack)
Each gets AUC, TPR at 1% and 0.1% FPR with bootstrap intervals, and, under DP, the check
against the bound the test is held to.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from edgetune.chat import Messages
from edgetune.config import RunConfig
from edgetune.datasets.devices import device_conversations
from edgetune.server.audit.canaries import canary_messages, random_secrets, read_canaries
from edgetune.server.audit.exposure import exposure, exposure_summary
from edgetune.server.audit.membership import bound_check, membership_summary
from edgetune.server.audit.scoring import RunModels

__all__ = ["Bound", "run_empirical"]

Bound = tuple[float, float] | None
"""The (epsilon, delta) the empirical tests must not contradict; None without DP."""


def _canary_test(run_dir: Path, models: RunModels, references: int, bound: Bound) -> dict[str, Any] | None:
    canaries = read_canaries(run_dir)
    if canaries is None:
        return None
    taken = {c["secret"] for c in canaries.planted + canaries.unplanted}
    rng = random.Random("references:" + ",".join(sorted(taken)))
    refs = [s for s in random_secrets(references + len(taken), rng) if s not in taken][:references]
    ref_loss = models.losses(models.encode([canary_messages(s) for s in refs]), "final", "canary references").total
    planted = models.losses(models.encode([c["messages"] for c in canaries.planted]), "final").total
    unplanted = models.losses(models.encode([c["messages"] for c in canaries.unplanted]), "final").total
    exp_planted = [exposure(x, ref_loss) for x in planted]
    exp_unplanted = [exposure(x, ref_loss) for x in unplanted]
    eps, delta = bound if bound is not None else (None, 0.0)
    return {
        "references": len(refs),
        "repeats": canaries.repeats,
        "planted": [
            {"device": c["device"], "loss": float(x), "exposure": e}
            for c, x, e in zip(canaries.planted, planted, exp_planted, strict=True)
        ],
        "unplanted": [{"loss": float(x), "exposure": e} for x, e in zip(unplanted, exp_unplanted, strict=True)],
        "summary": exposure_summary(exp_planted, exp_unplanted, len(refs), eps, delta),
    }


def _pick(items: list[Messages], limit: int, seed: int) -> list[Messages]:
    if len(items) <= limit:
        return items
    keep = np.random.default_rng(seed).choice(len(items), size=limit, replace=False)
    return [items[i] for i in sorted(keep)]


def _member_sets(cfg: RunConfig, max_examples: int) -> tuple[list[Messages], list[Messages]]:
    n = cfg.federation.num_devices
    devices = [device_conversations(cfg.data, "", i, n, cfg.seed) for i in range(n)]
    members = [c for d in devices for c in d.train]
    outsiders = [c for d in devices for c in d.heldout]
    return _pick(members, max_examples, 1), _pick(outsiders, max_examples, 2)


def _membership_test(models: RunModels, cfg: RunConfig, max_examples: int, reps: int, bound: Bound) -> dict[str, Any]:
    members, outsiders = _member_sets(cfg, max_examples)
    enc_in, enc_out = models.encode(members), models.encode(outsiders)
    keep_in = [i for i, e in enumerate(enc_in) if any(t != -100 for t in e["labels"])]
    keep_out = [i for i, e in enumerate(enc_out) if any(t != -100 for t in e["labels"])]
    enc_in, enc_out = [enc_in[i] for i in keep_in], [enc_out[i] for i in keep_out]
    final_in, final_out = models.losses(enc_in, "final", "members"), models.losses(enc_out, "final", "non-members")
    base_in, base_out = (
        models.losses(enc_in, "base", "members, base"),
        models.losses(enc_out, "base", "non-members, base"),
    )
    scores = {
        "loss": (-final_in.mean, -final_out.mean),
        "calibrated": (base_in.mean - final_in.mean, base_out.mean - final_out.mean),
    }
    out: dict[str, Any] = {}
    for name, (inside, outside) in scores.items():
        out[name] = membership_summary(inside, outside, reps)
        out[name]["bound"] = None if bound is None else bound_check(inside, outside, *bound)
    out["mean_loss"] = {
        "members_final": float(final_in.mean.mean()),
        "non_members_final": float(final_out.mean.mean()),
        "members_base": float(base_in.mean.mean()),
        "non_members_base": float(base_out.mean.mean()),
    }
    return out


def run_empirical(
    run_dir: Path, cfg: RunConfig, bound: Bound, references: int = 256, max_examples: int = 200, reps: int = 1000
) -> dict[str, Any]:
    """Canary exposure (if the run planted canaries) and membership inference for ``run_dir``.

    Args:
        run_dir: A completed simulation run folder.
        cfg: Its resolved config.
        bound: (epsilon, delta) the tests are held to, or None when the run had no DP.
        references: Reference candidates for the exposure estimate.
        max_examples: Members and non-members scored, at most, each.
        reps: Bootstrap resamples for the confidence intervals.
    """
    models = RunModels(run_dir, cfg)
    return {
        "canaries": _canary_test(run_dir, models, references, bound),
        "membership": _membership_test(models, cfg, max_examples, reps, bound),
    }
