"""FedAvg over encoded adapter deltas, with per-device exact downlinks.

The server holds the global adapter at ``version`` (one version per completed round that
aggregated something) and every update it has broadcast. A device that holds version ``v``
needs the chain ``v+1 .. version``; the server sends that chain or the full adapter
(grid-dtype, exact), whichever is smaller. A device the server has not heard from gets the
chain from version 0, which is valid whatever it holds (devices skip updates they have).

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

from torch import Tensor

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
from edgetune.wire import FULL, UPDATE_PREFIX

__all__ = ["DeltaFedAvg", "ServerState"]

StateDict = dict[str, Tensor]


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
    """version -> the encoded update that produced it."""
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
        chain = {f"{UPDATE_PREFIX}{v}": self.state.updates[v] for v in range(held + 1, self.state.version + 1)}
        chain_bytes = sum(payload_bytes(p) for p in chain.values())
        full_bytes = expected_payload_bytes(self.sent_shapes, full_codec(self.codec))
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
        return payload
