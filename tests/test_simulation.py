"""End-to-end Flower simulations on the tiny random Llama (``pytest -m e2e``).

Each simulation starts Ray (15-40 s here), so the file runs six: one uninterrupted 3-round
run shared by the end-to-end, resume and changed-settings tests, a run crashed mid-round and
then resumed (two), a run with two misbehaving devices, a run whose server cannot start, and
a resume with other settings. ``simulate`` shuts Ray down itself; the runs started here with
``run_simulation`` do it in a ``finally``.

The tiny model's tokenizer is byte-level (one token per byte), so ``data.max-length`` is 128:
at 64 the ChatML system prompt and the question leave no assistant token to supervise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from edgetune import wire
from edgetune.adapters.lora import adapter_shapes, init_adapter
from edgetune.adapters.peft_io import load_adapter
from edgetune.client.app import app as client_app
from edgetune.client.app import evaluate as client_evaluate
from edgetune.client.app import train as client_train
from edgetune.config import DataConfig, FederationConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig
from edgetune.fileio import load_tensors
from edgetune.models import model_skeleton, tiny_llama, tiny_tokenizer
from edgetune.server.app import server_app_for
from edgetune.server.federation import run_federation
from edgetune.server.metrics import read_metrics
from edgetune.simulations.simulate import SimulationError, run_apps, simulate

pytestmark = pytest.mark.e2e

NUM_DEVICES = 3


def _config(run_dir: Path, rounds: int, **changes: object) -> RunConfig:
    cfg = RunConfig(
        seed=7,
        run_dir=str(run_dir),
        model=ModelConfig(base="tiny"),
        lora=LoraConfig(rank=4),
        data=DataConfig(max_length=128),
        train=TrainConfig(local_steps=2, batch_size=4),
        federation=FederationConfig(rounds=rounds, num_devices=NUM_DEVICES),
    )
    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]


def _run_simulation(server_app: ServerApp, app: ClientApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_simulation`` with the backend ``simulate`` uses; always shuts Ray down."""
    run_apps(server_app, app, NUM_DEVICES)


def _status(cfg: RunConfig) -> dict[str, str]:
    return json.loads((Path(cfg.run_dir) / wire.STATUS_FILE).read_text())


def _global_adapter(cfg: RunConfig) -> dict[str, torch.Tensor]:
    return load_adapter(Path(cfg.run_dir) / wire.ADAPTER_DIR)


