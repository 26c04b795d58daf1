"""``edgetune server``: Flower's own SuperLink, started, fed the allowed device keys, and supervised.

Stages of :func:`serve`:
    1. TLS: the user's certificates, or edgetune's own CA and server certificate (server/tls.py)
    2. start ``flower-superlink`` with TLS, SuperNode authentication and a database in the
       state folder (so registered devices and their node ids survive a server restart)
    3. wait until its Control API answers, register every allowed device public key that is
       not registered yet
    4. run in the foreground: copy the SuperLink's log to ``<state>/superlink.log``, print
       the lines a user needs (devices connecting, devices refused, errors); Ctrl-C stops the
       SuperLink and every process it started, with one line and exit code 130.

Two listening addresses: the Fleet API (devices connect here; ``--listen``, all interfaces
by default) and Flower's HTTP API that carries the Control API (run submission, device
registration) and the ServerApp's runtime API (``--control``, 127.0.0.1 by default). A run
submitted over the Control API is code the server executes, so it is not exposed to the
network unless asked for.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgetune import wire
from edgetune.devicekeys import fingerprint, load_public_key, public_key_pem
from edgetune.processes import (
    EXIT_INTERRUPTED,
    STOP_GRACE,
    flower_executable,
    pump_lines,
    start,
    stop_on_signals,
    stop_tree,
)
from edgetune.server.tls import TlsFiles

__all__ = ["ServerOptions", "ServerError", "control_client", "register_devices", "serve", "superlink_command"]


class ServerError(RuntimeError):
    """The SuperLink could not start or stopped by itself (the message says why)."""


@dataclass(frozen=True)
class ServerOptions:
    """What ``edgetune server`` runs: addresses, TLS (None: plain text), state folder, allowed keys."""

    state_dir: Path
    fleet_address: str = "0.0.0.0:9092"
    control_address: str = "127.0.0.1:9093"
    tls: TlsFiles | None = None
    device_keys: tuple[Path, ...] = ()
    verbose: bool = False
    ready_timeout: float = 120.0


def _split_address(address: str, flag: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{flag} {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def superlink_command(opts: ServerOptions) -> list[str]:
    """The ``flower-superlink`` command line for ``opts``."""
    host, port = _split_address(opts.control_address, "--control")
    _split_address(opts.fleet_address, "--listen")
    cmd = [flower_executable("flower-superlink"), "--fleet-api-address", opts.fleet_address]
    cmd += ["--host", host, "--port", str(port)]
    cmd += ["--database", str((opts.state_dir / wire.SUPERLINK_DB_FILE).resolve())]
    # Everything the app needs is installed already; never let a run install packages.
    cmd += ["--disable-runtime-dependency-installation"]
    if opts.tls is None:
        return [*cmd, "--insecure"]
    return cmd + [
        "--ssl-ca-certfile",
        str(opts.tls.ca_cert.resolve()),
        "--ssl-certfile",
        str(opts.tls.server_cert.resolve()),
        "--ssl-keyfile",
        str(opts.tls.server_key.resolve()),
        "--enable-supernode-auth",
    ]


def control_client(address: str, ca_cert: Path | None):  # -> ControlHttpClient (flwr import is slow)
    """A client for the SuperLink's Control API at ``address`` (TLS unless ``ca_cert`` is None)."""
    from flwr.supercore.control import ControlHttpClient

    return ControlHttpClient.from_server_address(
        server_address=address,
        insecure=ca_cert is None,
        root_certificates=None if ca_cert is None else str(ca_cert.resolve()),
        interceptors=[],
    )


def wait_until_ready(opts: ServerOptions, alive: threading.Event, stopping: threading.Event | None = None) -> None:
    """Poll the Control API until it answers (or ``stopping`` is set).

    Raises:
        ServerError: the SuperLink exited, or did not answer within ``opts.ready_timeout``.
    """
    from flwr.proto.control_pb2 import ListNodesRequest

    client = control_client(opts.control_address, None if opts.tls is None else opts.tls.ca_cert)
    deadline = time.monotonic() + opts.ready_timeout
    try:
        while stopping is None or not stopping.is_set():
            if not alive.is_set():
                raise ServerError(f"flower-superlink exited while starting; see {_log_path(opts)}")
            try:
                client.ListNodes(ListNodesRequest())
                return
            except Exception as err:  # noqa: BLE001 - any failure here means "not up yet"
                if time.monotonic() > deadline:
                    raise ServerError(f"the SuperLink did not answer within {opts.ready_timeout:.0f}s: {err}") from err
                time.sleep(0.5)
    finally:
        client.close()


