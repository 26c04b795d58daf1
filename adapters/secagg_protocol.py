"""Secure aggregation (Bonawitz et al., CCS 2017; optional SecAgg+ neighbour graph of Bell et
al., CCS 2020) over vectors in Z_(2^k): the pure protocol both sides run, no Flower types.

One round, devices ``u`` (ids are Flower node ids), threshold ``t``, neighbours ``N(u)``::

    1 advertise   u draws X25519 key pairs (c_u: share encryption, s_u: mask agreement) and
                  sends both public keys. U1 = devices that did; |U1| < t: abort.
    2 share       u draws a 32-byte self-mask seed b_u, Shamir-shares b_u and s_u's private
                  key t-of-|N(u)|+1, and sends each neighbour v its two shares encrypted
                  with AES-GCM under HKDF(X25519(c_u, c_v)), bound to (round, u, v); plus
                  SHA-256(b_u). U2 = devices that did.
    3 masked      u sends y_u = x_u + PRG(b_u) + sum_{v in U2 n N(u)} +-PRG(s_uv) mod 2^k,
                  with s_uv = HKDF(X25519(s_u, s_v)) (+ if u < v, - if u > v, so pairs cancel).
                  U3 = devices that did; |U3| < t: abort.
    4 unmask      every v in U3 decrypts what it was sent and returns, for each neighbour u,
                  the share of b_u if u is in U3, else the share of s_u's key (never both).
                  The server rebuilds b_u (u in U3) and s_u (u in U2 \\ U3) from >= t shares,
                  checks them (SHA-256(b_u), s_u's public key), and removes the masks:
                  sum_{u in U3} x_u = sum y_u - sum PRG(b_u) -+ PRG(s_uv) of dropped u.

Primitives: ``cryptography`` (X25519, HKDF-SHA256, AES-GCM, ChaCha20 as the mask stream) and
Flower's Shamir helper (``flwr.common.secure_aggregation.crypto.shamir``). Nothing here is a
hand-written cryptographic primitive. A tampered ciphertext fails AES-GCM's tag; a tampered
share makes a rebuilt secret fail its check; either raises :class:`SecAggError`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

__all__ = [
    "SecAggError",
    "agree",
    "commit",
    "decrypt_shares",
    "encrypt_shares",
    "expand_mask",
    "neighbours",
    "private_key",
    "public_of",
    "recover_secret",
    "split_secret",
]

Entropy = Callable[[int], bytes]
_RAW = serialization.Encoding.Raw


class SecAggError(RuntimeError):
    """The protocol cannot complete correctly (below threshold, tampering, inconsistency)."""


def private_key(entropy: Entropy = os.urandom) -> bytes:
    """A fresh X25519 private key (32 raw bytes) from ``entropy`` (default: the OS)."""
    return X25519PrivateKey.from_private_bytes(entropy(32)).private_bytes(
        _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_of(private: bytes) -> bytes:
    """The raw 32-byte X25519 public key of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key shared by both ends: HKDF-SHA256(X25519(private, peer), info).

    Raises:
        SecAggError: ``peer_public`` is not a valid X25519 public key.
    """
    try:
        secret = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:
        raise SecAggError(f"bad public key: {err}") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _aad(round_: int, src: int, dst: int) -> bytes:
    return f"edgetune-secagg|{round_}|{src}|{dst}".encode()


def encrypt_shares(
    key: bytes, round_: int, src: int, dst: int, plaintext: bytes, entropy: Entropy = os.urandom
) -> bytes:
    """AES-GCM ``nonce || ciphertext`` of ``plaintext`` from ``src`` to ``dst`` in ``round_``."""
    nonce = entropy(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(round_, src, dst))


def decrypt_shares(key: bytes, round_: int, src: int, dst: int, blob: bytes) -> bytes:
    """Inverse of :func:`encrypt_shares`.

    Raises:
        SecAggError: the ciphertext was altered, or was made for another round or pair.
    """
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], _aad(round_, src, dst))
    except (InvalidTag, ValueError):
        raise SecAggError(f"ciphertext from {src} to {dst} (round {round_}) fails authentication") from None


def expand_mask(seed: bytes, size: int, k: int) -> np.ndarray:
    """``size`` values uniform in ``[0, 2^k)`` (uint64) from a 32-byte seed (ChaCha20 stream).

    The low k bits of a uniform 64-bit word are uniform because 2^k divides 2^64.
    """
    stream = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    words = np.frombuffer(stream.update(b"\x00" * (8 * size)), dtype="<u8").astype(np.uint64)
    return words & np.uint64((1 << k) - 1)


def commit(secret: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed (checked after the server rebuilds it)."""
    return hashlib.sha256(b"edgetune-secagg-seed|" + secret).digest()


def split_secret(secret: bytes, threshold: int, holders: list[int]) -> dict[int, bytes]:
    """Shamir ``threshold``-of-``len(holders)`` shares of ``secret``, one per holder id."""
    if not 2 <= threshold <= len(holders):
        raise SecAggError(f"threshold {threshold} outside [2, {len(holders)} holders]")
    shares = create_shares(secret, threshold, len(holders))
    return dict(zip(holders, shares, strict=True))


def recover_secret(shares: Iterable[bytes], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares of :func:`split_secret`.

    Raises:
        SecAggError: fewer than ``threshold`` distinct shares.
    """
    distinct = list({s[:4]: s for s in shares}.values())
    if len(distinct) < threshold:
        raise SecAggError(f"{len(distinct)} shares < threshold {threshold}")
    try:
        return combine_shares(distinct[:threshold])
    except ValueError:
        raise SecAggError("shares do not combine (tampered)") from None


def neighbours(ids: Iterable[int], degree: int, seed: int) -> dict[int, set[int]]:
    """Who shares masks with whom: the complete graph, or SecAgg+'s random regular ring.

    ``degree`` 0 (or >= n - 1) gives everyone every other device. Otherwise the ids are put
    on a ring in an order drawn from ``seed`` (public: the round) and each device is linked to
    the ``degree // 2`` devices on either side (a Harary graph, as in Bell et al.).
    """
    ring = sorted(ids)
    n = len(ring)
    if degree <= 0 or degree >= n - 1:
        return {u: set(ring) - {u} for u in ring}
    order = [ring[i] for i in np.random.default_rng(seed).permutation(n)]
    half = max(degree // 2, 1)
    graph: dict[int, set[int]] = {u: set() for u in ring}
    for i, u in enumerate(order):
        for j in range(1, half + 1):
            v = order[(i + j) % n]
            graph[u].add(v)
            graph[v].add(u)
    return graph
