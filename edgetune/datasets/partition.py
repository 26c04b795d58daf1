"""Splitting conversation slices across virtual devices, and each device into train/held-out.

Three schemes, chosen by name through ``partition``:

- ``"lang-topic"``: the natural non-IID split; device ``i`` is the ``i``-th largest
  (language, topic) slice and is named after it, e.g. ``"english/ai"``.
- ``"iid"``: all conversations pooled, shuffled and dealt into near-equal shares.
- ``"dirichlet"``: label skew over the slice labels (the LDA-style partition of Hsu et al.,
  2019): for every slice, device proportions ``p ~ Dir(alpha * 1)`` decide how its
  conversations are dealt out. Small ``alpha`` gives each device few labels; large ``alpha``
  approaches IID.

Every device then sets aside ``heldout_fraction * n`` of its ``n`` conversations, rounded half
up, for evaluation (at least 1, and at least 1 left for training). All randomness comes from
``numpy.random.default_rng`` seeded by ``seed``, so equal arguments give equal partitions.
Conversations are shared, not copied, between the input slices and the devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgetune.chat import Messages
from edgetune.datasets.corpus import Slices

__all__ = [
    "SCHEMES",
    "DeviceData",
    "partition",
    "partition_by_slice",
    "partition_dirichlet",
    "partition_iid",
    "split_heldout",
]

SCHEMES = ("lang-topic", "iid", "dirichlet")
_MIN_PER_DEVICE = 2  # one conversation to train on, one to hold out
_MAX_DIRICHLET_DRAWS = 100


@dataclass(frozen=True)
class DeviceData:
    """The conversations one virtual device owns."""

    name: str
    """Device name: ``"english/ai"`` for lang-topic, ``"iid-0"``/``"dirichlet-0"`` otherwise."""
    train: list[Messages]
    """Conversations for local fine-tuning."""
    heldout: list[Messages]
    """Conversations kept out of training, for evaluation."""


def _check_common(num_devices: int, heldout_fraction: float) -> None:
    """Validate the arguments every scheme shares."""
    if num_devices < 1:
        raise ValueError(f"num_devices must be at least 1, got {num_devices}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")


def split_heldout(
    name: str, conversations: list[Messages], heldout_fraction: float, rng: np.random.Generator
) -> DeviceData:
    """Hold out a random ``heldout_fraction`` (at least 1, leaving at least 1) of a device.

    Both parts keep the conversations' original relative order.
    """
    n = len(conversations)
    if n < _MIN_PER_DEVICE:
        raise ValueError(f"device {name!r} has {n} conversation(s); it needs at least 2")
    count = min(max(int(heldout_fraction * n + 0.5), 1), n - 1)
    held = set(rng.permutation(n)[:count].tolist())
    return DeviceData(
        name=name,
        train=[c for i, c in enumerate(conversations) if i not in held],
        heldout=[c for i, c in enumerate(conversations) if i in held],
    )


def _finish(names: list[str], shares: list[list[Messages]], heldout_fraction: float, seed: int) -> list[DeviceData]:
    """Split every device's share, each with its own stream so devices do not interact."""
    return [
        split_heldout(name, share, heldout_fraction, np.random.default_rng([seed, index]))
        for index, (name, share) in enumerate(zip(names, shares, strict=True))
    ]


def _pool(slices: Slices) -> tuple[list[Messages], np.ndarray]:
    """All conversations in sorted slice order, with each one's slice label (0, 1, ...)."""
    pooled: list[Messages] = []
    labels: list[int] = []
    for label, key in enumerate(sorted(slices)):
        pooled.extend(slices[key])
        labels.extend([label] * len(slices[key]))
    return pooled, np.asarray(labels, dtype=np.int64)


def _check_pool_size(total: int, num_devices: int) -> None:
    """Every device needs at least ``_MIN_PER_DEVICE`` conversations."""
    if total < _MIN_PER_DEVICE * num_devices:
        raise ValueError(f"{total} conversations cannot give {num_devices} devices at least {_MIN_PER_DEVICE} each")


