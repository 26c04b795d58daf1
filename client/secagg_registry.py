"""Devices check each other's signed key advertisements, so the server cannot invent devices.

In stage 1 of a secure-aggregation round every device signs its two public keys for (run,
round, its node id) with its own key (``edgetune.signing.advert_digest``). The server
forwards each roster entry with its signature and signer; before a device shares anything
it checks every entry against its **registry** of device public keys:

    simulation    the simulated devices' keys, derived from (run seed, ``sim-<i>``) for
                  i < federation.num-devices (``edgetune.signing.simulation_key``)
    real device   the registered devices' ``*.pub`` files (the same files the server's
                  ``--allow-device`` takes), given with ``edgetune device join --peer-keys``;
                  a device without them trusts the server's roster (honest-but-curious server)

An entry whose signer is not in the registry, whose signature does not verify, or whose
signer already signed another entry makes the device refuse the round with a one-line
:class:`SecAggError` (Flower returns it to the server as an error reply: that device has
dropped at the share stage; with too few devices left the round is skipped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgetune import wire
from edgetune.adapters.secagg_protocol import SecAggError
from edgetune.devicekeys import load_public_key, public_key_files
from edgetune.signing import PublicKey, advert_digest, key_id, simulation_key, verify

__all__ = ["Registry", "check_roster", "device_registry"]

Registry = dict[bytes, PublicKey]  # key id -> public key


def device_registry(node_config: Mapping[str, Any], seed: int, num_devices: int) -> Registry | None:
    """The keys this device accepts roster entries from; None when it has none (no check).

    Raises:
        SecAggError: ``peer-keys`` names files that are missing or not device public keys.
    """
    if wire.PARTITION_ID in node_config and not node_config.get(wire.SIGNING_KEY):  # simulation
        keys = [simulation_key(seed, f"sim-{i}").public_key() for i in range(num_devices)]
        return {key_id(k): k for k in keys}
    path = node_config.get(wire.PEER_KEYS)
    if not path:
        return None
    try:
        loaded: list[PublicKey] = [load_public_key(f) for f in public_key_files([str(Path(str(path)))])]
    except ValueError as err:  # DeviceKeyError
        raise SecAggError(f"peer keys: {err}") from None
    return {key_id(k): k for k in loaded}


def check_roster(
    registry: Registry,
    run: str,
    round_: int,
    roster: Mapping[int, tuple[bytes, bytes]],
    signers: Sequence[bytes],
    signatures: Sequence[bytes],
) -> None:
    """Raise :class:`SecAggError` unless every roster entry is a registered device's own advertisement.

    ``roster`` maps node -> (share-encryption key, mask key) in node order; ``signers`` and
    ``signatures`` follow the same order.
    """
    nodes = sorted(roster)
    if not len(nodes) == len(signers) == len(signatures):
        raise SecAggError(f"refusing round {round_}: the roster carries no signed key advertisements")
    seen: dict[bytes, int] = {}
    for node, signer, signature in zip(nodes, signers, signatures, strict=True):
        key = registry.get(bytes(signer))
        digest = advert_digest(run, round_, node, *roster[node])
        if key is None or not verify(key, bytes(signature), digest):
            raise SecAggError(
                f"refusing round {round_}: node {node}'s key advertisement is not signed by a registered device"
            )
        if bytes(signer) in seen:
            raise SecAggError(f"refusing round {round_}: nodes {seen[bytes(signer)]} and {node} carry one device's key")
        seen[bytes(signer)] = node
