"""``edgetune simulate``: the whole federation on one machine, with Flower's simulation engine.

Wraps ``flwr.simulation.run_simulation`` so that its surprises do not reach the user: the
run config is passed in directly (it does not read ``[tool.flwr.app.config]``), a failed
ServerApp makes this raise (and the CLI exit non-zero) instead of returning quietly, and
Ray is shut down afterwards. Virtual devices run one at a time in one Ray actor that owns
all cores, so every device it serves shares one loaded base model.

With ``ray_address`` (``edgetune simulate --ray-address HOST:PORT``) the simulation attaches
to a running Ray cluster instead of starting Ray: one actor per node (each owns as many cores
as the smallest node has), each a worker process with its own base model, so virtual devices
spread over the nodes and run in parallel. The run folder (and with it every virtual
device's storage) must be on a file system every node sees. Leaving disconnects; the
cluster keeps running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from edgetune import wire
from edgetune.config import RunConfig
from edgetune.processes import stop_on_signals

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

__all__ = ["SimulationError", "SimulationInterrupted", "run_apps", "simulate"]


class SimulationError(RuntimeError):
    """The simulated run did not complete (the reason is in the message)."""


class SimulationInterrupted(SimulationError):
    """Ctrl-C or SIGTERM stopped the run; ``status.json`` says ``interrupted`` and the last round."""


class _FlowerConsole(logging.Filter):
    """Hide Flower's notice that the Python simulation API is deprecated (we pin 1.39), and,
    once the run is stopping, its reports about the ClientApp processes stopped with it."""

    def __init__(self, stop: threading.Event | None) -> None:
        super().__init__()
        self.stop = stop

    def filter(self, record: logging.LogRecord) -> bool:
        if self.stop is not None and self.stop.is_set():
            return False
        return "run_simulation` function is deprecated" not in record.getMessage()


_SETTLE = 0.5
"""Seconds between a stop request and killing the device processes: the ServerApp notices the
stop within 0.1 s and writes ``status.json`` (``interrupted``) at once."""


def _stop_devices_when_asked(stop: threading.Event, finished: threading.Event) -> None:
    """Once ``stop`` is set, SIGKILL the Ray worker processes serving virtual devices that this
    process started (its descendants titled ``ray::ClientAppActor``).

    Flower's engine waits for the message a device is working on before it shuts down: on
    SmolLM2 on a busy machine, one device's local steps took three minutes after Ctrl-C. The
    interrupted round is redone on ``--resume`` (device files are written atomically), so its
    work in flight is not needed. Actors on other nodes of a cluster are not descendants and
    finish their message.
    """
    import psutil

    while not stop.wait(0.1):
        if finished.is_set():
            return
    if finished.wait(_SETTLE):
        return
    # Ray's driver prints each stopped worker as "A worker died ... unexpected system error" on
    # stdout; run_apps puts stdout back once Ray is shut down.
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - closed by run_apps
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error, IndexError):
            if proc.cmdline()[0].startswith("ray::ClientAppActor"):
                proc.kill()


def run_apps(
    server_app: ServerApp,
    client_app: ClientApp,
    num_devices: int,
    verbose: bool = False,
    stop: threading.Event | None = None,
    ray_address: str | None = None,
) -> None:
    """``run_simulation`` with edgetune's backend: one Ray actor owning all cores; Ray always shut down.

    With ``stop``, Ray is started here (as Flower would start it) and then SIGINT and SIGTERM
    only set ``stop`` (``edgetune.processes.stop_on_signals``; a second one raises
    KeyboardInterrupt): Ray's own SIGTERM handler, installed by
    ``ray.init``, would otherwise end the process with stack dumps and ``status.json``
    still ``running``. Once ``stop`` is set, the device processes are stopped without waiting
    for their message in flight (:func:`_stop_devices_when_asked`).
    """
    import ray
    from flwr.simulation import run_simulation

    # Ray's notice about a future default; keep today's behaviour and its console quiet.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray starts its workers at niceness 15, so any ordinary job beside the simulation starves
    # the devices' training; the simulation is the job the user asked for: normal priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    cpus = os.cpu_count() or 1
    backend: dict[str, dict[str, object]] = {
        "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": logging.ERROR},
    }
    if ray_address:  # an existing cluster: its nodes' cores are what they are
        backend["init_args"] = {"address": ray_address, "logging_level": logging.ERROR}
    notice = _FlowerConsole(stop)
    logging.getLogger("flwr").addFilter(notice)
    stdout, finished = sys.stdout, threading.Event()
    if stop is not None:
        threading.Thread(target=_stop_devices_when_asked, args=(stop, finished), daemon=True).start()
    try:
        if (stop is not None or ray_address) and not ray.is_initialized():
            # What Flower's Ray backend does when Ray is not up yet (it then leaves Ray alone).
            pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
            os.environ["PYTHONPATH"] = pythonpath
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **backend["init_args"])  # type: ignore[arg-type]
        if ray_address:
            backend["client_resources"]["num_cpus"] = cluster_worker_cpus()
        with stop_on_signals(stop) if stop is not None else contextlib.nullcontext():
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_devices,
                backend_config=backend,  # type: ignore[arg-type]
                verbose_logging=verbose,
            )
    finally:
        finished.set()
        logging.getLogger("flwr").removeFilter(notice)
        if ray.is_initialized():
            ray.shutdown()
        if sys.stdout is not stdout:  # muted while the devices were stopped
            sys.stdout.close()
            sys.stdout = stdout


def cluster_worker_cpus() -> int:
    """CPUs per virtual-device worker on the connected cluster: the smallest alive node's, so
    that every node fits one worker (and one base model) and none is left idle."""
    import ray

    cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    usable = [c for c in cpus if c > 0]
    if not usable:
        raise SimulationError("the Ray cluster has no node with CPUs to run virtual devices")
    return min(usable)


def simulate(cfg: RunConfig, verbose: bool = False, ray_address: str | None = None) -> Path:
    """Run (or resume) ``cfg`` in simulation; returns the run folder.

    Raises:
        SimulationError: the ServerApp failed or never reported completion.
        SimulationInterrupted: a signal stopped the run (``--resume`` continues it).
        ConnectionError: ``ray_address`` names no reachable Ray cluster.
        QuantizeError: ``model.quantize`` cannot train on this machine (before anything starts).
    """
    from edgetune.client.app import app as client_app
    from edgetune.quantize import check_trainable
    from edgetune.server.app import server_app_for

    check_trainable(cfg.model.quantize)  # an unsupported base quantisation fails here, in one line
    run_dir = Path(cfg.run_dir)
    error: BaseException | None = None
    stop = threading.Event()
    try:
        run_apps(server_app_for(cfg, stop), client_app, cfg.federation.num_devices, verbose, stop, ray_address)
    except BaseException as err:  # noqa: BLE001 - reported below with the run's own status
        error = err
    status_path = run_dir / wire.STATUS_FILE
    status = json.loads(status_path.read_text()) if status_path.is_file() else {"status": "missing"}
    if status.get("status") == "interrupted":
        raise SimulationInterrupted(
            f"interrupted; round {status.get('last_round')} is the last completed; "
            f"continue with: edgetune simulate --resume {run_dir}"
        )
    if error is not None or status.get("status") != "completed":
        reason = status.get("error") or (f"{type(error).__name__}: {error}" if error else "no status written")
        raise SimulationError(f"simulation in {run_dir} did not complete: {reason}") from error
    return run_dir
