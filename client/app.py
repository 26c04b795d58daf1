"""The Flower ClientApp: unpack the server's message, call ``client.device``, reply.

Everything a device needs arrives in the message (the run config travels as JSON in the
``config`` record); what differs per device comes from the SuperNode's node config:
``partition-id``/``num-partitions`` in simulation, ``data-path``/``storage-dir``/``device-id``
on a real device.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import PeftModel
from torch import Tensor

from edgetune import wire
from edgetune.adapters.codec import Payload
from edgetune.adapters.lora import device_model
from edgetune.client import secagg
from edgetune.client.device import Downlink, eval_round, sync_global, train_delta, train_round
from edgetune.client.ort_engine import ORT, select_engine
from edgetune.client.retrieval import rag_tokenized_device
from edgetune.client.storage import DeviceStorage
from edgetune.client.supernode import run_state_dir
from edgetune.config import RunConfig, from_flat
from edgetune.datasets.devices import TokenizedDevice, canary_file_for, tokenized_device
from edgetune.lm import pad_id
from edgetune.precision import resolve_run
from edgetune.signing import PrivateKey, content_digest, load_signing_key, run_tag, sign, simulation_key

__all__ = ["app"]

app = ClientApp()


@dataclass(frozen=True)
class _Round:
    """A device's view of one server message, synced to the server's version."""

    cfg: RunConfig
    storage: DeviceStorage
    model: PeftModel
    pad_id: int
    data: TokenizedDevice
    global_state: dict[str, Tensor]
    round: int
    version: int
    device_id: str
    run: str
    """The run tag replies are signed for (``edgetune.signing.run_tag``)."""
    key: PrivateKey | None
    """The key replies are signed with: the registered key on a real device, the derived
    one in simulation; None on a real device without one (the server then cannot check)."""


def _payload(record: ArrayRecord) -> Payload:
    return {k: v.numpy() for k, v in record.items()}


def _downlink(content: RecordDict, version: int) -> Downlink:
    records = content.array_records
    full = _payload(records[wire.FULL]) if wire.FULL in records else None
    updates = {
        int(k.removeprefix(wire.UPDATE_PREFIX)): _payload(r)
        for k, r in records.items()
        if k.startswith(wire.UPDATE_PREFIX)
    }
    return Downlink(version, full, updates)


def _open_round(msg: Message, context: Context) -> _Round:
    config = msg.content.config_records[wire.CONFIG]
    cfg = from_flat(json.loads(str(config[wire.RUN_CONFIG_JSON])))
    node = context.node_config
    device_id = _device_id(context)
    storage_dir = node.get(wire.STORAGE_DIR)
    device_dir = Path(str(storage_dir)) if storage_dir else Path(str(config[wire.DEVICE_ROOT])) / device_id
    # A real device serves run after run: each run's adapter state in a folder of its own.
    storage = DeviceStorage(run_state_dir(device_dir, cfg) if storage_dir else device_dir)
    precision = resolve_run(cfg).train.precision  # train.precision=auto: bf16 or fp32, for this device's CPU
    if select_engine(cfg, node) == ORT:  # ONNX Runtime exports the model's weights: they stay fp32
        precision = "fp32"
    model, tokenizer = device_model(cfg.model.base, cfg.lora, cfg.model.quantize, precision)
    data_path, index = str(node.get(wire.DATA_PATH, "")), int(node.get(wire.PARTITION_ID, 0))
    canaries = canary_file_for(cfg, str(config[wire.DEVICE_ROOT]))  # audit runs plant canaries
    if cfg.rag.enabled:  # each question with context from the device's own index
        data = rag_tokenized_device(cfg, data_path, index, device_dir, tokenizer, canaries)
    else:
        data = tokenized_device(cfg.data, data_path, index, cfg.federation.num_devices, cfg.seed, tokenizer, canaries)
    version = int(config[wire.VERSION])
    state = sync_global(storage, model, cfg, _downlink(msg.content, version))
    cfg = resolve_run(cfg)
    run, key = run_tag(str(config[wire.RUN_CONFIG_JSON])), _signing_key(node, cfg, device_id)
    round_ = int(config[wire.ROUND])
    return _Round(cfg, storage, model, pad_id(tokenizer), data, state, round_, version, device_id, run, key)


def _device_id(context: Context) -> str:
    """The device's id: its node config's ``device-id``, or ``sim-<partition>`` in simulation."""
    node = context.node_config
    return str(node.get(wire.DEVICE_ID) or f"sim-{node.get(wire.PARTITION_ID, context.node_id)}")


def _signing_key(node: dict, cfg: RunConfig, device_id: str) -> PrivateKey | None:
    if node.get(wire.SIGNING_KEY):
        return load_signing_key(str(node[wire.SIGNING_KEY]))
    if wire.PARTITION_ID in node:  # simulation
        return simulation_key(cfg.seed, device_id)
    return None


def _clock() -> tuple[float, float]:
    """(wall, CPU) seconds now; CPU is this process's time (all its threads)."""
    return time.perf_counter(), time.process_time()


