"""``simulate(..., ray_address=...)`` on a two-node Ray cluster made of two ``ray start``
processes on 127.0.0.1 (``pytest -m e2e``).

Each node is started with ``--block`` in a session of its own, on free ports and a temp
folder of its own, so the test stops exactly what it started (by process group) and touches
no other Ray on the machine; it checks that nothing it started is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from edgetune.config import DataConfig, FederationConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig
from edgetune.server.metrics import read_metrics
from edgetune.simulations.simulate import simulate

pytestmark = pytest.mark.e2e

_RAY = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _node_flags(temp_dir: str) -> list[str]:
    p = _free_ports(6)
    return [
        "--num-cpus=1",
        "--block",
        "--disable-usage-stats",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--node-manager-port={p[0]}",
        f"--object-manager-port={p[1]}",
        f"--dashboard-agent-grpc-port={p[2]}",
        f"--dashboard-agent-listen-port={p[3]}",
        f"--metrics-export-port={p[4]}",
        f"--runtime-env-agent-port={p[5]}",
        "--object-store-memory=100000000",
    ]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([*_RAY, "start", *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each node's process group (``ray start --block`` then stops what it started), then SIGKILL."""
    for p in procs:
        if _group_alive(p.pid):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_group_alive(p.pid) for p in procs):
        time.sleep(0.5)
    for p in procs:
        if _group_alive(p.pid):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)


def _wait_for_nodes(address: str, count: int, timeout: float = 90) -> None:
    probe = (
        "import ray, sys, time\n"
        f"ray.init(address={address!r}, logging_level='ERROR')\n"
        f"deadline = time.monotonic() + {timeout}\n"
        f"while sum(n['Alive'] for n in ray.nodes()) < {count} and time.monotonic() < deadline:\n"
        "    time.sleep(1)\n"
        f"sys.exit(0 if sum(n['Alive'] for n in ray.nodes()) >= {count} else 1)\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=timeout + 60, capture_output=True)


def test_simulate_attaches_to_a_two_node_cluster_and_leaves_nothing_behind(tmp_path: Path) -> None:
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    (gcs_port,) = _free_ports(1)
    address = f"127.0.0.1:{gcs_port}"
    procs: list[subprocess.Popen] = []
    try:
        head = ["--head", f"--port={gcs_port}", "--include-dashboard=false", *_node_flags(temp_dir)]
        procs.append(_start(head, tmp_path / "head.log"))
        _wait_for_nodes(address, 1)
        procs.append(_start([f"--address={address}", *_node_flags(temp_dir)], tmp_path / "worker.log"))
        _wait_for_nodes(address, 2)

        cfg = RunConfig(
            seed=5,
            run_dir=str(tmp_path / "run"),
            model=ModelConfig(base="tiny"),
            lora=LoraConfig(rank=4),
            data=DataConfig(max_length=128, max_eval_examples=2),
            train=TrainConfig(local_steps=1, batch_size=2, precision="fp32"),
            federation=FederationConfig(rounds=2, num_devices=4),
        )
        run_dir = simulate(cfg, ray_address=address)
        rows = read_metrics(run_dir)
        assert [m["round"] for m in rows] == [0, 1, 2]
        assert all(m["replies"] == 4 for m in rows[1:])
        assert all(m["eval_loss"] is not None for m in rows)
        # The cluster is still up after the run disconnected (simulate does not stop it).
        assert all(p.poll() is None for p in procs)
        assert subprocess.run(["pgrep", "-f", temp_dir], capture_output=True).returncode == 0
    finally:
        _stop(procs)
    assert not any(_group_alive(p.pid) for p in procs)
    leftover = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout.split()
    assert leftover == [], f"Ray processes left behind: {leftover}"
    shutil.rmtree(temp_dir, ignore_errors=True)
