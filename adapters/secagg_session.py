"""Both ends of one secure-aggregation round: a device's session and the server's unmasking.

The stages and their maths are in ``adapters/secagg_protocol.py``. A device's
:class:`DeviceSession` holds its round secrets between stages and serialises to bytes (JSON,
no pickle) so that a device may keep it wherever its app keeps state between messages.
:func:`unmask_sum` is the server's last step. Sets are passed as sorted lists of node ids.

Example (two devices, threshold 2, nobody drops)::

    a, b = DeviceSession.start(1, 7, 2), DeviceSession.start(2, 7, 2)
    roster = {1: a.advertise(), 2: b.advertise()}
    (ca, ka), (cb, kb) = a.share(roster, 0), b.share(roster, 0)
    ya = a.mask(xa, k, {2: cb[1]}, [1, 2]); yb = b.mask(xb, k, {1: ca[2]}, [1, 2])
    s = unmask_sum({1: ya, 2: yb}, ..., b_shares={1: [a's, b's]}, ...)  # == xa + xb mod 2^k
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from edgetune.adapters.secagg_protocol import (
    Entropy,
    SecAggError,
    agree,
    commit,
    decrypt_shares,
    encrypt_shares,
    expand_mask,
    neighbours,
    private_key,
    public_of,
    recover_secret,
    split_secret,
)

__all__ = ["DeviceSession", "Unmasked", "unmask_sum"]

Roster = dict[int, tuple[bytes, bytes]]  # node -> (share-encryption public key, mask public key)
_SHARE_BYTES = 4 + 48  # Flower's Shamir share of a 32-byte secret: index + 3 AES blocks


def _share_key_info(round_: int) -> bytes:
    return f"edgetune-secagg-share|{round_}".encode()


def _mask_info(round_: int, u: int, v: int) -> bytes:
    return f"edgetune-secagg-mask|{round_}|{min(u, v)}|{max(u, v)}".encode()


def _pair_mask(private: bytes, peer_public: bytes, round_: int, u: int, v: int, size: int, k: int) -> np.ndarray:
    """The mask u adds for pair (u, v): +PRG(s_uv) if u < v, else -PRG(s_uv), mod 2^k."""
    mask = expand_mask(agree(private, peer_public, _mask_info(round_, u, v)), size, k)
    return mask if u < v else (np.uint64(1 << k) - mask) & np.uint64((1 << k) - 1)


@dataclass
class DeviceSession:
    """One device's secrets and view of one round (fresh keys every round)."""

    node: int
    round: int
    threshold: int
    c_sk: bytes
    s_sk: bytes
    seed: bytes
    roster: dict[int, list[bytes]] = field(default_factory=dict)
    peers: list[int] = field(default_factory=list)
    shares: dict[int, list[bytes]] = field(default_factory=dict)
    """holder's copy: source node -> [share of its seed, share of its mask key]."""
    unmasked: bool = False

    @classmethod
    def start(cls, node: int, round_: int, threshold: int, entropy: Entropy = os.urandom) -> DeviceSession:
        return cls(node, round_, threshold, private_key(entropy), private_key(entropy), entropy(32))

    def advertise(self) -> tuple[bytes, bytes]:
        """Stage 1: the two public keys."""
        return public_of(self.c_sk), public_of(self.s_sk)

    def share(self, roster: Roster, degree: int, entropy: Entropy = os.urandom) -> tuple[dict[int, bytes], bytes]:
        """Stage 2: encrypted shares for every neighbour, and the commitment to the seed.

        Raises:
            SecAggError: the roster lacks this device or its keys, repeats a key, or is
                smaller than the threshold.
        """
        if roster.get(self.node) != self.advertise():
            raise SecAggError(f"roster does not hold device {self.node}'s own keys")
        keys = [k for pair in roster.values() for k in pair]
        if len(set(keys)) != len(keys):
            raise SecAggError("roster repeats a public key")
        if len(roster) < self.threshold:
            raise SecAggError(f"{len(roster)} devices advertised keys < threshold {self.threshold}")
        self.roster = {u: list(pair) for u, pair in roster.items()}
        self.peers = sorted(neighbours(roster, degree, self.round)[self.node])
        holders = sorted([*self.peers, self.node])
        seed_shares = split_secret(self.seed, self.threshold, holders)
        key_shares = split_secret(self.s_sk, self.threshold, holders)
        self.shares = {self.node: [seed_shares[self.node], key_shares[self.node]]}
        out = {}
        for v in self.peers:
            key = agree(self.c_sk, roster[v][0], _share_key_info(self.round))
            out[v] = encrypt_shares(key, self.round, self.node, v, seed_shares[v] + key_shares[v], entropy)
        return out, commit(self.seed)

    def mask(self, x: np.ndarray, k: int, received: dict[int, bytes], shared: list[int]) -> np.ndarray:
        """Stage 3: ``y = x + PRG(b) + sum_v +-PRG(s_uv) mod 2^k`` over neighbours that shared.

        Args:
            x: the integer input (values in ``[0, 2^k)``, uint64 or int64 read mod 2^k).
            k: modulus bits.
            received: source node -> ciphertext the server forwarded from it.
            shared: U2, every device whose shares the server holds.

        Raises:
            SecAggError: a ciphertext is missing or fails authentication.
        """
        if self.node not in shared:
            raise SecAggError(f"device {self.node} is not among the devices that shared")
        mod = np.uint64((1 << k) - 1)
        y = (x.astype(np.int64).astype(np.uint64) + expand_mask(self.seed, len(x), k)) & mod
        for v in sorted(set(shared) & set(self.peers)):
            if v not in received:
                raise SecAggError(f"no ciphertext from device {v}, which shared")
            key = agree(self.c_sk, self.roster[v][0], _share_key_info(self.round))
            plain = decrypt_shares(key, self.round, v, self.node, received[v])
            if len(plain) != 2 * _SHARE_BYTES:
                raise SecAggError(f"shares from device {v} have {len(plain)} bytes")
            self.shares[v] = [plain[:_SHARE_BYTES], plain[_SHARE_BYTES:]]
            y = (y + _pair_mask(self.s_sk, self.roster[v][1], self.round, self.node, v, len(x), k)) & mod
        return y

    def unmask(self, survivors: list[int], dropped: list[int]) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """Stage 4: ``(seed shares of surviving neighbours, key shares of dropped ones)``.

        Raises:
            SecAggError: asked twice, for both shares of one device, for fewer survivors than
                the threshold, or about devices this device never received shares from.
        """
        if self.unmasked:
            raise SecAggError("unmask asked twice in one round")
        if set(survivors) & set(dropped):
            raise SecAggError("a device is listed as both surviving and dropped")
        if len(survivors) < self.threshold:
            raise SecAggError(f"{len(survivors)} survivors < threshold {self.threshold}")
        self.unmasked = True
        seeds = {u: self.shares[u][0] for u in survivors if u in self.shares}
        keys = {u: self.shares[u][1] for u in dropped if u in self.shares and u != self.node}
        return seeds, keys

    def to_bytes(self) -> bytes:
        d = asdict(self)
        for name in ("c_sk", "s_sk", "seed"):
            d[name] = d[name].hex()
        d["roster"] = {str(u): [x.hex() for x in v] for u, v in self.roster.items()}
        d["shares"] = {str(u): [x.hex() for x in v] for u, v in self.shares.items()}
        return json.dumps(d).encode()

    @classmethod
    def from_bytes(cls, blob: bytes) -> DeviceSession:
        d = json.loads(blob)
        for name in ("c_sk", "s_sk", "seed"):
            d[name] = bytes.fromhex(d[name])
        d["roster"] = {int(u): [bytes.fromhex(x) for x in v] for u, v in d["roster"].items()}
        d["shares"] = {int(u): [bytes.fromhex(x) for x in v] for u, v in d["shares"].items()}
        return cls(**d)