def _phases(start: tuple[float, float], synced: tuple[float, float]) -> dict[str, float]:
    """Wall and CPU seconds of the sync phase (message to synced adapter: data, model,
    downlink) and of the work after it (training and encoding, or the held-out loop)."""
    end = _clock()
    return {
        wire.SYNC_SECONDS: synced[0] - start[0],
        wire.SYNC_CPU_SECONDS: synced[1] - start[1],
        wire.SECONDS: end[0] - synced[0],
        wire.CPU_SECONDS: end[1] - synced[1],
    }


def _reply(
    msg: Message,
    r: _Round,
    metrics: dict[str, float | int],
    delta: Payload | None = None,
    extra: dict[str, ArrayRecord] | None = None,
) -> Message:
    content = RecordDict({wire.METRICS: MetricRecord({wire.ROUND: r.round, wire.HELD_VERSION: r.version, **metrics})})
    if delta is not None:
        content[wire.DELTA] = ArrayRecord({k: Array(v) for k, v in delta.items()})
    for name, record in (extra or {}).items():
        content[name] = record
    return _signed(msg, content, r.device_id, r.run, r.key)


def _signed(msg: Message, content: RecordDict, device_id: str, run: str, key: PrivateKey | None) -> Message:
    """The reply to ``msg``: ``content`` with the device record, signed over all of it."""
    content[wire.DEVICE] = ConfigRecord({wire.DEVICE_ID: device_id})
    if key is not None:  # signed over everything, exact payload bytes included
        digest = content_digest(msg.metadata.message_type, run, device_id, content)
        content[wire.DEVICE][wire.SIGNATURE] = sign(key, digest)
    return Message(content, reply_to=msg)


@app.query("identify")
def identify(msg: Message, context: Context) -> Message:
    """Name this device, signed (no model or data loaded): the server samples by device id."""
    config = msg.content.config_records[wire.CONFIG]
    run_json = str(config[wire.RUN_CONFIG_JSON])
    cfg, device_id = from_flat(json.loads(run_json)), _device_id(context)
    content = RecordDict({wire.METRICS: MetricRecord({wire.ROUND: int(config[wire.ROUND])})})
    return _signed(msg, content, device_id, run_tag(run_json), _signing_key(context.node_config, cfg, device_id))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Sync, train K local steps, reply with the encoded delta."""
    start = _clock()
    r = _open_round(msg, context)
    synced = _clock()
    engine = select_engine(r.cfg, context.node_config)  # pytorch, or onnxruntime for this device
    payload, stats, n = train_round(r.model, r.pad_id, r.data, r.storage, r.global_state, r.cfg, r.round, engine)
    metrics = {
        wire.NUM_EXAMPLES: n,
        wire.TRAIN_LOSS: stats.loss,
        wire.NUM_TOKENS: stats.seen_tokens,
        **_phases(start, synced),
    }
    return _reply(msg, r, metrics, payload)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Sync, report held-out loss of the global adapter."""
    start = _clock()
    r = _open_round(msg, context)
    synced = _clock()
    stats = eval_round(r.model, r.pad_id, r.data, r.global_state, r.cfg)
    metrics = {
        wire.EVAL_LOSS: stats.loss,
        wire.NUM_TOKENS: stats.tokens,
        wire.NUM_EXAMPLES: len(r.data.heldout),
        **_phases(start, synced),
    }
    return _reply(msg, r, metrics)


@app.train("secagg_keys")
def secagg_keys(msg: Message, context: Context) -> Message:
    """Secure aggregation, stage 1: sync, train, keep the integer input; reply with public keys."""
    start = _clock()
    r = _open_round(msg, context)
    synced = _clock()
    engine = select_engine(r.cfg, context.node_config)
    delta, stats, n = train_delta(r.model, r.pad_id, r.data, r.storage, r.global_state, r.cfg, r.round, engine)
    record, public = secagg.start(context, msg, r.cfg, r.storage, delta, r.round, (r.key, r.run))
    metrics = {
        wire.NUM_EXAMPLES: n,
        wire.TRAIN_LOSS: stats.loss,
        wire.NUM_TOKENS: stats.seen_tokens,
        **_phases(start, synced),
    }
    reply = _reply(msg, r, metrics, extra={wire.SECAGG_PUBLIC: public})  # the keys are signed with the rest
    reply.content[wire.SECAGG] = record
    return reply


@app.train("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    """Secure aggregation, stage 2: encrypted shares for the neighbours."""
    return Message(RecordDict({wire.SECAGG: secagg.share(msg, context)}), reply_to=msg)


@app.train("secagg_mask")
def secagg_mask(msg: Message, context: Context) -> Message:
    """Secure aggregation, stage 3: the masked input."""
    record, masked = secagg.mask(msg, context)
    return Message(RecordDict({wire.SECAGG: record, wire.SECAGG_MASKED: masked}), reply_to=msg)


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    """Secure aggregation, stage 4: the shares that remove the masks."""
    return Message(RecordDict({wire.SECAGG: secagg.unmask(msg, context)}), reply_to=msg)
