"""client/reach.py: a device names the TLS mismatch it can see, against local test servers."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgetune.client.reach import diagnose, split_address
from edgetune.server.tls import ensure_certificates


def _serve(tls: ssl.SSLContext | None) -> Iterator[str]:
    """A 127.0.0.1 server on a free port that accepts (and, with ``tls``, handshakes) until closed."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.settimeout(2)
            try:
                if tls is not None:
                    tls.wrap_socket(conn, server_side=True).close()
                else:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # plain text back
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path]:
    """The server's TLS folder and another CA (a wrong --ca)."""
    ensure_certificates(tmp_path / "other")
    return tmp_path / "server", ensure_certificates(tmp_path / "other").ca_cert


@pytest.fixture
def tls_server(certs: tuple[Path, Path]) -> Iterator[str]:
    files = ensure_certificates(certs[0])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.server_cert, files.server_key)
    context.set_alpn_protocols(["h2"])
    yield from _serve(context)


@pytest.fixture
def plain_server() -> Iterator[str]:
    yield from _serve(None)


def test_plaintext_device_against_a_tls_server_is_told_at_once(tls_server: str) -> None:
    reason = diagnose(tls_server, None, timeout=5)
    assert reason is not None and "speaks TLS: join with --ca" in reason


def test_the_right_ca_gives_no_complaint_and_a_wrong_one_is_named(tls_server: str, certs: tuple[Path, Path]) -> None:
    assert diagnose(tls_server, certs[0] / "ca.pem", timeout=5) is None
    reason = diagnose(tls_server, certs[1], timeout=5)
    assert reason is not None and f"not signed by the CA in {certs[1]}" in reason


def test_tls_device_against_a_plain_server_and_an_unreachable_one(plain_server: str, certs: tuple[Path, Path]) -> None:
    ensure_certificates(certs[0])
    reason = diagnose(plain_server, certs[0] / "ca.pem", timeout=5)
    assert reason is not None and "does not speak TLS" in reason
    assert diagnose(plain_server, None, timeout=5) is None  # plain against plain: fine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert diagnose(f"127.0.0.1:{free}", None, timeout=2) is None  # nobody there yet: the SuperNode retries


def test_split_address() -> None:
    assert split_address("my-server.lan:9092") == ("my-server.lan", 9092)
    assert split_address("[::1]:9092") == ("::1", 9092)
    with pytest.raises(ValueError, match="HOST:PORT"):
        split_address("my-server.lan")
