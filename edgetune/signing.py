"""Signed replies: what a device signs, with which key, and how the server checks it.

Every train and evaluate reply carries, in its ``device`` record, a signature by the device's
key over the SHA-256 digest of (see :func:`reply_digest`):

    "edgetune-reply-v1", the reply kind (train/evaluate), the run (a hash of the run config
    the server sent), the device id, every metric (round and held version among them; keys
    sorted, values as JSON) and every array record byte for byte (record and key names,
    dtype, shape, serialisation type and the exact payload bytes)

Each field is length-prefixed, so no two different replies hash the same byte string. A
flipped byte anywhere, a reply moved to another round or run, or a device id claimed by a
node without that device's key fails :func:`verify`.

Keys:
    simulation    Ed25519, derived from (run seed, device id) by :func:`simulation_key`
                  (anyone with the run config can derive it: it proves nothing beyond a
                  simulation, where every device is ours anyway)
    real device   the device's registered SuperNode key (EC P-384, OpenSSH file, signed with
                  ECDSA over SHA-384); the server verifies with the public key the SuperLink
                  registered for the node that sent the reply

Example:
    >>> key = simulation_key(0, "sim-1")
    >>> digest = hashlib.sha256(b"reply").digest()
    >>> verify(key.public_key(), sign(key, digest), digest), verify(key.public_key(), b"x" * 64, digest)
    (True, False)
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from edgetune import wire

__all__ = [
    "PrivateKey",
    "PublicKey",
    "advert_digest",
    "content_digest",
    "key_id",
    "load_public_key_bytes",
    "load_signing_key",
    "reply_digest",
    "run_tag",
    "sign",
    "simulation_key",
    "verify",
]

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
_DOMAIN = b"edgetune-reply-v1"
_ADVERT_DOMAIN = b"edgetune-secagg-advert-v1"


def run_tag(run_config_json: str) -> str:
    """The run a reply belongs to: a hash of the run config JSON the server sends each round."""
    return hashlib.sha256(run_config_json.encode()).hexdigest()[:32]


def simulation_key(seed: int, device_id: str) -> ed25519.Ed25519PrivateKey:
    """A simulated device's Ed25519 key, the same on both sides for (run seed, device id)."""
    secret = hashlib.sha256(f"edgetune-simulated-device-key:{seed}:{device_id}".encode()).digest()
    return ed25519.Ed25519PrivateKey.from_private_bytes(secret)


@functools.cache
def load_signing_key(path: str) -> PrivateKey:
    """A real device's private key (the OpenSSH file it registered with the server).

    Raises:
        ValueError: the file does not hold an Ed25519 or EC private key.
    """
    data = Path(path).read_bytes()
    key: object
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, UnsupportedAlgorithm):
        key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an Ed25519 or EC private key")
    return key


def load_public_key_bytes(data: bytes) -> PublicKey | None:
    """A registered public key as the SuperLink stores it (OpenSSH, PEM or DER); None if unreadable."""
    for loader in (serialization.load_ssh_public_key, serialization.load_pem_public_key):
        try:
            key = loader(data)
        except (ValueError, UnsupportedAlgorithm):
            continue
        return key if isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) else None
    try:
        key = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        return None
    return key if isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) else None


def _field(h: Any, data: bytes) -> None:
    h.update(struct.pack(">Q", len(data)))
    h.update(data)


def reply_digest(
    kind: str,
    run: str,
    device_id: str,
    metrics: Iterable[tuple[str, Any]],
    arrays: Iterable[tuple[str, str, Any]],
) -> bytes:
    """SHA-256 over everything a reply says (the module docstring lists the fields).

    Args:
        kind: ``train`` or ``evaluate``.
        run: :func:`run_tag` of the run config.
        device_id: The id the reply claims.
        metrics: ``(key, value)`` pairs of the metrics record (any order).
        arrays: ``(record, key, array)`` triples, ``array`` a Flower ``Array`` (any order).

    Raises:
        TypeError, ValueError: a metric value that is not JSON (a valid reply has none).
    """
    h = hashlib.sha256()
    for text in (_DOMAIN.decode(), kind, run, device_id):
        _field(h, text.encode())
    items = sorted(metrics, key=lambda kv: kv[0])
    _field(h, struct.pack(">Q", len(items)))
    for key, value in items:
        _field(h, key.encode())
        _field(h, json.dumps(value).encode())
    parts = sorted(arrays, key=lambda t: (t[0], t[1]))
    _field(h, struct.pack(">Q", len(parts)))
    for record, key, array in parts:
        for text in (record, key, str(array.dtype), json.dumps(list(array.shape)), str(array.stype)):
            _field(h, text.encode())
        _field(h, bytes(array.data))
    return h.digest()


def content_digest(kind: str, run: str, device_id: str, content: Any) -> bytes:
    """:func:`reply_digest` of a Flower ``RecordDict``: its ``metrics`` record and every array record.

    Both sides call this, the device on what it is about to send and the server on what it
    received, so they hash the same fields the same way.
    """
    metrics = content.metric_records[wire.METRICS].items() if wire.METRICS in content.metric_records else []
    arrays = [(name, key, a) for name, record in content.array_records.items() for key, a in record.items()]
    return reply_digest(kind, run, device_id, list(metrics), arrays)


def advert_digest(run: str, round_: int, node: int, c_pk: bytes, s_pk: bytes) -> bytes:
    """SHA-256 of one secure-aggregation key advertisement: (run, round, node id, both public keys).

    A device signs it with its key in stage 1; every other device checks it against the
    registry of device keys before it shares secrets with that node (``client/secagg_registry.py``),
    so the server can neither invent a device nor move one's keys to another node or round.
    """
    h = hashlib.sha256()
    for data in (_ADVERT_DOMAIN, run.encode(), str(round_).encode(), str(node).encode(), c_pk, s_pk):
        _field(h, data)
    return h.digest()


def key_id(key: PublicKey) -> bytes:
    """SHA-256 of a public key's DER encoding: how a signer is named in a registry."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


def sign(key: PrivateKey, digest: bytes) -> bytes:
    """Sign ``digest`` (Ed25519, or ECDSA with SHA-384 for an EC key)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(digest)
    return key.sign(digest, ec.ECDSA(hashes.SHA384()))


def verify(key: PublicKey, signature: bytes, digest: bytes) -> bool:
    """Whether ``signature`` is ``key``'s signature of ``digest``."""
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, digest)
        else:
            key.verify(signature, digest, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        return False
    return True