def partition_by_slice(slices: Slices, num_devices: int, heldout_fraction: float, seed: int) -> list[DeviceData]:
    """One device per (language, topic) slice, taking the ``num_devices`` largest.

    Slices are ranked by size, largest first, ties broken by (language, topic) name.

    Raises:
        ValueError: Fewer slices than devices, a chosen slice has fewer than 2
            conversations, or an argument is out of range.
    """
    _check_common(num_devices, heldout_fraction)
    if len(slices) < num_devices:
        raise ValueError(f"{len(slices)} slices cannot fill {num_devices} devices, one each")
    ranked = sorted(slices, key=lambda key: (-len(slices[key]), key))[:num_devices]
    names = [f"{language}/{topic}" for language, topic in ranked]
    return _finish(names, [list(slices[key]) for key in ranked], heldout_fraction, seed)


def partition_iid(slices: Slices, num_devices: int, heldout_fraction: float, seed: int) -> list[DeviceData]:
    """Pool every slice, shuffle, and deal near-equal shares (sizes differ by at most 1).

    Raises:
        ValueError: Fewer than 2 conversations per device, or an argument out of range.
    """
    _check_common(num_devices, heldout_fraction)
    pooled, _ = _pool(slices)
    _check_pool_size(len(pooled), num_devices)
    order = np.random.default_rng(seed).permutation(len(pooled))
    shares = [[pooled[i] for i in part] for part in np.array_split(order, num_devices)]
    names = [f"iid-{i}" for i in range(num_devices)]
    return _finish(names, shares, heldout_fraction, seed)


def _dirichlet_assignment(
    labels: np.ndarray, num_devices: int, alpha: float, rng: np.random.Generator
) -> list[list[int]]:
    """Deal each label's indices to devices in ``Dir(alpha)`` proportions.

    Redraws (as in the reference LDA partition) until every device has at least
    ``_MIN_PER_DEVICE`` items; after ``_MAX_DIRICHLET_DRAWS`` failures it tops up the short
    devices with items taken from the largest, so small pools still terminate.
    """
    for _ in range(_MAX_DIRICHLET_DRAWS):
        shares: list[list[int]] = [[] for _ in range(num_devices)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            proportions = rng.dirichlet(np.full(num_devices, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for device, part in enumerate(np.split(members, cuts)):
                shares[device].extend(part.tolist())
        if min(len(share) for share in shares) >= _MIN_PER_DEVICE:
            return shares
    for share in shares:
        while len(share) < _MIN_PER_DEVICE:
            share.append(max(shares, key=len).pop())
    return shares


def partition_dirichlet(
    slices: Slices, num_devices: int, heldout_fraction: float, seed: int, alpha: float
) -> list[DeviceData]:
    """Label-skewed split: each slice is dealt to devices in ``Dir(alpha)`` proportions.

    Every device gets at least 2 conversations. Each device's conversations are in sorted
    slice order before the held-out split.

    Raises:
        ValueError: ``alpha`` is not positive, fewer than 2 conversations per device, or an
            argument is out of range.
    """
    _check_common(num_devices, heldout_fraction)
    if not alpha > 0.0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    pooled, labels = _pool(slices)
    _check_pool_size(len(pooled), num_devices)
    assignment = _dirichlet_assignment(labels, num_devices, alpha, np.random.default_rng(seed))
    shares = [[pooled[i] for i in sorted(indices)] for indices in assignment]
    names = [f"dirichlet-{i}" for i in range(num_devices)]
    return _finish(names, shares, heldout_fraction, seed)


def partition(
    slices: Slices,
    scheme: str,
    num_devices: int,
    heldout_fraction: float,
    seed: int,
    alpha: float = 0.5,
) -> list[DeviceData]:
    """Split slices across devices with the named scheme (see the module docstring).

    Args:
        slices: Conversations keyed by (language, topic).
        scheme: One of ``SCHEMES``: ``"lang-topic"``, ``"iid"`` or ``"dirichlet"``.
        num_devices: Number of virtual devices.
        heldout_fraction: Share of each device's conversations held out, in (0, 1).
        seed: Seed for every random choice.
        alpha: Dirichlet concentration; used only by ``"dirichlet"``.

    Returns:
        One ``DeviceData`` per device, in device order.

    Raises:
        ValueError: ``scheme`` is unknown (the message lists valid ones), or the chosen
            scheme rejects the arguments.
    """
    if scheme == "lang-topic":
        return partition_by_slice(slices, num_devices, heldout_fraction, seed)
    if scheme == "iid":
        return partition_iid(slices, num_devices, heldout_fraction, seed)
    if scheme == "dirichlet":
        return partition_dirichlet(slices, num_devices, heldout_fraction, seed, alpha)
    raise ValueError(f"unknown partition scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
