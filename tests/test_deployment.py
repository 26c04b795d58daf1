"""End to end on 127.0.0.1: ``edgetune server`` + two ``edgetune device join`` + ``edgetune run`` (``-m e2e``).

One federation serves every test in the file (module fixture): a SuperLink with TLS and
SuperNode authentication, two devices with different local JSONL data (tiny model), and a
two-round run. Then: an unregistered device is refused (both sides say so), a plain-text
client cannot talk to the TLS port, the bytes per round equal a ``simulate()`` of the same
settings, a secure-aggregation round completes on the same devices, a third device joins and
is killed after sending its masked input while the round still yields the exact sum, and
every process the test started (and every process those started) is gone.

Ports are picked free at run time; ``FLWR_HOME`` points into the test's folder. Flower
starts a fresh Python process for every message a device handles, so each round costs a few
process starts plus a Ray start for the simulation: 175-304 s measured here at a load average
of 6-8 (the machine was shared). The three-device round adds about 230 s (measured at a load
average of 7), a minute of it the SuperLink waiting for the killed device's heartbeat to lapse.
"""

from __future__ import annotations

import json
import os
import shutil
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
import numpy as np
import psutil
import pytest
from safetensors.numpy import load_file

from edgetune import wire

pytestmark = pytest.mark.e2e

STEP_TIMEOUT = 420  # seconds for one stage (start, run); generous: the machine may be shared
DEVICES = ("dev-a", "dev-b")
THIRD = "dev-c"  # registered from the start, joins for the three-device SecAgg round only
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
    killed: set[str] = field(default_factory=set)

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        log = self.root / f"{name}.out"
        self.logs[name] = log
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgetune.cli", *args],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env={**os.environ, **(env or {})},
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
    for name in (*DEVICES, THIRD, "rogue"):
        assert _cli("device", "keygen", "--out", str(root / "keys"), "--name", name).returncode == 0
    registry = root / "registry"  # the registered devices' public keys, which devices check rosters against
    registry.mkdir()
    for i, name in enumerate((*DEVICES, THIRD)):
        _write_data(data / f"{name}.jsonl", f"device {i}")
        shutil.copy(root / "keys" / f"{name}.pub", registry)
    try:
        allow = [a for name in (*DEVICES, THIRD) for a in ("--allow-device", str(root / "keys" / f"{name}.pub"))]
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
                *("--ca", str(fed.ca), "--peer-keys", str(registry)),
                env={wire.SA_RECORD_ENV: str(root / "probe" / name)},  # their SecAgg inputs, for the exact sum
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


def _kill_tree(proc: subprocess.Popen[str]) -> list[int]:
    """SIGKILL ``proc`` and every process under it (SuperNode, ClientApp), each by PID, as a
    device that loses power; returns the PIDs."""
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in family:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    return [p.pid for p in family]


