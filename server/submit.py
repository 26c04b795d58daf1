"""``edgetune run``: submit the federation to a running ``edgetune server`` and follow it to the end.

Stages of :func:`submit_and_follow`:
    1. build the Flower App Bundle (FAB) in memory: this project's packages, plus a
       ``pyproject.toml`` whose ``[tool.flwr.app.config]`` is the *whole* resolved run config
       (so every ``--set`` key reaches the ServerApp, and the bundle says exactly what ran)
    2. start the run over the SuperLink's Control API (what ``flwr run`` does, without its
       detached local SuperLink and its exit code 0 on failure)
    3. follow it: one line per finished round from the run folder's ``metrics.jsonl``
       (held-out loss, bytes up/down, replies), until ``status.json`` says how it ended
    4. if the server goes away mid-run, wait for it; when it is back, submit the same
       bundle again: the ServerApp resumes from the run folder's last checkpoint
       (server/federation.py), and the devices reconnect by themselves

Ctrl-C or SIGTERM stops the run on the server; its run folder says ``interrupted`` with the last
completed round, and the same command continues it from there.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgetune import wire
from edgetune.config import RunConfig, to_flat
from edgetune.processes import stop_on_signals
from edgetune.server.checkpoint import write_interrupted
from edgetune.server.superlink import control_client

__all__ = ["STOP_WAIT", "FollowOptions", "RunOutcome", "build_fab", "submit_and_follow"]

STOP_WAIT = 6.0  # seconds to wait after Ctrl-C for the ServerApp to mark the run folder

# The packages the ServerApp and ClientApp import: edgetune and the folders mapped into it
# (pyproject's [tool.setuptools] package-dir), each laid out in the FAB under its dotted name.
APP_PACKAGES = (
    "edgetune",
    "edgetune.adapters",
    "edgetune.client",
    "edgetune.server",
    "edgetune.edge_export",
    "edgetune.simulations",
)


def _package_files(name: str) -> dict[str, Path]:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not importable here; is edgetune installed?")
    root = Path(next(iter(spec.submodule_search_locations)))
    prefix = name.replace(".", "/")
    mapped = {p.split(".")[-1] for p in APP_PACKAGES if p.startswith(name + ".")}
    return {
        f"{prefix}/{p.relative_to(root).as_posix()}": p
        for p in sorted(root.rglob("*.py"))
        if "__pycache__" not in p.parts and p.relative_to(root).parts[0] not in mapped
    }


def _pyproject(cfg: RunConfig) -> bytes:
    import tomli_w

    deps = [r for r in importlib.metadata.requires("edgetune") or [] if "extra ==" not in r]
    doc = {
        "project": {"name": "edgetune", "version": importlib.metadata.version("edgetune"), "dependencies": deps},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "edgetune",
                    "components": {"serverapp": "edgetune.server.app:app", "clientapp": "edgetune.client.app:app"},
                    "config": to_flat(cfg),
                }
            }
        },
    }
    return tomli_w.dumps(doc).encode()


def build_fab(cfg: RunConfig) -> bytes:
    """The FAB for ``cfg``: this project's Python packages and a pyproject carrying the full config."""
    from flwr.cli.build import build_fab_from_files

    files: dict[str, bytes | Path] = {}
    for name in APP_PACKAGES:
        files.update(_package_files(name))
    files["pyproject.toml"] = _pyproject(cfg)
    return build_fab_from_files(files)[0]


@dataclass(frozen=True)
class FollowOptions:
    """Where the server's Control API is, and how patient to be."""

    control_address: str
    ca_cert: Path | None  # None: plain text
    poll: float = 1.0
    server_wait: float = 900.0  # how long to wait for a server that went away


@dataclass(frozen=True)
class RunOutcome:
    """How the run ended: ``completed`` / ``failed`` / ``interrupted``, with the reason."""

    status: str
    detail: str = ""
    run_ids: tuple[int, ...] = ()
    last_round: int | None = None  # interrupted: the last completed round

    @property
    def ok(self) -> bool:
        return self.status == "completed"


