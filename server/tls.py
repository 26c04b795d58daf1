"""TLS material for ``edgetune server``: a private CA and a server certificate it signs.

Devices verify the server against the CA certificate (``ca.pem``), the one file they need
from the server machine. The CA key never leaves the server's TLS folder; restarting the
server reuses the CA, and re-issues the server certificate only when a host name the
server must answer to is missing from its Subject Alternative Names (SAN), so devices keep
working across restarts and new host names.

Layout of the TLS folder (keys are written with mode 0600)::

    ca.pem  ca.key          the certificate authority (10 years)
    server.pem  server.key  the server's certificate (SAN: localhost, 127.0.0.1, ::1, --host names)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DEFAULT_HOSTS", "TlsFiles", "ensure_certificates", "certificate_hosts", "user_certificates"]

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.pem", "ca.key", "server.pem", "server.key"
_CA_DAYS, _SERVER_DAYS = 3650, 825


@dataclass(frozen=True)
class TlsFiles:
    """Paths Flower's SuperLink takes (``--ssl-ca-certfile``, ``--ssl-certfile``, ``--ssl-keyfile``)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    created: bool = False


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _make_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgetune federation CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private(folder / CA_KEY, key)
    (folder / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _issue_server(folder: Path, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str]) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=_SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san_entry(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(folder / SERVER_KEY, key)
    (folder / SERVER_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def certificate_hosts(cert_file: Path) -> set[str]:
    """Host names and IP addresses in a PEM certificate's SAN, as strings."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n) for n in san.get_values_for_type(x509.IPAddress)} | set(san.get_values_for_type(x509.DNSName))


def _server_cert_fits(folder: Path, ca: x509.Certificate, hosts: list[str]) -> bool:
    cert_file = folder / SERVER_CERT
    if not (cert_file.is_file() and (folder / SERVER_KEY).is_file()):
        return False
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    fresh = cert.not_valid_after_utc > _now() + dt.timedelta(days=30)
    wanted = {str(ipaddress.ip_address(h)) if _is_ip(h) else h for h in hosts}
    return cert.issuer == ca.subject and fresh and wanted <= certificate_hosts(cert_file)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def ensure_certificates(folder: Path, hosts: list[str] | tuple[str, ...] = ()) -> TlsFiles:
    """Create (or reuse) the CA and a server certificate valid for ``hosts`` in ``folder``.

    Args:
        folder: the server's TLS folder; created if missing.
        hosts: extra host names or IP addresses devices use to reach the server (added to
            localhost, 127.0.0.1 and ::1).

    Returns:
        The three paths; ``created`` is True when anything was written.

    Raises:
        ValueError: an empty host name.
    """
    for host in hosts:
        if not host.strip():
            raise ValueError(f"--host {host!r}: an empty host name cannot go in a certificate")
    all_hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    folder.mkdir(parents=True, exist_ok=True)
    created = False
    if (folder / CA_CERT).is_file() and (folder / CA_KEY).is_file():
        ca = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey), f"{folder / CA_KEY} is not an EC key"
    else:
        ca, ca_key = _make_ca(folder)
        created = True
    if not _server_cert_fits(folder, ca, all_hosts):
        _issue_server(folder, ca, ca_key, all_hosts)
        created = True
    return TlsFiles(folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY, created)


def user_certificates(ca_cert: str, server_cert: str, server_key: str) -> TlsFiles:
    """The user's own certificate files, checked to exist.

    Raises:
        FileNotFoundError: one of them is missing (the message names which).
    """
    files = TlsFiles(Path(ca_cert), Path(server_cert), Path(server_key))
    for flag, path in (("--ca-cert", files.ca_cert), ("--cert", files.server_cert), ("--key", files.server_key)):
        if not path.is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    return files
