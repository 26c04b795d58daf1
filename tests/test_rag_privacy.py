"""The device's RAG index never leaves it: every reply of a RAG-on simulation, inspected.

A tiny-model Flower simulation (2 devices, 2 rounds, ``rag.enabled=true``) runs under a
ServerApp whose Grid records every reply the devices send. Each reply may hold only the
``delta`` ArrayRecord (adapter tensor names and codec parts), the ``metrics`` MetricRecord
(numbers) and the ``device`` ConfigRecord (the device id); no chunk text may appear in any
byte of it, and no array may have the embeddings' width.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp

from edgetune import wire
from edgetune.adapters.lora import adapter_shapes
from edgetune.client.app import app as client_app
from edgetune.client.rag import EMBED_DIM, RagIndex
from edgetune.config import DataConfig, FederationConfig, LoraConfig, ModelConfig, RagConfig, RunConfig, TrainConfig
from edgetune.models import model_skeleton
from edgetune.server.federation import run_federation
from edgetune.server.metrics import read_metrics
from edgetune.simulations.simulate import run_apps

pytestmark = pytest.mark.e2e

NUM_DEVICES = 2
FACTS = [
    ("What colour is the zorblax?", "The zorblax is a vivid teal-violet colour."),
    ("Where does the quendril live?", "The quendril lives under the northern glaciers."),
    ("How old is the marnoth?", "The marnoth is exactly four hundred and twelve years old."),
    ("What does the velopt eat?", "The velopt eats frozen copper berries."),
    ("Who built the saltire engine?", "Engineer Odalys Frenk built the saltire engine."),
    ("When does the plimsy bloom?", "The plimsy blooms only during lunar eclipses."),
    ("How heavy is a drunwick?", "A drunwick weighs about nine hundred grams."),
    ("What sound does a harrowell make?", "A harrowell makes a low whistling hum."),
    ("Why is the tesk river red?", "The tesk river is red from iron-rich clay."),
    ("Which key opens the vault of Ambry?", "The brass key with three teeth opens the vault of Ambry."),
]


class RecordingGrid:
    """Flower's Grid, keeping every reply it hands to the server."""

    def __init__(self, grid: Grid, replies: list[Message]) -> None:
        self._grid, self.replies = grid, replies

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


def _recording_server(cfg: RunConfig, replies: list[Message]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(RecordingGrid(grid, replies), cfg)  # type: ignore[arg-type]

    return app


def _config(tmp_path: Path) -> RunConfig:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in FACTS))
    return RunConfig(
        seed=3,
        run_dir=str(tmp_path / "run"),
        model=ModelConfig(base="tiny"),
        lora=LoraConfig(rank=4),
        data=DataConfig(source=str(data), max_length=256),
        train=TrainConfig(local_steps=2, batch_size=2),
        federation=FederationConfig(rounds=2, num_devices=NUM_DEVICES),
        rag=RagConfig(enabled=True, top_k=2),
    )


def _run(cfg: RunConfig, replies: list[Message], monkeypatch: pytest.MonkeyPatch) -> None:
    run_apps(_recording_server(cfg, replies), client_app, NUM_DEVICES)


def _allowed_delta_keys(cfg: RunConfig) -> set[str]:
    names = adapter_shapes(model_skeleton(cfg.model.base), cfg.lora)
    parts = (wire.BITS, wire.SCALES, wire.VALUES)
    return {f"{name}{wire.PART_SEP}{part}" for name in names for part in parts}


def _reply_bytes(reply: Message) -> bytes:
    """Every byte of a reply's content: array buffers, metric values, config values, keys."""
    content, out = reply.content, bytearray()
    for name, record in content.array_records.items():
        out += name.encode()
        for key, array in record.items():
            out += key.encode() + bytes(array.data)
    for name, record in [*content.metric_records.items(), *content.config_records.items()]:
        out += name.encode() + repr(dict(record)).encode()
    return bytes(out)


def test_replies_hold_only_adapter_tensors_numeric_metrics_and_the_device_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(tmp_path)
    replies: list[Message] = []
    _run(cfg, replies, monkeypatch)
    assert json.loads((Path(cfg.run_dir) / wire.STATUS_FILE).read_text()) == {"status": "completed"}
    assert [m["round"] for m in read_metrics(Path(cfg.run_dir))] == [0, 1, 2]

    # RAG really was on: each device built its index in its own storage folder.
    chunks = []
    for i in range(NUM_DEVICES):
        index = RagIndex.open(Path(cfg.run_dir) / wire.DEVICES_DIR / f"sim-{i}")
        assert index.chunks, f"sim-{i} has no index"
        chunks += [c.text for c in index.chunks]

    allowed = _allowed_delta_keys(cfg)
    train_replies = [r for r in replies if r.metadata.message_type == "train"]
    assert len(replies) == NUM_DEVICES * 5 and len(train_replies) == NUM_DEVICES * 2  # 3 evaluations, 2 trainings
    for reply in replies:
        assert not reply.has_error(), reply.error
        content = reply.content
        expected = {wire.METRICS, wire.DEVICE} | ({wire.DELTA} if reply in train_replies else set())
        assert set(content.keys()) == expected
        assert set(content.array_records) <= {wire.DELTA} and set(content.config_records) == {wire.DEVICE}
        assert set(content.metric_records) == {wire.METRICS}
        for key, array in content.array_records.get(wire.DELTA, {}).items():
            assert key in allowed, key
            assert EMBED_DIM not in array.shape, (key, array.shape)
        assert all(isinstance(v, int | float) for v in content.metric_records[wire.METRICS].values())
        device = dict(content.config_records[wire.DEVICE])
        # the device id and the reply's signature (edgetune/signing.py), nothing else
        assert sorted(device) == sorted([wire.DEVICE_ID, wire.SIGNATURE]) and device[wire.DEVICE_ID] in {
            "sim-0",
            "sim-1",
        }
        raw = _reply_bytes(reply)
        for text in chunks + [q for q, _ in FACTS]:
            assert text.encode() not in raw
        assert b"zorblax" not in raw.lower() and b"context" not in raw.lower()