def _start(client, fab: bytes) -> int:
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab_proto = fab_to_proto(Fab(hashlib.sha256(fab).hexdigest(), fab, {}))
    res = client.StartRun(StartRunRequest(fab=fab_proto, override_config=user_config_to_proto({})))
    if not res.HasField("run_id"):
        raise RuntimeError("the server did not start the run")
    return int(res.run_id)


def _flower_status(client, run_id: int) -> str:
    """'pending', 'running', 'finished:completed', 'finished:failed', ... ('unknown' if not listed)."""
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest

    runs = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict
    if not runs:
        return "unknown"
    status = run_from_proto(next(iter(runs.values()))).status
    return f"{status.status}:{status.sub_status}" if status.sub_status else status.status


def _stop(client, run_id: int) -> None:
    from flwr.proto.control_pb2 import StopRunRequest

    try:
        client.StopRun(StopRunRequest(run_id=run_id))
    except Exception:  # noqa: BLE001 - the run may have ended or be unknown to a restarted server
        pass


def _run_status(run_dir: Path) -> dict:
    path = run_dir / wire.STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class _Rounds:
    """New lines of ``metrics.jsonl``, each handed to ``on_round`` once."""

    def __init__(self, run_dir: Path, on_round: Callable[[dict], None]) -> None:
        self.path, self.on_round, self.seen = run_dir / wire.METRICS_FILE, on_round, set()

    def poll(self) -> None:
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:  # a line being written
                continue
            if row["round"] not in self.seen:
                self.seen.add(row["round"])
                self.on_round(row)


def _is_outage(err: Exception) -> bool:
    """A network failure worth waiting out (not a certificate the CA does not vouch for)."""
    import httpx

    return isinstance(err, httpx.TransportError) and "CERTIFICATE_VERIFY_FAILED" not in str(err)


def _connect_when_back(opts: FollowOptions, stopping, say):
    """A Control API client once the server answers again (None if it did not within ``server_wait``)."""
    from flwr.proto.control_pb2 import ListRunsRequest

    say(f"the server at {opts.control_address} does not answer; waiting up to {opts.server_wait:.0f}s for it")
    deadline = time.monotonic() + opts.server_wait
    while time.monotonic() < deadline and not stopping():
        client = control_client(opts.control_address, opts.ca_cert)
        try:
            client.ListRuns(ListRunsRequest(limit=1))
            return client
        except Exception as err:  # noqa: BLE001 - still down, unless it is not an outage
            client.close()
            if not _is_outage(err):
                raise
            time.sleep(opts.poll)
    return None


def _interrupted(client, run_id: int | None, run_dir: Path, hurry: threading.Event) -> tuple[str, int | None]:
    """After Ctrl-C: stop the run on the server and wait (up to ``STOP_WAIT`` s, or until a
    second signal) for its ServerApp to mark the run folder; (how it ended, last round).

    The ServerApp notices the stop at its next call to the server (every 1-3 s) and writes
    ``interrupted`` with its last checkpointed round; if it does not in time (not started
    yet, server gone), this writes the same itself; without a submitted run, at once.
    """
    if client is not None and run_id is not None:
        _stop(client, run_id)
    if not run_dir.is_dir():  # nothing ran yet
        return "interrupted", 0
    deadline = time.monotonic() + (STOP_WAIT if run_id is not None else 0.0)
    while time.monotonic() < deadline and not hurry.is_set():
        saved = _run_status(run_dir)
        if saved.get("status") in ("interrupted", "completed", "failed"):
            return saved["status"], saved.get("last_round")
        time.sleep(0.1)
    return "interrupted", write_interrupted(run_dir, "stopped by edgetune run (Ctrl-C or SIGTERM)")


