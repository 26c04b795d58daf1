"""A federated run's budget: evaluation cadence, where each round's time goes, and a run
folder that stays small (checkpoint retention and the bounded update chain).

The run goes through the real ServerApp logic (``run_federation``) and the real ClientApp
handlers, with an in-process Grid instead of Ray (seconds, not a minute).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from edgetune import wire
from edgetune.client.app import evaluate as client_evaluate
from edgetune.client.app import identify as client_identify
from edgetune.client.app import train as client_train
from edgetune.config import ConfigError, DataConfig, FederationConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig
from edgetune.server.checkpoint import dir_bytes, footprint, latest_checkpoint
from edgetune.server.federation import run_federation
from edgetune.server.metrics import PHASES, read_metrics, time_table

NUM_DEVICES = 4


NODE0 = 2**63 - 2
"""Node ``NODE0 + i`` is device ``i``: unsigned 64-bit like Flower's, on both sides of 2**63
(numpy holds such a list as float64) and not float64 values."""


HANDLERS = {"train": client_train, "evaluate": client_evaluate, wire.IDENTIFY: client_identify}


class InProcessGrid:
    """A Flower Grid stand-in: node ``NODE0 + i`` is the simulated device with partition id
    ``partitions[i]`` (default ``i``); each message goes straight to the ClientApp's handlers.
    Counts messages per type."""

    def __init__(self, num_devices: int, partitions: list[int] | None = None) -> None:
        self.num_devices = num_devices
        self.partitions = partitions or list(range(num_devices))
        self.sent: dict[str, list[int]] = {kind: [] for kind in HANDLERS}

    def get_node_ids(self) -> list[int]:
        return [NODE0 + i for i in range(self.num_devices)]

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            self.sent[kind].append(node)
            if not 0 <= node - NODE0 < self.num_devices:
                raise ValueError(f"Invalid destination node ID for Message: {node}")
            config = {wire.PARTITION_ID: self.partitions[node - NODE0], "num-partitions": self.num_devices}
            context = Context(run_id=1, node_id=node, node_config=config, state=RecordDict(), run_config={})
            replies.append(HANDLERS[kind](msg, context))
        return replies


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages read the sending task's identity, which a SuperLink would set."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _config(run_dir: Path, precision: str = "fp32", **federation: object) -> RunConfig:
    return RunConfig(
        seed=3,
        run_dir=str(run_dir),
        model=ModelConfig(base="tiny"),
        lora=LoraConfig(rank=4),
        data=DataConfig(max_length=128, max_eval_examples=2),
        train=TrainConfig(local_steps=1, batch_size=2, precision=precision),  # type: ignore[arg-type]
        federation=FederationConfig(**{"num_devices": NUM_DEVICES, **federation}),  # type: ignore[arg-type]
    )


def test_eval_cadence_sample_phase_times_and_retention(tmp_path: Path, server_identity: None) -> None:
    cfg = _config(tmp_path, rounds=5, eval_every=2, eval_devices=2, keep_checkpoints=1, checkpoint_every=4)
    grid = InProcessGrid(NUM_DEVICES)
    run_federation(grid, cfg)  # type: ignore[arg-type]
    rows = read_metrics(tmp_path)
    assert [m["round"] for m in rows] == [0, 1, 2, 3, 4, 5]
    evaluated = [m["round"] for m in rows if m["eval_loss"] is not None]
    assert evaluated == [0, 2, 4, 5]  # round 0, every 2nd, and always the last
    # Four evaluating rounds of the same two devices (a sample fixed for the run).
    assert len(grid.sent["evaluate"]) == 4 * 2 and len(set(grid.sent["evaluate"])) == 2
    assert len(grid.sent["train"]) == 5 * NUM_DEVICES
    for m in rows[1:]:
        expect = {"sync", "train", "aggregate", "io"} | ({"evaluate"} if m["round"] in evaluated else set())
        assert set(m["wall_seconds"]) == set(m["cpu_seconds"]) == expect
        assert all(v >= 0 for v in [*m["wall_seconds"].values(), *m["cpu_seconds"].values()])
        assert m["wall_seconds"]["train"] > 0 and m["cpu_seconds"]["train"] > 0 and m["server_cpu_seconds"] > 0
        # The server's own phases happen inside the round's wall time.
        assert m["wall_seconds"]["aggregate"] + m["wall_seconds"]["io"] <= m["seconds"]
    table = time_table(rows)
    assert all(p in table for p in PHASES)
    # Retention: the newest checkpoint and round 4's snapshot; the 1-bit chain is short enough to keep whole.
    assert sorted(p.name for p in (tmp_path / wire.CHECKPOINT_DIR).iterdir()) == [
        "round_0004.safetensors",
        "round_0005.safetensors",
    ]
    round_, state = latest_checkpoint(tmp_path)
    assert round_ == 5 and sorted(state.updates) == [1, 2, 3, 4, 5]
    assert dir_bytes(tmp_path) > dir_bytes(tmp_path / wire.CHECKPOINT_DIR) > 0
    assert footprint(tmp_path).endswith("(2 checkpoints, 5 updates kept)")


def test_a_rerun_samples_the_same_devices_whatever_their_node_ids(tmp_path: Path, server_identity: None) -> None:
    # Node ids are random on every simulation start: the devices name themselves first.
    def devices(grid: InProcessGrid, run_dir: Path) -> list[list[str]]:
        cfg = _config(run_dir, rounds=2, devices_per_round=2, eval_devices=1, dropout=0.3)
        run_federation(grid, cfg)  # type: ignore[arg-type]
        return [sorted(m["per_device"]) for m in read_metrics(run_dir)]

    first, second = InProcessGrid(NUM_DEVICES), InProcessGrid(NUM_DEVICES, [2, 0, 3, 1])
    assert devices(first, tmp_path / "a") == devices(second, tmp_path / "b")
    assert sorted(second.sent[wire.IDENTIFY]) == first.get_node_ids()  # each node asked once
    assert "identify" not in (tmp_path / "a" / wire.UPLINKS_FILE).read_text()  # on record only if flagged


def test_resume_may_change_the_budget_keys(tmp_path: Path, server_identity: None) -> None:
    # bf16: devices train and evaluate on the base held in bf16 (edgetune/precision.py).
    run_federation(InProcessGrid(NUM_DEVICES), _config(tmp_path, "bf16", rounds=1))  # type: ignore[arg-type]
    more = _config(tmp_path, "bf16", rounds=2, eval_every=3, eval_devices=1, keep_checkpoints=1, checkpoint_every=5)
    grid = InProcessGrid(NUM_DEVICES)
    run_federation(grid, more)  # type: ignore[arg-type]
    assert [m["round"] for m in read_metrics(tmp_path)] == [0, 1, 2]
    assert len(grid.sent["evaluate"]) == 2  # the resume re-evaluation and the last round, one device each
    assert [p.name for p in (tmp_path / wire.CHECKPOINT_DIR).iterdir()] == ["round_0002.safetensors"]
    assert all(m["eval_loss"] is None or m["eval_loss"] < 10 for m in read_metrics(tmp_path))


@pytest.mark.parametrize(
    ("key", "value"),
    [("eval_every", 0), ("eval_devices", 5), ("keep_checkpoints", 0), ("checkpoint_every", -1)],
)
def test_budget_keys_are_validated(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"federation.{key.replace('_', '-')}={value}"):
        FederationConfig(num_devices=NUM_DEVICES, **{key: value})  # type: ignore[arg-type]
