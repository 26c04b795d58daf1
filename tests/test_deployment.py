"""End to end on 127.0.0.1: ``edgetune server`` + two ``edgetune device join`` + ``edgetune run`` (``-m e2e``).

One federation serves every test in the file (module fixture): a SuperLink with TLS and
SuperNode authentication, two devices with different local JSONL data (tiny model), and a
two-round run. Then: an unregistered device is refused (both sides say so), a plain-text
client cannot talk to the TLS port, the bytes per round equal a ``simulate()`` of the same
settings, a secure-aggregation round completes on the same devices, and every process the
test started (and every process those started) is gone.

Ports are picked free at run time; ``FLWR_HOME`` points into the test's folder. Flower
starts a fresh Python process for every message a device handles, so each round costs a few
process starts plus a Ray start for the simulation: 175-304 s measured here at a load average
of 6-8 (the machine was shared).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest
from safetensors.numpy import load_file

from edgetune import wire

pytestmark = pytest.mark.e2e

STEP_TIMEOUT = 420  # seconds for one stage (start, run); generous: the machine may be shared
DEVICES = ("dev-a", "dev-b")
RUN_SETTINGS = {
    "model.base": "tiny",
    "lora.rank": "4",
    "data.max-length": "128",
    "train.local-steps": "2",
    "train.batch-size": "4",
    "seed": "7",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_data(path: Path, tag: str, n: int = 24) -> Path:
    lines = [json.dumps({"prompt": f"{tag} question {i}?", "response": f"{tag} answer number {i}."}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


class _Tracker:
    """Every process started here and all their descendants, sampled every 0.5 s."""

    def __init__(self) -> None:
        self.roots: list[subprocess.Popen[str]] = []
        self.seen: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            for root in list(self.roots):
                try:
                    family = [psutil.Process(root.pid), *psutil.Process(root.pid).children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                for p in family:
                    self.seen.setdefault(p.pid, p)

    def alive(self) -> list[str]:
        out = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                continue
        return out

    def close(self) -> None:
        self._stop.set()


@dataclass
class Federation:
    root: Path
    fleet: str
    control: str
    ca: Path
    tracker: _Tracker
    logs: dict[str, Path] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    run: subprocess.CompletedProcess[str] | None = None
    rogue: subprocess.CompletedProcess[str] | None = None

    def start(self, name: str, *args: str) -> subprocess.Popen[str]:
        log = self.root / f"{name}.out"
        self.logs[name] = log
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgetune.cli", *args],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.procs[name] = proc
        self.tracker.roots.append(proc)
        return proc

    def output(self, name: str) -> str:
        return self.logs[name].read_text()

    def wait_for(self, name: str, text: str, timeout: float = STEP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output(name):
            proc = self.procs[name]
            assert proc.poll() is None, f"{name} exited ({proc.returncode}):\n{self.output(name)[-3000:]}"
            assert time.monotonic() < deadline, f"{name}: no {text!r} within {timeout}s:\n{self.output(name)[-3000:]}"
            time.sleep(0.5)


def _cli(*args: str, timeout: float = STEP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgetune.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("deploy")
    old_home = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(root / "flwr-home")  # children inherit it; installed bundles go here
    tracker = _Tracker()
    fed = Federation(
        root,
        f"127.0.0.1:{_free_port()}",
        f"127.0.0.1:{_free_port()}",
        root / "state" / "tls" / "ca.pem",
        tracker,
    )
    data = root / "data"
    data.mkdir()
    for name in (*DEVICES, "rogue"):
        assert _cli("device", "keygen", "--out", str(root / "keys"), "--name", name).returncode == 0
    for i, name in enumerate(DEVICES):
        _write_data(data / f"{name}.jsonl", f"device {i}")
    try:
        allow = [a for name in DEVICES for a in ("--allow-device", str(root / "keys" / f"{name}.pub"))]
        fed.start(
            "server",
            "server",
            "--state-dir",
            str(root / "state"),
            "--listen",
            fed.fleet,
            "--control",
            fed.control,
            *allow,
        )
        fed.wait_for("server", "ready:")
        for name in DEVICES:
            fed.start(
                name,
                *("device", "join", "--server", fed.fleet, "--data", str(data / f"{name}.jsonl")),
                *("--storage", str(root / "storage" / name), "--key", str(root / "keys" / f"{name}.key")),
                *("--ca", str(fed.ca)),
            )
        rogue = fed.start(
            "rogue",
            *("device", "join", "--server", fed.fleet, "--data", str(data / "dev-a.jsonl")),
            *(
                "--storage",
                str(root / "storage" / "rogue"),
                "--key",
                str(root / "keys" / "rogue.key"),
                "--ca",
                str(fed.ca),
            ),
        )
        sets = [a for k, v in RUN_SETTINGS.items() for a in ("--set", f"{k}={v}")]
        fed.run = _cli(
            *("run", "--server", fed.control, "--ca", str(fed.ca), "--run-dir", str(root / "run")),
            *("--devices", "2", "--rounds", "2", *sets),
        )
        rogue.wait(timeout=STEP_TIMEOUT)  # refused while the run went on
        yield fed
    finally:
        for proc in fed.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)  # Ctrl-C's path: each stops its own children
        for proc in fed.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(2)
        tracker.close()
        if old_home is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = old_home


def test_two_devices_train_two_rounds(federation: Federation) -> None:
    run = federation.run
    assert run is not None and run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "round 2:" in run.stdout and "eval loss" in run.stdout  # per-round lines, then the summary table
    run_dir = federation.root / "run"
    rows = [json.loads(line) for line in (run_dir / wire.METRICS_FILE).read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["replies"] == 2
        assert set(r["per_device"]) == set(DEVICES)
        assert all({"train_loss", "eval_loss"} <= set(m) for m in r["per_device"].values())
    assert rows[2]["eval_loss"] < rows[0]["eval_loss"]
    adapter = load_file(str(run_dir / wire.ADAPTER_DIR / "adapter_model.safetensors"))
    assert any(abs(v).max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    assert json.loads((run_dir / wire.STATUS_FILE).read_text())["status"] == "completed"
    for name in DEVICES:  # each device keeps its state in its own storage, under the run's key
        held = list((federation.root / "storage" / name / wire.DEVICE_RUNS_DIR).glob(f"*/{wire.HELD_ADAPTER_FILE}"))
        assert len(held) == 1


def test_unregistered_device_is_refused_on_both_sides(federation: Federation) -> None:
    assert federation.procs["rogue"].returncode == 1
    assert "this device's key is not registered on the server" in federation.output("rogue")
    assert "REFUSED a device" in federation.output("server")


def test_plaintext_client_cannot_use_the_tls_port(federation: Federation) -> None:
    plain = grpc.insecure_channel(federation.fleet)
    with pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(plain).result(timeout=5)
    plain.close()
    creds = grpc.ssl_channel_credentials(root_certificates=federation.ca.read_bytes())
    secure = grpc.secure_channel(federation.fleet, creds)
    grpc.channel_ready_future(secure).result(timeout=20)  # the same port does answer TLS
    secure.close()
    refused = _cli(
        "run", "--server", federation.control, "--insecure-plaintext", "--server-wait", "3", "--base", "tiny"
    )
    assert refused.returncode == 1


def test_bytes_per_round_equal_the_simulation(federation: Federation) -> None:
    from edgetune.config import from_flat
    from edgetune.server.metrics import read_metrics
    from edgetune.simulations.simulate import simulate

    sim_dir = federation.root / "sim"
    flat = {**RUN_SETTINGS, "federation.rounds": 2, "federation.num-devices": 2, "run-dir": str(sim_dir)}
    simulate(from_flat({**flat, "data.source": str(federation.root / "data")}))
    sim = [(r["round"], r["bytes_up"], r["bytes_down"]) for r in read_metrics(sim_dir)]
    real = [(r["round"], r["bytes_up"], r["bytes_down"]) for r in read_metrics(federation.root / "run")]
    assert real == sim and sim[1][1] > 0


def test_secure_aggregation_round_on_real_devices(federation: Federation) -> None:
    """The same two SuperNodes run a SecAgg round: four message stages, each message in a fresh
    ClientApp process, the device's round secrets kept in the SuperNode's context state."""
    sets = [a for k, v in {**RUN_SETTINGS, "secagg.enabled": "true"}.items() for a in ("--set", f"{k}={v}")]
    run_dir = federation.root / "run-secagg"
    run = _cli(
        *("run", "--server", federation.control, "--ca", str(federation.ca), "--run-dir", str(run_dir)),
        *("--devices", "2", "--rounds", "1", *sets),
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / wire.METRICS_FILE).read_text().splitlines()]
    sa = rows[1]["secagg"]
    assert sa["skipped"] is None and sa["survivors"] == 2 and sa["k"] == 1 + 2 and rows[1]["version"] == 1
    assert set(sa["stage_seconds"]) == {"keys", "share", "mask", "unmask"}


def test_every_started_process_is_stopped(federation: Federation) -> None:
    # Runs last in the file; the fixture's teardown has not run yet, so stop everything here.
    for proc in federation.procs.values():
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
    for name, proc in federation.procs.items():
        assert proc.wait(timeout=60) in (0, 1), f"{name} exited {proc.returncode}"
    time.sleep(2)
    assert federation.tracker.seen, "the tracker saw no processes"
    assert federation.tracker.alive() == []
    assert "server stopped" in federation.output("server")