def submit_and_follow(cfg: RunConfig, opts: FollowOptions, on_round: Callable[[dict], None], say=print) -> RunOutcome:
    """Submit ``cfg`` to the server and follow it until it ends; resubmit after a server restart.

    ``cfg.run_dir`` must be an absolute path on the server machine; progress is read from
    it, so follow from the server machine (the Control API listens on 127.0.0.1 by default).
    The first Ctrl-C or SIGTERM stops the run on the server and returns ``interrupted`` with
    the last completed round within :data:`STOP_WAIT` seconds (a second one at once); the
    same command continues the run from there.
    """
    stopping, hurry = threading.Event(), threading.Event()
    with stop_on_signals(stopping, hurry):
        return _follow(cfg, opts, on_round, say, stopping, hurry)


def _follow(
    cfg: RunConfig,
    opts: FollowOptions,
    on_round: Callable[[dict], None],
    say: Callable[..., None],
    stopping: threading.Event,
    hurry: threading.Event,
) -> RunOutcome:
    run_dir = Path(cfg.run_dir)
    fab = build_fab(cfg)
    status_file = run_dir / wire.STATUS_FILE
    if status_file.is_file():
        status_file.unlink()  # the ServerApp writes a fresh one; an old "completed" must not end this follow
    run_ids: list[int] = []

    def outcome(status: str, detail: str = "", last_round: int | None = None) -> RunOutcome:
        return RunOutcome(status, detail, tuple(run_ids), last_round)

    def stop(client) -> RunOutcome:
        status, last = _interrupted(client, run_ids[-1] if run_ids else None, run_dir, hurry)
        if status == "interrupted":
            return outcome(status, "stopped by the user; run the same command again to continue", last)
        saved = _run_status(run_dir)  # it ended on its own just before the stop reached it
        return outcome(status, saved.get("error", ""))

    def reconnect(old, failure: str):
        """``(client, None)`` once the server answers again, else ``(None, the outcome to return)``."""
        old.close()
        back = _connect_when_back(opts, stopping.is_set, say)
        if back is not None:
            return back, None
        return None, (stop(None) if stopping.is_set() else outcome("failed", failure))

    if stopping.is_set():  # Ctrl-C while the bundle was being built
        return stop(None)
    client = control_client(opts.control_address, opts.ca_cert)
    try:
        run_ids.append(_start(client, fab))
    except Exception as err:  # noqa: BLE001 - not up yet (or a wrong address: the wait below says so)
        if not _is_outage(err):
            raise
        client, ended = reconnect(client, f"no server answered at {opts.control_address}")
        if ended is not None:
            return ended
        run_ids.append(_start(client, fab))
    say(f"submitted run {run_ids[-1]} ({len(fab) / 1024:.0f} KiB bundle); run folder {run_dir}")
    rounds = _Rounds(run_dir, lambda row: None if stopping.is_set() else on_round(row))
    while True:
        rounds.poll()
        saved = _run_status(run_dir)
        if saved.get("status") in ("completed", "failed"):
            rounds.poll()
            return outcome(saved["status"], saved.get("error", ""))
        if stopping.is_set():
            return stop(client)
        try:
            flower = _flower_status(client, run_ids[-1])
        except Exception as err:  # noqa: BLE001 - the server is unreachable: it may be restarting
            if not _is_outage(err):
                raise
            client, ended = reconnect(client, f"the server at {opts.control_address} did not come back")
            if ended is not None:
                return ended
            _stop(client, run_ids[-1])
            run_ids.append(_start(client, fab))
            say(f"server is back: resubmitted as run {run_ids[-1]}; it resumes from the last completed round")
            continue
        if flower == "unknown":  # a server that lost its database: submit again, the run folder resumes
            run_ids.append(_start(client, fab))
            say(f"the server no longer knows the run: resubmitted as run {run_ids[-1]}")
            continue
        if flower.startswith("finished"):
            stopping.wait(opts.poll)  # let the ServerApp's last status write land
            saved = _run_status(run_dir)
            if saved.get("status") in ("completed", "failed") or stopping.is_set():
                continue
            return outcome("failed", f"the ServerApp ended ({flower}) without a status; see the server's log")
        stopping.wait(opts.poll)