def test_three_devices_one_killed_after_sending_its_masked_input(federation: Federation) -> None:
    """SecAgg's hardest dropout on real devices (TLS, registered keys): a third device joins;
    it holds the unmask message (``client/secagg_probe.py``), i.e. after its masked input
    reached the server, which lists it among the survivors, and is killed there by PID with
    its SuperNode and ClientApp processes. The two others' seed shares (t = 2 of n = 3) remove
    its self-mask, so the protocol yields the sum of all three masked inputs: the unmasked
    total must equal x_a + x_b + x_c mod 2^k exactly. With the fp32 downlink the update the
    server stores is that total decoded over the 3 inputs, so the test reads it back."""
    from edgetune.adapters.secagg_spec import decode_sum, round_spec
    from edgetune.config import from_flat

    fed, root = federation, federation.root
    hold = root / "probe" / f"{THIRD}.hold"
    victim = fed.start(
        THIRD,
        *("device", "join", "--server", fed.fleet, "--data", str(root / "data" / f"{THIRD}.jsonl")),
        *("--storage", str(root / "storage" / THIRD), "--key", str(root / "keys" / f"{THIRD}.key")),
        *("--ca", str(fed.ca), "--peer-keys", str(root / "registry")),
        env={wire.SA_RECORD_ENV: str(root / "probe" / THIRD), wire.SA_HOLD_ENV: str(hold)},
    )
    fed.wait_for(THIRD, "connected to the server as node")
    settings = {**RUN_SETTINGS, "secagg.enabled": "true", "federation.codec": "fp32"}
    run_dir = root / "run-secagg-3"
    fed.start(
        "run-3",
        *("run", "--server", fed.control, "--ca", str(fed.ca), "--run-dir", str(run_dir)),
        *("--devices", "3", "--rounds", "1", *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]),
    )
    deadline = time.monotonic() + 2 * STEP_TIMEOUT
    while not hold.exists():
        assert fed.procs["run-3"].poll() is None, fed.output("run-3")[-3000:]
        assert time.monotonic() < deadline, f"{THIRD} never reached the unmask stage:\n{fed.output(THIRD)[-3000:]}"
        time.sleep(0.2)
    marker = json.loads(hold.read_text())
    assert marker["round"] == 1 and len(marker["survivors"]) == 3 and marker["node"] in marker["survivors"]
    killed = _kill_tree(victim)
    fed.killed.add(THIRD)
    assert victim.wait(timeout=30) == -signal.SIGKILL and len(killed) >= 2  # join and its SuperNode at least
    run = fed.procs["run-3"]
    assert run.wait(timeout=STEP_TIMEOUT) == 0, fed.output("run-3")[-3000:]

    rows = [json.loads(line) for line in (run_dir / wire.METRICS_FILE).read_text().splitlines()]
    sa = rows[1]["secagg"]
    assert sa["skipped"] is None and rows[1]["version"] == 1
    assert sa["cohort"] == 3 and sa["threshold"] == 2 and sa["k"] == 1 + 2  # b + ceil(log2(n + 1))
    assert sa["survivors"] == 3  # masked inputs counted: the killed device's is in the sum
    assert sa["dropouts"] == {"keys": 0, "share": 0, "mask": 0, "unmask": 1}
    # The SuperLink answers for the dead node once its heartbeat lapses; the round names that node.
    assert any(r.startswith(f"secagg unmask, node {marker['node']}: ") for r in rows[1]["rejected"]), rows[1]
    inputs = {name: np.load(root / "probe" / name / "input-r1.npy") for name in (*DEVICES, THIRD)}
    k = sa["k"]
    total = sum(x.astype(np.uint64) for x in inputs.values()) & np.uint64((1 << k) - 1)
    assert inputs[THIRD].any()  # leaving its input out would change the sum

    stored = load_file(str(run_dir / wire.UPDATES_DIR / "v0001.safetensors"))
    names = {key.rsplit(":", 1)[0]: key for key in stored}
    shapes = {name: tuple(stored[key].shape) for name, key in names.items()}
    cfg = from_flat({**settings, "federation.num-devices": 3})
    spec = round_spec(cfg, shapes, 3)
    assert spec.k == k and spec.dim == total.size
    mean = np.concatenate([stored[names[n]].reshape(-1) for n in sorted(names)]).astype(np.float64)
    # mean = (total * 2c / (2^b - 1) - 3c) / 3: read the integer total back (float32 error << 1/2)
    recovered = np.rint((3 * mean + 3 * spec.range) * ((1 << spec.bits) - 1) / (2 * spec.range)).astype(np.int64)
    assert np.array_equal(recovered, total.astype(np.int64))
    expected = decode_sum(total, spec, 3, 3.0)  # the server's own decoding, bit for bit
    assert all(np.array_equal(stored[names[n]], expected[n].numpy()) for n in names)


def test_every_started_process_is_stopped(federation: Federation) -> None:
    # Runs last in the file; the fixture's teardown has not run yet, so stop everything here.
    stopped_here = {name for name, proc in federation.procs.items() if proc.poll() is None}
    for name in stopped_here:
        os.kill(federation.procs[name].pid, signal.SIGTERM)
    for name, proc in federation.procs.items():
        # 130: stopped by the signal (the one line and exit code of every interrupted job); 1: refused.
        # Ended on their own before: the refused device (1) and the three-device run (0, completed).
        expected = (1, 130) if name in stopped_here else (0, 1)
        expected = (-signal.SIGKILL,) if name in federation.killed else expected
        assert proc.wait(timeout=60) in expected, f"{name} exited {proc.returncode}"
    time.sleep(2)
    assert federation.tracker.seen, "the tracker saw no processes"
    assert federation.tracker.alive() == []
    assert "server stopped" in federation.output("server")
