"""FedAvg over encoded adapter deltas, with per-device exact downlinks.

The server holds the global adapter at ``version`` (one version per completed round that
aggregated something) and every update it has broadcast. A device that holds version ``v``
needs the chain ``v+1 .. version``; the server sends that chain or the full adapter
(grid-dtype, exact), whichever is smaller. A device the server has not heard from gets the
chain from version 0, which is valid whatever it holds (devices skip updates they have).
The server keeps only the updates some chain cheaper than the full adapter still needs
(about 16 for 1-bit against fp16), so memory and checkpoints stay bounded over any run.

Aggregation (one round, valid replies ``i`` with deltas ``d_i`` and weights ``n_i``)::

    m        = sum_i n_i d_i / sum_i n_i           # FedAvg over deltas
    c        = m + r                               # r: the server's error-feedback residual
    payload  = encode(c); u = decode(payload)      # what every device will apply
    global'  = round_to_grid(global + u)           # the same rule devices use
    r'       = c - (global' - global)              # compression and rounding error carried on

Flower's strategies broadcast one payload to all and hold no per-device state, so this is
not a subclass of them; it is pure state and maths, and ``server/app.py`` drives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgetune.adapters.codec import (
    Payload,
    apply_update,
    compress,
    encode,
    expected_payload_bytes,
    full_codec,
    payload_bytes,
)
from edgetune.adapters.delta import add, subtract, weighted_mean
from edgetune.adapters.lora import exchanged_names, init_adapter
from edgetune.config import RunConfig
from edgetune.server.accounting import RoundEvent
from edgetune.types import StateDict
from edgetune.wire import FULL, UPDATE_PREFIX

__all__ = ["DeltaFedAvg", "ServerState", "bounded_chain"]


@dataclass
class ServerState:
    """Everything the server must checkpoint to resume exactly."""

    adapter: StateDict
    """The global adapter (A and B, fp32 values on the codec's grid)."""
    residual: StateDict
    """Server-side error feedback over the exchanged tensors."""
    version: int = 0
    held: dict[str, int] = field(default_factory=dict)
    """device id -> version it is known to hold."""
    updates: dict[int, Payload] = field(default_factory=dict)
    """version -> the encoded update that produced it: the newest ones only, as many as a
    chain cheaper than the full adapter needs (:func:`bounded_chain`)."""
    privacy: list[RoundEvent] = field(default_factory=list)
    """The DP ledger: one event per training round run under DP (``server/accounting.py``)."""


class DeltaFedAvg:
    """The server's per-round logic (no Flower types here)."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        cfg: RunConfig,
        state: ServerState | None = None,
        magnitudes: StateDict | None = None,
    ) -> None:
        """``magnitudes``: DoRA's version-0 magnitudes (``adapters.dora.dora_base``), else None."""
        self.cfg = cfg
        self.codec = cfg.federation.codec
        self.names = exchanged_names(shapes, cfg.lora)
        self.sent_shapes = {k: shapes[k] for k in self.names}
        if state is None:
            adapter = init_adapter(shapes, cfg.seed, magnitudes)
            state = ServerState(adapter, {k: adapter[k] * 0 for k in self.names})
        self.state = state
        self.node_devices: dict[int, str] = {}

    def sent_part(self) -> StateDict:
        return {k: self.state.adapter[k] for k in self.names}

    def downlink(self, node_id: int) -> tuple[dict[str, Payload], int]:
        """The smallest exact payload for this node, and its size in bytes."""
        device = self.node_devices.get(node_id)
        held = self.state.held.get(device, 0) if device is not None else 0
        full_bytes = expected_payload_bytes(self.sent_shapes, full_codec(self.codec))
        if held < self.state.version and held + 1 not in self.state.updates:  # dropped: the full one is smaller
            return {FULL: encode(self.sent_part(), full_codec(self.codec))}, full_bytes
        chain = {f"{UPDATE_PREFIX}{v}": self.state.updates[v] for v in range(held + 1, self.state.version + 1)}
        chain_bytes = sum(payload_bytes(p) for p in chain.values())
        if full_bytes < chain_bytes:
            return {FULL: encode(self.sent_part(), full_codec(self.codec))}, full_bytes
        return chain, chain_bytes

    def record_device(self, node_id: int, device_id: str, version: int) -> None:
        """A valid reply showed that ``device_id`` (on ``node_id``) holds ``version``."""
        self.node_devices[node_id] = device_id
        self.state.held[device_id] = version

    def aggregate(self, deltas: list[StateDict], weights: list[float]) -> Payload:
        """Apply the weighted mean of ``deltas``; returns the payload devices will apply."""
        return self.apply_mean(weighted_mean(deltas, weights))

    def apply_mean(self, mean: StateDict) -> Payload:
        """Compress ``mean`` (already averaged, and clipped and noised under DP) with the
        server's error feedback, apply it, and return the payload devices will apply."""
        payload, decoded, residual = compress(mean, self.state.residual, self.codec)
        adapter = apply_update(self.state.adapter, decoded, self.codec)
        applied = subtract({k: adapter[k] for k in self.names}, self.sent_part())
        self.state.residual = add(residual, subtract(decoded, applied))
        self.state.adapter = adapter
        self.state.version += 1
        self.state.updates[self.state.version] = payload
        full_bytes = expected_payload_bytes(self.sent_shapes, full_codec(self.codec))
        self.state.updates = bounded_chain(self.state.updates, full_bytes)
        return payload


def bounded_chain(updates: dict[int, Payload], full_bytes: int) -> dict[int, Payload]:
    """The newest updates whose chain still costs at most ``full_bytes``; older ones are dropped.

    A device holding version ``h`` is sent the chain ``h+1 .. V`` only while its size
    ``S(h)`` is at most the full adapter's; ``S`` grows as ``h`` falls, so once ``S(h)``
    exceeds ``full_bytes`` every device at ``h`` or below gets the full adapter and updates
    ``<= h + 1`` are never sent again. Example: 1-bit updates of 10 bytes each and a
    35-byte full adapter keep the newest three.
    """
    kept: dict[int, Payload] = {}
    total = 0
    for v in sorted(updates, reverse=True):
        total += payload_bytes(updates[v])
        if total > full_bytes:
            break
        kept[v] = updates[v]
    return dict(sorted(kept.items()))
