"""Devices check each other's key advertisements (``client/secagg_registry.py``): an entry the
registry does not vouch for (a device the server invented, a real device's advertisement moved
to another node, altered keys, a missing signature) makes the device refuse the round."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgetune import wire
from edgetune.adapters.secagg_protocol import SecAggError
from edgetune.client.secagg_registry import check_roster, device_registry
from edgetune.devicekeys import generate_device_key
from edgetune.signing import PrivateKey, advert_digest, key_id, load_signing_key, sign, simulation_key

SEED, RUN, ROUND = 7, "run-tag", 3


def _advert(key: PrivateKey, node: int, round_: int = ROUND) -> tuple[tuple[bytes, bytes], bytes, bytes]:
    """(keys, signer, signature): what a device sends in stage 1 for ``node``."""
    keys = (os.urandom(32), os.urandom(32))
    return keys, key_id(key.public_key()), sign(key, advert_digest(RUN, round_, node, *keys))


def _roster(entries: dict[int, tuple[tuple[bytes, bytes], bytes, bytes]]) -> tuple[dict, list, list]:
    nodes = sorted(entries)
    return {u: entries[u][0] for u in nodes}, [entries[u][1] for u in nodes], [entries[u][2] for u in nodes]


def _simulated() -> dict[int, tuple[tuple[bytes, bytes], bytes, bytes]]:
    return {100 + i: _advert(simulation_key(SEED, f"sim-{i}"), 100 + i) for i in range(3)}


def test_simulated_devices_accept_each_others_advertisements() -> None:
    registry = device_registry({wire.PARTITION_ID: 0}, SEED, 3)
    assert registry is not None and len(registry) == 3
    check_roster(registry, RUN, ROUND, *_roster(_simulated()))  # no exception


def test_an_invented_device_is_refused() -> None:
    registry = device_registry({wire.PARTITION_ID: 0}, SEED, 3)
    assert registry is not None
    entries = _simulated()
    entries[999] = _advert(ed25519.Ed25519PrivateKey.generate(), 999)  # the server's own Sybil
    with pytest.raises(SecAggError, match=r"refusing round 3: node 999's key advertisement is not signed"):
        check_roster(registry, RUN, ROUND, *_roster(entries))
    # A simulated device beyond federation.num-devices is not in the registry either.
    entries = {**_simulated(), 103: _advert(simulation_key(SEED, "sim-3"), 103)}
    with pytest.raises(SecAggError, match="node 103"):
        check_roster(registry, RUN, ROUND, *_roster(entries))


def test_moved_altered_replayed_or_unsigned_advertisements_are_refused() -> None:
    registry = device_registry({wire.PARTITION_ID: 0}, SEED, 3)
    assert registry is not None
    entries = _simulated()
    entries[104] = entries.pop(100)  # device sim-0's advertisement claimed for another node
    with pytest.raises(SecAggError, match="node 104"):
        check_roster(registry, RUN, ROUND, *_roster(entries))
    entries = _simulated()
    (c_pk, s_pk), signer, sig = entries[101]
    entries[101] = ((c_pk, bytes([s_pk[0] ^ 1]) + s_pk[1:]), signer, sig)  # the server swapped a mask key
    with pytest.raises(SecAggError, match="node 101"):
        check_roster(registry, RUN, ROUND, *_roster(entries))
    old = {100 + i: _advert(simulation_key(SEED, f"sim-{i}"), 100 + i, round_=ROUND - 1) for i in range(3)}
    with pytest.raises(SecAggError, match="node 100"):  # last round's advertisements replayed
        check_roster(registry, RUN, ROUND, *_roster(old))
    roster, _, _ = _roster(_simulated())
    with pytest.raises(SecAggError, match="carries no signed key advertisements"):
        check_roster(registry, RUN, ROUND, roster, [], [])
    key = simulation_key(SEED, "sim-0")  # one registered device signing for two nodes
    twice = {100: _advert(key, 100), 101: _advert(key, 101)}
    with pytest.raises(SecAggError, match="nodes 100 and 101 carry one device's key"):
        check_roster(registry, RUN, ROUND, *_roster(twice))


def test_real_devices_check_against_the_registered_public_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    for name in ("dev-a", "dev-b", "outsider"):
        generate_device_key(keys, name)
    folder = tmp_path / "registry"
    folder.mkdir()
    for name in ("dev-a", "dev-b"):
        (folder / f"{name}.pub").write_bytes((keys / f"{name}.pub").read_bytes())
    registry = device_registry({wire.PEER_KEYS: str(folder)}, SEED, 2)
    assert registry is not None and len(registry) == 2
    a, b, outsider = (load_signing_key(str(keys / f"{n}.key")) for n in ("dev-a", "dev-b", "outsider"))
    check_roster(registry, RUN, ROUND, *_roster({5: _advert(a, 5), 9: _advert(b, 9)}))  # ECDSA P-384
    with pytest.raises(SecAggError, match="node 11's key advertisement is not signed by a registered device"):
        check_roster(registry, RUN, ROUND, *_roster({5: _advert(a, 5), 9: _advert(b, 9), 11: _advert(outsider, 11)}))
    # A real device given no registry trusts the roster (honest-but-curious server); a bad path is an error.
    assert device_registry({wire.DEVICE_ID: "dev-a"}, SEED, 2) is None
    with pytest.raises(SecAggError, match="peer keys"):
        device_registry({wire.PEER_KEYS: str(tmp_path / "missing")}, SEED, 2)
