"""Why a device cannot talk to the server, when the device itself can tell.

``edgetune device join`` used to start the SuperNode and let it retry in its log file, so a
plain-text device against a TLS server printed nothing for 90 s. Before it starts the
SuperNode, :func:`diagnose` opens one TCP connection to the server and tries a TLS handshake
(ALPN ``h2``, as gRPC does) and names the mismatch it sees:

    --insecure-plaintext, server speaks TLS     "speaks TLS: join with --ca ... instead"
    --ca given, server answers in plain text    "does not speak TLS"
    --ca given, certificate not from that CA    "not signed by the CA in <file>"
    --ca given, certificate for other names     "not issued for <host>"

An unreachable server is not a mismatch (it may come up later): that is left to the
SuperNode's retries. A refused device key is recognised in the SuperNode's log
(``client/supernode.py``).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

__all__ = ["diagnose", "split_address"]


def split_address(server: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port)."""
    host, sep, port = server.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--server {server!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _handshake(host: str, port: int, context: ssl.SSLContext, timeout: float) -> ssl.SSLSocket:
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        return context.wrap_socket(raw, server_hostname=host)
    except BaseException:
        raw.close()
        raise


def diagnose(server: str, ca_cert: Path | None, timeout: float = 5.0) -> str | None:
    """One line saying why this device and ``server`` cannot talk, or None if it cannot tell.

    Args:
        server: ``host:port`` of the SuperLink's Fleet API.
        ca_cert: The CA the device trusts (None: ``--insecure-plaintext``).
        timeout: Seconds for the connection and the handshake.
    """
    host, port = split_address(server)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return None  # not reachable (yet): the SuperNode retries
    probe = ssl.create_default_context()
    probe.check_hostname, probe.verify_mode = False, ssl.CERT_NONE
    probe.set_alpn_protocols(["h2"])
    try:
        _handshake(host, port, probe, timeout).close()
        speaks_tls = True
    except (ssl.SSLError, OSError):
        speaks_tls = False
    if ca_cert is None:
        if speaks_tls:
            return f"the server at {server} speaks TLS: join with --ca (its ca.pem), not --insecure-plaintext"
        return None
    if not speaks_tls:
        return f"the server at {server} does not speak TLS (plain text?): check --server or use --insecure-plaintext"
    strict = ssl.create_default_context(cafile=str(ca_cert))
    strict.set_alpn_protocols(["h2"])
    try:
        _handshake(host, port, strict, timeout).close()
    except ssl.SSLCertVerificationError as err:
        if "match" in str(err.verify_message) or "hostname" in str(err).lower():
            return f"the server's certificate at {server} is not issued for {host!r} ({err.verify_message})"
        return f"the server's certificate at {server} is not signed by the CA in {ca_cert} ({err.verify_message})"
    except (ssl.SSLError, OSError):
        return None
    return None