def register_devices(client, keys: tuple[Path, ...]) -> list[str]:
    """Register every key in ``keys`` the SuperLink does not know yet; one line per key.

    Registration is by public key: Flower gives the node id, and a device presenting a key
    that is not registered is refused when it connects.
    """
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from flwr.proto.control_pb2 import ListNodesRequest, RegisterNodeRequest

    nodes = client.ListNodes(ListNodesRequest()).nodes_info
    known = {fingerprint(load_pem_public_key(bytes(n.public_key))): n.node_id for n in nodes}  # type: ignore[arg-type]
    lines = []
    for path in keys:
        key = load_public_key(path)
        name = path.name.removesuffix(wire.DEVICE_PUBLIC_KEY_SUFFIX)
        if (fp := fingerprint(key)) in known:
            lines.append(f"device key {path} ({fp}) registered already, node {known[fp]}")
            continue
        node_id = client.RegisterNode(RegisterNodeRequest(public_key=public_key_pem(key), name=name)).node_id
        lines.append(f"device key {path} ({fp}) registered as node {node_id}")
    return lines


def _log_path(opts: ServerOptions) -> Path:
    return opts.state_dir / wire.SUPERLINK_LOG_FILE


_REFUSED = re.compile(r"No SuperNode found with the given public key")
_PEM = re.compile(r"-----BEGIN PUBLIC KEY-----(.*?)-----END PUBLIC KEY-----", re.S)
_ACTIVATED = re.compile(r"\[Fleet\.ActivateNode\] Activated node_id=(\d+)")
_DEACTIVATED = re.compile(r"\[Fleet\.DeactivateNode\].*node_id=(\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STOPPED_RUN = re.compile(r"\[/v1/runtime/[\w-]+\]\[ApiError:1008\] Runtime task-token authentication failed")


def _refused_fingerprint(line: str) -> str:
    """The fingerprint of the key named in Flower's refusal line ('?' if it cannot be read)."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    match = _PEM.search(line.replace("\\n", "\n"))
    if not match:
        return "?"
    try:
        key = load_pem_public_key(match.group(0).encode())
    except ValueError:
        return "?"
    return fingerprint(key)  # type: ignore[arg-type]


def describe_line(line: str) -> str | None:
    """What ``edgetune server`` prints for one SuperLink log line (None: only in the log file)."""
    line = _ANSI.sub("", line)
    if _REFUSED.search(line):
        return (
            f"REFUSED a device: its key (fingerprint {_refused_fingerprint(line)}) is not registered; "
            "add its .pub file with --allow-device and restart the server"
        )
    if m := _ACTIVATED.search(line):
        return f"device connected (node {m.group(1)})"
    if m := _DEACTIVATED.search(line):
        return f"device disconnected (node {m.group(1)})"
    if _STOPPED_RUN.search(line):
        return None  # a stopped run's ServerApp still calling in: expected, only in the log
    if line.startswith(("ERROR", "CRITICAL")) or "Traceback" in line:
        return line
    return None


def serve(opts: ServerOptions, say=print) -> int:
    """Run the SuperLink in the foreground until Ctrl-C / SIGTERM; returns the exit code.

    The first signal stops the SuperLink and every process it started (a run's ServerApp
    then marks its run folder ``interrupted``) within :data:`STOP_GRACE` seconds, and ends
    with one line and exit code 130; a second signal kills what is left at once.

    Raises:
        ServerError: it could not start.
    """
    opts.state_dir.mkdir(parents=True, exist_ok=True)
    stopping, hurry = threading.Event(), threading.Event()
    with stop_on_signals(stopping, hurry):
        proc = start(superlink_command(opts))
        alive = threading.Event()
        alive.set()

        def on_line(line: str) -> None:
            if stopping.is_set():
                return  # after Ctrl-C: only the one line below; the rest is in the log
            text = line if opts.verbose else describe_line(line)
            if text is not None:
                say(f"[superlink] {text}")

        pump = pump_lines(proc, _log_path(opts), on_line)
        threading.Thread(target=lambda: (proc.wait(), alive.clear()), daemon=True).start()
        try:
            wait_until_ready(opts, alive, stopping)
            if not stopping.is_set():
                _register(opts, say)
                say(f"ready: devices connect to {opts.fleet_address}; runs are submitted to {opts.control_address}")
                say(f"log: {_log_path(opts)}; Ctrl-C stops the server")
            while alive.is_set() and not stopping.wait(0.2):
                pass
        finally:
            stop_tree(proc, STOP_GRACE if stopping.is_set() else 10.0, hurry)
            pump.join(timeout=1 if stopping.is_set() else 5)
    if not stopping.is_set():
        say(f"flower-superlink exited by itself (code {proc.returncode}); see {_log_path(opts)}", file=sys.stderr)
        return 1
    say(
        "edgetune: interrupted; server stopped with every process it started (a run in progress is marked "
        "interrupted and continues when the server and `edgetune run` are started again)",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED


def _register(opts: ServerOptions, say) -> None:
    client = control_client(opts.control_address, None if opts.tls is None else opts.tls.ca_cert)
    try:
        for line in register_devices(client, opts.device_keys):
            say(line)
    finally:
        client.close()
