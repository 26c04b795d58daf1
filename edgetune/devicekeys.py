"""Device identity keys: the key pair a device signs its requests with, as Flower 1.39 wants it.

Flower's SuperNode authentication (``flower-supernode --auth-supernode-private-key``,
``flower-superlink --enable-supernode-auth``) uses an elliptic-curve key on a NIST curve:
the device keeps the private key (OpenSSH format), the server registers the public key
(OpenSSH one-line format) and refuses every device whose key it does not know. Both sides
show the same short fingerprint, so a refused device can be matched to its key file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgetune import wire

__all__ = [
    "DeviceKeyError",
    "check_private_key",
    "generate_device_key",
    "load_public_key",
    "public_key_pem",
    "fingerprint",
    "public_key_files",
]


class DeviceKeyError(ValueError):
    """A key file that is missing or not an EC key on a NIST curve (the message names the file)."""


def generate_device_key(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write ``<name>.key`` (private, mode 0600) and ``<name>.pub`` into ``out_dir``.

    Raises:
        FileExistsError: a key of that name is already there (never overwritten).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    private = out_dir / f"{name}{wire.DEVICE_PRIVATE_KEY_SUFFIX}"
    public = out_dir / f"{name}{wire.DEVICE_PUBLIC_KEY_SUFFIX}"
    for path in (private, public):
        if path.exists():
            raise FileExistsError(f"{path} already exists; pick another --name or remove it")
    key = ec.generate_private_key(ec.SECP384R1())
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    ssh = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(ssh + f" edgetune-device-{name}\n".encode())
    return private, public


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """An OpenSSH public key file (``*.pub``) holding an EC key.

    Raises:
        DeviceKeyError: missing file, or not an EC public key in OpenSSH format.
    """
    if not path.is_file():
        raise DeviceKeyError(f"{path}: no such public key file")
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise DeviceKeyError(
            f"{path}: not an OpenSSH public key ({err}); make one with `edgetune device keygen`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise DeviceKeyError(f"{path}: a {type(key).__name__}, but Flower needs an EC (NIST curve) key")
    return key


def check_private_key(path: Path) -> None:
    """Fail early, with the file named, where Flower would fail later with a traceback.

    Raises:
        DeviceKeyError: missing file, or not an EC private key in OpenSSH format.
    """
    if not path.is_file():
        raise DeviceKeyError(f"{path}: no such private key file")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, UnsupportedAlgorithm, TypeError) as err:
        raise DeviceKeyError(
            f"{path}: not an OpenSSH private key ({err}); make one with `edgetune device keygen`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeviceKeyError(f"{path}: a {type(key).__name__}, but Flower needs an EC (NIST curve) key")


def public_key_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    """The PEM (SubjectPublicKeyInfo) bytes Flower stores and compares for a node."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of SHA-256 over its DER form."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def public_key_files(paths: list[str]) -> list[Path]:
    """Expand ``--allow-device`` arguments: a ``*.pub`` file, or a folder of them.

    Raises:
        DeviceKeyError: a path that does not exist, or a folder with no ``*.pub`` file.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(path.glob(f"*{wire.DEVICE_PUBLIC_KEY_SUFFIX}"))
            if not found:
                raise DeviceKeyError(f"--allow-device {raw}: no *{wire.DEVICE_PUBLIC_KEY_SUFFIX} files in that folder")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DeviceKeyError(f"--allow-device {raw}: no such file or folder")
    return list(dict.fromkeys(files))