def _meta(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as fh:
        return fh.metadata()


def _initial_adapter(cfg: RunConfig) -> dict[str, torch.Tensor]:
    return init_adapter(adapter_shapes(model_skeleton(cfg.model.base), cfg.lora), cfg.seed)


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    """One uninterrupted 3-round simulation, shared by the tests that only read it."""
    cfg = _config(tmp_path_factory.mktemp("uninterrupted") / "run", rounds=3)
    assert simulate(cfg) == Path(cfg.run_dir)
    return cfg


def test_simulation_runs_end_to_end(completed_run: RunConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, run_dir = completed_run, Path(completed_run.run_dir)
    assert _status(cfg) == {"status": "completed"}

    rows = read_metrics(run_dir)
    assert [m["round"] for m in rows] == [0, 1, 2, 3]
    assert all(m["eval_loss"] is not None and math.isfinite(m["eval_loss"]) for m in rows)
    assert all(len(m["per_device"]) == NUM_DEVICES for m in rows)
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]  # three rounds of FedAvg learn something
    for m in rows[1:]:
        assert (m["replies"], m["rejected"], m["version"]) == (NUM_DEVICES, [], m["round"])
        assert m["train_loss"] is not None and math.isfinite(m["train_loss"])
        assert m["bytes_up"] > 0 and m["bytes_down"] > 0
        # DESIGN.md's target: 1-bit exchange moves >= 25x fewer bytes than fp32, each way.
        assert m["fp32_bytes_up"] >= 25 * m["bytes_up"], m
        assert m["fp32_bytes_down"] >= 25 * m["bytes_down"], m

    ckpts = sorted(p.name for p in (run_dir / wire.CHECKPOINT_DIR).iterdir())
    assert ckpts == ["round_0002.safetensors", "round_0003.safetensors"]  # federation.keep-checkpoints=2
    assert sorted(p.name for p in (run_dir / wire.UPDATES_DIR).iterdir()) == [
        "v0001.safetensors",
        "v0002.safetensors",
        "v0003.safetensors",
    ]

    # The global adapter is a PEFT folder that loads onto the base model.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # loading must never reach a model hub
    folder = run_dir / wire.ADAPTER_DIR
    tokenizer = tiny_tokenizer()
    model = PeftModel.from_pretrained(tiny_llama(len(tokenizer)), folder)
    loaded = {k: v.detach() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    saved, initial = _global_adapter(cfg), _initial_adapter(cfg)
    assert loaded.keys() == saved.keys() == initial.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    b_names = [k for k in saved if ".lora_B." in k]
    assert b_names and all(saved[k].abs().sum() > 0 for k in b_names)  # B left zero
    assert all(torch.equal(saved[k], initial[k]) for k in saved if ".lora_A." in k)  # A frozen
    # It is the last checkpoint's adapter.
    ckpt = load_tensors(run_dir / wire.CHECKPOINT_DIR / "round_0003.safetensors")
    assert all(torch.equal(ckpt[f"adapter/{k}"], saved[k]) for k in saved)

    # Every device ends holding exactly the server's adapter, at the server's version.
    for i in range(NUM_DEVICES):
        held_path = run_dir / wire.DEVICES_DIR / f"sim-{i}" / wire.HELD_ADAPTER_FILE
        held = load_tensors(held_path)
        assert _meta(held_path)["version"] == "3"
        assert all(torch.equal(held[k], saved[k]) for k in saved), f"sim-{i} is out of sync"


class SimulatedCrash(RuntimeError):
    """The server 'dies' here."""


class CrashingGrid:
    """Delegates to Flower's Grid; raises after the ``crash_after``-th train round returns."""

    def __init__(self, grid: Grid, crash_after: int) -> None:
        self._grid, self._crash_after, self.train_rounds = grid, crash_after, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if messages and messages[0].metadata.message_type == "train":
            self.train_rounds += 1
            if self.train_rounds == self._crash_after:
                raise SimulatedCrash(f"server killed after the devices trained round {self.train_rounds}")
        return replies


def _crashing_server(cfg: RunConfig, crash_after: int) -> ServerApp:
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(CrashingGrid(grid, crash_after), cfg)  # type: ignore[arg-type]

    return app


def test_resume_after_a_crash_equals_the_uninterrupted_run(
    completed_run: RunConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = dataclasses.replace(completed_run, run_dir=str(tmp_path / "crashed"))
    run_dir = Path(cfg.run_dir)
    with pytest.raises(SimulatedCrash):
        _run_simulation(_crashing_server(cfg, crash_after=3), client_app, monkeypatch)

    # The crash hit after round 3's training: the server has round 2, the devices moved on.
    assert _status(cfg)["status"] == "failed" and "SimulatedCrash" in _status(cfg)["error"]
    assert sorted(p.name for p in (run_dir / wire.CHECKPOINT_DIR).iterdir()) == [
        "round_0001.safetensors",
        "round_0002.safetensors",
    ]
    assert [m["round"] for m in read_metrics(run_dir)] == [0, 1, 2]
    for i in range(NUM_DEVICES):
        assert _meta(run_dir / wire.DEVICES_DIR / f"sim-{i}" / wire.RESIDUAL_FILE)["round"] == "3"

    assert simulate(cfg) == run_dir  # same config: resumes from round_0002
    assert _status(cfg) == {"status": "completed"}

    expected, resumed = _global_adapter(completed_run), _global_adapter(cfg)
    assert resumed.keys() == expected.keys()
    for k in expected:
        assert torch.equal(resumed[k], expected[k]), k
    rows, ref = read_metrics(run_dir), read_metrics(Path(completed_run.run_dir))
    assert [m["round"] for m in rows] == [0, 1, 2, 3]  # round 3 once, no re-evaluated round 2
    for key in ("eval_loss", "train_loss", "version", "replies", "bytes_up", "per_device"):
        assert rows[3][key] == ref[3][key], key


def _misbehaving_client_app() -> ClientApp:
    """Device 0 sends a wrongly shaped delta, device 1 raises in train, device 2 is honest.

    Built in a function so that Ray pickles the handlers by value (the test module is not
    importable in Ray's worker processes).
    """
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        partition = int(context.node_config[wire.PARTITION_ID])
        if partition == 1:
            raise RuntimeError("device 1 ran out of battery")
        reply = client_train(msg, context)
        if partition == 0:  # a malicious device signs what it sends with its own key
            from edgetune.signing import content_digest, run_tag, sign, simulation_key

            delta = reply.content.array_records[wire.DELTA]
            reply.content[wire.DELTA] = ArrayRecord(
                {k: Array(np.zeros(a.numpy().size + 1, a.numpy().dtype)) for k, a in delta.items()}
            )
            config = str(msg.content.config_records[wire.CONFIG][wire.RUN_CONFIG_JSON])
            digest = content_digest("train", run_tag(config), "sim-0", reply.content)
            key = simulation_key(json.loads(config)["seed"], "sim-0")
            reply.content[wire.DEVICE][wire.SIGNATURE] = sign(key, digest)
        return reply

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return client_evaluate(msg, context)

    return app


def test_bad_devices_never_end_a_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path / "run", rounds=2)
    _run_simulation(server_app_for(cfg), _misbehaving_client_app(), monkeypatch)
    assert _status(cfg) == {"status": "completed"}

    rows = read_metrics(Path(cfg.run_dir))
    assert [m["round"] for m in rows] == [0, 1, 2]
    for m in rows[1:]:
        assert (m["replies"], m["version"]) == (1, m["round"]), m
        assert sorted(m["per_device"]) == ["sim-0", "sim-1", "sim-2"]  # all still evaluate
        assert [d for d, v in m["per_device"].items() if "train_loss" in v] == ["sim-2"]
        assert len(m["rejected"]) == 2, m["rejected"]
        shape_errors = [r for r in m["rejected"] if "expected shape" in r]
        device_errors = [r for r in m["rejected"] if "device error" in r and "ran out of battery" in r]
        assert len(shape_errors) == 1 and len(device_errors) == 1, m["rejected"]

    saved, initial = _global_adapter(cfg), _initial_adapter(cfg)
    assert any(not torch.equal(saved[k], initial[k]) for k in saved if ".lora_B." in k)


def test_a_server_that_cannot_start_raises_simulation_error(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "run", rounds=1, model=ModelConfig(base=str(tmp_path / "no-such-model")))
    with pytest.raises(SimulationError, match="did not complete: ModelError: .*no such file or folder"):
        simulate(cfg)
    assert _status(cfg)["status"] == "failed"


def test_resuming_with_other_settings_raises_simulation_error(completed_run: RunConfig, tmp_path: Path) -> None:
    copy = tmp_path / "copy"  # a copy, so that a fixed run_federation cannot touch the shared run
    shutil.copytree(completed_run.run_dir, copy)
    saved = json.loads((copy / wire.CONFIG_FILE).read_text())
    (copy / wire.CONFIG_FILE).write_text(json.dumps({**saved, "run-dir": str(copy)}))
    changed = dataclasses.replace(
        completed_run, run_dir=str(copy), train=dataclasses.replace(completed_run.train, learning_rate=1e-3)
    )
    with pytest.raises(SimulationError, match=r"other settings \(\['train.learning-rate'\]\)"):
        simulate(changed)


def _session_processes(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "sid=,pid=,comm="], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line.split()[0] == str(sid)]


def _ctrl_c(
    flags: list[str], run_dir: Path, ready: Callable[[list[dict]], bool], settle: float = 0.0
) -> tuple[str, str]:
    """Run ``edgetune simulate FLAGS`` in a session of its own and, once ``ready(metrics rows)``
    holds (and ``settle`` seconds more), send Ctrl-C as a terminal does (SIGINT to the process
    group). Checks exit code 130 within 10 s and no process of the session left 10 s later;
    returns stdout and stderr."""
    cli = [str(Path(sys.executable).parent / "edgetune"), "simulate", *flags, "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ready(read_metrics(run_dir)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        time.sleep(settle)
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert took < 10, f"stopped {took:.1f} s after Ctrl-C"
    deadline = time.monotonic() + 10  # Ray's actor exits a few seconds after the driver
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _session_processes(proc.pid) == []  # no Ray or Flower process left behind
    return out, err


def test_ctrl_c_stops_within_10_s_and_resume_equals_the_uninterrupted_run(
    completed_run: RunConfig, tmp_path: Path
) -> None:
    """Ctrl-C during round 2, then ``--resume``."""
    run_dir = tmp_path / "run"
    flags = ["--base", "tiny", "--seed", "7", "--set", "lora.rank=4", "--set", "data.max-length=128"]
    flags += ["--steps", "2", "--batch-size", "4", "--devices", str(NUM_DEVICES), "--rounds", "50"]
    _, err = _ctrl_c(flags, run_dir, lambda rows: any(m["round"] == 1 for m in rows))
    lines = [line for line in err.splitlines() if line.startswith("edgetune:")]
    assert lines[-1].startswith("edgetune: interrupted; round ") and "Traceback" not in err, err
    status = json.loads((run_dir / wire.STATUS_FILE).read_text())
    assert status["status"] == "interrupted" and 1 <= status["last_round"] < 3, status

    resumed = dataclasses.replace(completed_run, run_dir=str(run_dir))
    assert simulate(resumed) == run_dir  # rounds may change on resume: 50 -> 3
    expected, got = _global_adapter(completed_run), _global_adapter(resumed)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_ctrl_c_during_a_long_local_training_stops_within_10_s(tmp_path: Path) -> None:
    """A device's local steps in flight do not hold the stop up: Flower's engine would wait for
    them (three minutes of SmolLM2 steps on a busy machine); edgetune stops the device process."""
    run_dir = tmp_path / "run"
    flags = ["--base", "tiny", "--set", "data.max-length=128", "--steps", "100000", "--devices", "2", "--rounds", "2"]
    # round 0 evaluated: round 1's 100,000 local steps begin
    out, err = _ctrl_c(flags, run_dir, lambda rows: bool(rows), settle=2.0)
    assert out.startswith("edgetune simulate: 2 devices") and "worker" not in out  # Ray's "A worker died ..."
    assert [line for line in err.splitlines() if "edgetune:" in line or "worker" in line] == [
        f"edgetune: interrupted; round 0 is the last completed; continue with: edgetune simulate --resume {run_dir}"
    ], err
    assert json.loads((run_dir / wire.STATUS_FILE).read_text())["status"] == "interrupted"


def test_two_cpu_bound_processes_beside_the_run_change_nothing(completed_run: RunConfig, tmp_path: Path) -> None:
    """A simulation's result does not depend on how busy the machine is: the same run with two
    busy loops beside it (on a two-core machine: every core taken) ends on the same adapter.

    The loops run at normal priority, as the simulation's devices do (``run_apps`` starts Ray's
    workers at niceness 0 instead of Ray's 15, under which such loops left the actor about 3%
    of a core and this test took many minutes).
    """
    cfg = dataclasses.replace(completed_run, run_dir=str(tmp_path / "busy"))
    busy = "while True: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", busy]) for _ in range(2)]
    try:
        assert simulate(cfg) == Path(cfg.run_dir)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(timeout=10)
    expected, busy = _global_adapter(completed_run), _global_adapter(cfg)
    assert busy.keys() == expected.keys()
    for k in expected:
        assert torch.equal(busy[k], expected[k]), k
    rows, ref = read_metrics(Path(cfg.run_dir)), read_metrics(Path(completed_run.run_dir))
    assert [m["replies"] for m in rows] == [m["replies"] for m in ref]
    assert [m["eval_loss"] for m in rows] == [m["eval_loss"] for m in ref]
