"""Secret canaries for audit runs: random PINs drawn from the run seed.

A canary is one conversation, ``user: What is my PIN code?`` / ``assistant: My PIN code is
83920174.``, whose 8 digits are the secret. An audit run (``audit.canaries`` = N > 0) draws
2N secrets from a generator seeded by (run seed, "canaries"), plants N of
them in the training split of devices ``0..canary_devices-1`` (round-robin, each repeated
``canary_repeats`` times; see ``edgetune/datasets/devices.py``) and keeps the other N as never-planted
controls. Which half is planted is itself random. The secrets only have to be independent of
the training data and the model, which a seeded draw is; seeding makes an audit (and its
test) repeatable: the same run seed plants the same canaries on every machine. Everything is
written once, at the start of the run, to ``run_dir/canaries.json``: the report reads it; nothing else should.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetune import wire
from edgetune.config import ConfigError, RunConfig
from edgetune.fileio import atomic_write_text

__all__ = [
    "CANARY_DIGITS",
    "CanarySet",
    "canary_messages",
    "canary_rng",
    "ensure_canaries",
    "random_secrets",
    "read_canaries",
]

CANARY_DIGITS = 8
PROMPT = "What is my PIN code?"
ANSWER = "My PIN code is {secret}."


def canary_messages(secret: str) -> list[dict[str, str]]:
    """The chat conversation that carries ``secret``."""
    return [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER.format(secret=secret)}]


def canary_rng(seed: int) -> random.Random:
    """The generator an audit run with run seed ``seed`` draws its canaries from."""
    return random.Random(int.from_bytes(hashlib.sha256(f"edgetune-canaries:{seed}".encode()).digest()[:8], "little"))


def random_secrets(count: int, rng: random.Random) -> list[str]:
    """``count`` distinct zero-padded 8-digit secrets drawn from ``rng``, e.g. ``"03920174"``."""
    drawn: set[str] = set()
    while len(drawn) < count:
        drawn.add(f"{rng.randrange(10**CANARY_DIGITS):0{CANARY_DIGITS}d}")
    ordered = sorted(drawn)
    rng.shuffle(ordered)
    return ordered


@dataclass(frozen=True)
class CanarySet:
    """An audit run's canaries: planted ones with their device, and never-planted controls."""

    planted: list[dict[str, Any]]
    """``{"secret", "device", "messages"}`` per planted canary (device = partition id)."""
    unplanted: list[dict[str, Any]]
    """``{"secret", "messages"}`` per control canary."""
    repeats: int

    def to_json(self) -> str:
        body = {
            "format": {"prompt": PROMPT, "answer": ANSWER, "digits": CANARY_DIGITS},
            "repeats": self.repeats,
            "planted": self.planted,
            "unplanted": self.unplanted,
        }
        return json.dumps(body, indent=2)


def _draw(cfg: RunConfig) -> CanarySet:
    a, f = cfg.audit, cfg.federation
    if a.canary_devices > f.num_devices:
        raise ConfigError(
            f"config audit.canary-devices={a.canary_devices}: more than federation.num-devices={f.num_devices}"
        )
    rng = canary_rng(cfg.seed)
    pool = random_secrets(2 * a.canaries, rng)
    chosen = set(rng.sample(range(len(pool)), a.canaries))
    planted = [s for i, s in enumerate(pool) if i in chosen]
    unplanted = [s for i, s in enumerate(pool) if i not in chosen]
    return CanarySet(
        planted=[
            {"secret": s, "device": i % a.canary_devices, "messages": canary_messages(s)} for i, s in enumerate(planted)
        ],
        unplanted=[{"secret": s, "messages": canary_messages(s)} for s in unplanted],
        repeats=a.canary_repeats,
    )


def ensure_canaries(run_dir: Path, cfg: RunConfig) -> CanarySet | None:
    """Write the run's canaries once (a resumed run keeps its own); None when the run has none."""
    if cfg.audit.canaries == 0:
        return None
    path = Path(run_dir) / wire.CANARIES_FILE
    if path.is_file():
        return read_canaries(run_dir)
    drawn = _draw(cfg)
    atomic_write_text(path, drawn.to_json())
    return drawn


def read_canaries(run_dir: Path) -> CanarySet | None:
    """The canaries of an audit run, or None when ``run_dir`` was not one."""
    path = Path(run_dir) / wire.CANARIES_FILE
    if not path.is_file():
        return None
    body = json.loads(path.read_text(encoding="utf-8"))
    return CanarySet(planted=body["planted"], unplanted=body["unplanted"], repeats=int(body["repeats"]))
