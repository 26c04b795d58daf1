"""One round's exchange with the devices: who drops out, sending, and collecting replies.

A simulation must give the same result on an idle machine and on a loaded one, so in
simulation nothing wall-clock decides who is in a round:

    dropouts   each sampled device drops out with probability p, drawn from
               (run seed, round, device id): a rerun drops the same devices
    exchange   simulation (``timeout=None``): push every message and wait for every reply,
               showing devices done of sampled and tokens/s inside the round;
               real deployments: Flower's ``send_and_receive`` with the reply timeout

Example:
    >>> sorted(dropouts(["sim-0", "sim-1", "sim-2"], 0.0, seed=1, round_=1))
    []
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid
from tqdm import tqdm

from edgetune import wire

__all__ = ["Interrupted", "dropouts", "exchange", "uniform"]

_PULL_INTERVAL = 0.1  # seconds between polls of the in-memory grid


class Interrupted(RuntimeError):
    """The run was asked to stop (Ctrl-C or SIGTERM in ``edgetune simulate``)."""


def uniform(*parts: object) -> float:
    """A number in [0, 1) fixed by ``parts`` (SHA-256 of their repr): same parts, same number."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def dropouts(devices: Iterable[str], probability: float, seed: int, round_: int) -> set[str]:
    """The devices among ``devices`` that drop out of training round ``round_``.

    Device ``d`` drops out when ``uniform("dropout", seed, round_, d) < probability``: each
    device independently, and the same devices on every rerun whatever the machine's load.
    """
    if not 0 <= probability < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {probability}")
    return {d for d in devices if uniform("dropout", seed, round_, d) < probability}


def _tokens(msg: Message) -> float:
    if msg.has_error() or wire.METRICS not in msg.content.metric_records:
        return 0.0
    value = msg.content.metric_records[wire.METRICS].get(wire.NUM_TOKENS, 0)
    return float(value) if isinstance(value, int | float) and value == value else 0.0


def exchange(
    grid: Grid, messages: list[Message], timeout: float | None, desc: str, stop: threading.Event | None = None
) -> list[Message]:
    """Send ``messages`` and return the replies.

    Args:
        grid: The Flower Grid.
        messages: One message per device.
        timeout: Seconds to wait (real deployments); None waits for every reply (simulation,
            where a device that fails still answers, with an error reply).
        desc: What the in-round progress bar says (simulation only).
        stop: Set when the run must stop; checked between polls (simulation only).

    Raises:
        Interrupted: ``stop`` was set before every reply came back.
    """
    if timeout is not None:
        return list(grid.send_and_receive(messages, timeout=timeout))
    if not messages:
        return []
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    start, tokens = time.perf_counter(), 0.0
    with tqdm(total=len(pending), desc=desc, unit="device", leave=False) as bar:
        while pending:
            if stop is not None and stop.is_set():
                raise Interrupted(f"{desc}: stopped with {len(replies)} of {len(messages)} replies in")
            got = list(grid.pull_messages(pending))
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not got:
                time.sleep(_PULL_INTERVAL)
                continue
            replies.extend(got)
            tokens += sum(_tokens(m) for m in got)
            bar.update(len(got))
            bar.set_postfix(tokens_per_s=f"{tokens / max(time.perf_counter() - start, 1e-9):.0f}")
    return replies