@dataclass(frozen=True)
class Unmasked:
    """The server's result: the sum over ``survivors`` of their inputs, mod 2^k."""

    total: np.ndarray
    survivors: list[int]
    dropped: list[int]


def unmask_sum(
    masked: dict[int, np.ndarray],
    roster: Roster,
    shared: list[int],
    commitments: dict[int, bytes],
    seed_shares: dict[int, list[bytes]],
    key_shares: dict[int, list[bytes]],
    threshold: int,
    degree: int,
    round_: int,
    k: int,
) -> Unmasked:
    """Remove every mask from the masked inputs of the survivors (U3 = ``masked``'s keys).

    Args:
        masked: U3: node -> masked input ``y`` (uint64 in ``[0, 2^k)``).
        roster: U1's public keys (stage 1). shared: U2 (stage 2). commitments: U2's seed hashes.
        seed_shares: survivor u -> the shares of b_u the unmask stage returned.
        key_shares: dropped u -> the shares of s_u's private key the unmask stage returned.

    Raises:
        SecAggError: fewer than ``threshold`` survivors or shares, or a rebuilt secret that
            fails its check (a tampered share).
    """
    survivors = sorted(masked)
    dropped = sorted(set(shared) - set(survivors))
    if len(survivors) < threshold:
        raise SecAggError(f"{len(survivors)} masked inputs < threshold {threshold}")
    if not set(survivors) <= set(shared):
        raise SecAggError("a masked input came from a device that never shared")
    size = len(masked[survivors[0]])
    mod = np.uint64((1 << k) - 1)
    total = np.zeros(size, dtype=np.uint64)
    for u in survivors:
        total = (total + masked[u].astype(np.uint64)) & mod
    for u in survivors:
        seed = recover_secret(seed_shares.get(u, []), threshold)
        if commit(seed) != commitments[u]:
            raise SecAggError(f"device {u}'s rebuilt seed does not match its commitment: a share was tampered with")
        total = (total - expand_mask(seed, size, k)) & mod
    graph = neighbours(roster, degree, round_)
    for u in dropped:
        key = recover_secret(key_shares.get(u, []), threshold)
        if public_of(key) != roster[u][1]:
            raise SecAggError(f"device {u}'s rebuilt key does not match its public key: a share was tampered with")
        for v in sorted(graph[u] & set(survivors)):
            # v added its mask for the pair (v, u); the same mask, from u's side, is its negative.
            total = (total + _pair_mask(key, roster[v][1], round_, u, v, size, k)) & mod
    return Unmasked(total, survivors, dropped)
