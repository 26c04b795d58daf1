"""``edgetune device join``: Flower's own SuperNode on a device, pointed at the device's data and storage.

The SuperNode connects to the server's Fleet API over TLS (verifying the server against the
federation's CA certificate), signs every request with the device's private key, and runs
the ClientApp (``edgetune.client.app:app``) for each message with node config::

    data-path    the device's own JSONL file (or folder) of conversations
    storage-dir  the device's storage folder (held adapter version, error-feedback residual)
    device-id    the device's stable name in the federation's metrics
    peer-keys    (optional) the registered devices' public keys, a ``*.pub`` file or folder:
                 secure-aggregation rosters are checked against them (client/secagg_registry.py)

Device state lives in the storage folder, so it survives a device restart and a server
restart. :func:`join` runs in the foreground and supervises the SuperNode: if it exits while
the server is away (Flower gives up when the server's state changed under it), it is started
again after a short wait; if the server refuses the device's key, join stops and says so.
Ctrl-C / SIGTERM stops the SuperNode and the processes it started (one line, exit code 130).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from edgetune import wire
from edgetune.client.reach import diagnose
from edgetune.config import RESUMABLE_KEYS, RunConfig, to_flat
from edgetune.processes import (
    EXIT_INTERRUPTED,
    STOP_GRACE,
    flower_executable,
    pump_lines,
    start,
    stop_on_signals,
    stop_tree,
)

__all__ = ["JoinOptions", "join", "node_config", "run_state_dir", "supernode_command"]

NOT_REGISTERED = (
    "this device's key is not registered on the server: copy {pub} to the server machine, "
    "add it with `edgetune server --allow-device {pub_name} ...` and restart the server"
)


@dataclass(frozen=True)
class JoinOptions:
    """What ``edgetune device join`` runs; ``ca_cert`` None means plain text (no TLS, no key)."""

    server: str
    data_path: Path
    storage_dir: Path
    device_id: str
    private_key: Path | None
    ca_cert: Path | None
    runtime_port: int = 0  # Flower's local per-node HTTP API; 0: a free port
    train_engine: str = ""  # "" : the run's train.engine; else pytorch | onnxruntime for this device
    peer_keys: Path | None = None  # the registered devices' *.pub keys (file or folder), for SecAgg rosters
    verbose: bool = False
    retry_wait: float = 5.0


def run_state_dir(storage_dir: Path, cfg: RunConfig) -> Path:
    """Where a real device keeps one run's adapter state: ``<storage>/runs/<run key>``.

    A device serves run after run, and each run counts adapter versions from 0, so the held
    version and residual of one run must never meet another. The key hashes the run config
    (run folder included) without the settings a resumed run may change, so a run keeps its
    folder across server restarts and resubmissions.

    Example: ``state/runs/3f2a9c0d51e7`` for every round of one run.
    """
    flat = {k: v for k, v in to_flat(cfg).items() if k not in RESUMABLE_KEYS}
    key = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]
    return storage_dir / wire.DEVICE_RUNS_DIR / key


def _toml_string(key: str, value: str) -> str:
    if "'" not in value and "\n" not in value:
        return f"{key}='{value}'"  # TOML literal string: backslashes and spaces kept as they are
    if '"' not in value and "\\" not in value and "\n" not in value:
        return f'{key}="{value}"'
    raise ValueError(f"{key} {value!r}: a path with both quote characters cannot be passed to Flower")


def node_config(opts: JoinOptions) -> str:
    """The ``--node-config`` string the ClientApp reads (client/app.py), with absolute paths."""
    return " ".join(
        [
            _toml_string(wire.DATA_PATH, str(opts.data_path.resolve())),
            _toml_string(wire.STORAGE_DIR, str(opts.storage_dir.resolve())),
            _toml_string(wire.DEVICE_ID, opts.device_id),
            *([_toml_string(wire.TRAIN_ENGINE, opts.train_engine)] if opts.train_engine else []),
            *([_toml_string(wire.PEER_KEYS, str(opts.peer_keys.resolve()))] if opts.peer_keys else []),
            # The registered key also signs every reply (edgetune/signing.py).
            *([_toml_string(wire.SIGNING_KEY, str(opts.private_key.resolve()))] if opts.private_key else []),
        ]
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def supernode_command(opts: JoinOptions) -> list[str]:
    """The ``flower-supernode`` command line for ``opts``."""
    cmd = [flower_executable("flower-supernode"), "--superlink", opts.server]
    cmd += ["--node-config", node_config(opts)]
    cmd += ["--port", str(opts.runtime_port or _free_port())]
    if opts.ca_cert is None:
        return [*cmd, "--insecure"]
    cmd += ["--root-certificates", str(opts.ca_cert.resolve())]
    if opts.private_key is not None:
        cmd += ["--auth-supernode-private-key", str(opts.private_key.resolve())]
    return cmd


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REFUSED = re.compile(r"\[code: 2004\]|Failed to activate SuperNode")
_ROUND = re.compile(r"\[RUN (\d+), ROUND ([^\]]+)\]")
_RECEIVING = re.compile(r"Receiving: (\w+) message")
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")


class _Watcher:
    """Turns the SuperNode's log into a few readable lines and notices a refused key."""

    def __init__(self, opts: JoinOptions, say, stopping: threading.Event) -> None:
        self.opts, self.say, self.stopping = opts, say, stopping
        self.refused = threading.Event()
        self.round = ""

    def __call__(self, raw: str) -> None:
        if self.stopping.is_set():
            return  # after Ctrl-C: only join's one line; the rest is in the log
        line = _ANSI.sub("", raw)
        if _REFUSED.search(line):
            self.refused.set()
        if m := _ROUND.search(line):
            self.round = m.group(2)
        if self.opts.verbose:
            self.say(f"[supernode] {line}")
        elif m := _RECEIVING.search(line):
            self.say(f"round {self.round}: {m.group(1)}")
        elif m := _NODE_ID.search(line):
            self.say(f"connected to the server as node {m.group(1)}")
        elif "Connection successful" in line:
            self.say("reconnected to the server")
        elif line.startswith(("ERROR", "CRITICAL")) and not self.refused.is_set():
            self.say(f"[supernode] {line}")


def _run_once(opts: JoinOptions, stopping: threading.Event, hurry: threading.Event, say) -> tuple[int, bool]:
    """One SuperNode process, until it exits or we are asked to stop; (exit code, refused)."""
    watcher = _Watcher(opts, say, stopping)
    proc = start(supernode_command(opts))
    pump = pump_lines(proc, opts.storage_dir / wire.SUPERNODE_LOG_FILE, watcher)
    try:
        while proc.poll() is None and not stopping.wait(0.2):
            pass
    finally:
        stop_tree(proc, STOP_GRACE if stopping.is_set() else 10.0, hurry)
        pump.join(timeout=1 if stopping.is_set() else 5)
    return int(proc.returncode or 0), watcher.refused.is_set()


def join(opts: JoinOptions, say=print) -> int:
    """Run the device in the foreground until Ctrl-C / SIGTERM; returns the exit code.

    130: stopped by a signal (the SuperNode and every process it started are gone within
    :data:`STOP_GRACE` seconds; a second signal kills them at once); 1: the server refused
    this device's key; 2: the device and the server cannot talk for a reason the device can
    see (``client/reach.py``).
    """
    opts.storage_dir.mkdir(parents=True, exist_ok=True)
    stopping, hurry = threading.Event(), threading.Event()
    log = opts.storage_dir / wire.SUPERNODE_LOG_FILE
    say(f"device {opts.device_id}: joining {opts.server}; data {opts.data_path}; storage {opts.storage_dir}")
    say(f"log: {log}; Ctrl-C leaves the federation")
    with stop_on_signals(stopping, hurry):
        problem = diagnose(opts.server, opts.ca_cert)  # TLS against plain text, wrong CA: say so now
        if problem and not stopping.is_set():
            say(f"edgetune: {problem}")
            return 2
        while not stopping.is_set():
            code, refused = _run_once(opts, stopping, hurry, say)
            if stopping.is_set():
                break
            if refused:
                pub = opts.private_key.with_suffix(wire.DEVICE_PUBLIC_KEY_SUFFIX) if opts.private_key else "KEY.pub"
                say("edgetune: " + NOT_REGISTERED.format(pub=pub, pub_name=Path(str(pub)).name))
                return 1
            say(f"the SuperNode exited (code {code}); reconnecting in {opts.retry_wait:.0f}s (see {log})")
            stopping.wait(opts.retry_wait)
    say(
        f"edgetune: interrupted; device {opts.device_id} left the federation (its SuperNode and every process it "
        "started stopped); the same command joins again",
        file=sys.stderr,
    )
    return EXIT_INTERRUPTED
