"""Tests for server/validate.py: every reply is checked before it can touch the global adapter.

Replies are real Flower Messages built the way a device builds them (``Message(content,
reply_to=instruction)``), so ``msg.metadata.src_node_id`` is the node the instruction went
to. Each invalid kind must come back as a :class:`Rejection` whose reason names the problem;
``validate_*`` must never raise, whatever a device sends.

The last section drives ``run_federation`` over a scripted in-memory Grid to check what the
server does with replies that validation lets through.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from numpy.lib import format as npy_format

from edgetune import wire
from edgetune.adapters.codec import decode, encode, payload_bytes
from edgetune.adapters.lora import adapter_shapes, exchanged_names
from edgetune.config import CODECS, FederationConfig, LoraConfig, ModelConfig, RunConfig
from edgetune.models import model_skeleton
from edgetune.server.validate import (
    EvalReply,
    Rejection,
    TrainReply,
    Verifier,
    validate_eval,
    validate_identity,
    validate_train,
)
from edgetune.signing import content_digest, run_tag, sign, simulation_key

SERVER_NODE = 1
NODE = 5
ROUND = 3
MAX_EXAMPLES = 8
DEVICE_ID = "sim-0"
# Two LoRA B factors: (out, rank) with out > rank, so 1-bit scales run along the rank axis.
Q = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
V = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
SHAPES: dict[str, tuple[int, ...]] = {Q: (16, 4), V: (8, 4)}

Payload = dict[str, np.ndarray]
Mutation = Callable[[RecordDict], None]


def _delta() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}


def _instruction(kind: str = "train") -> Message:
    """The server's instruction as the device receives it (src: server, dst: NODE)."""
    meta = Metadata(
        run_id=1,
        message_id="instruction-1",
        src_node_id=SERVER_NODE,
        dst_node_id=NODE,
        reply_to_message_id="",
        group_id=str(ROUND),
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(RecordDict(), metadata=meta)


def _train_content(codec: str = "1bit") -> RecordDict:
    metrics = {
        wire.ROUND: ROUND,
        wire.HELD_VERSION: 2,
        wire.NUM_EXAMPLES: 6,
        wire.TRAIN_LOSS: 2.5,
        wire.NUM_TOKENS: 120,
        wire.SECONDS: 0.5,
    }
    return RecordDict(
        {
            wire.METRICS: MetricRecord(metrics),
            wire.DEVICE: ConfigRecord({wire.DEVICE_ID: DEVICE_ID}),
            wire.DELTA: ArrayRecord({k: Array(v) for k, v in encode(_delta(), codec).items()}),
        }
    )


def _eval_content() -> RecordDict:
    metrics = {wire.ROUND: ROUND, wire.HELD_VERSION: 3, wire.EVAL_LOSS: 1.75, wire.NUM_TOKENS: 64}
    return RecordDict({wire.METRICS: MetricRecord(metrics), wire.DEVICE: ConfigRecord({wire.DEVICE_ID: DEVICE_ID})})


def _reply(content: RecordDict, kind: str = "train") -> Message:
    return Message(content, reply_to=_instruction(kind))


def _train(msg: Message, codec: str = "1bit") -> TrainReply | Rejection:
    return validate_train(msg, ROUND, SHAPES, codec, MAX_EXAMPLES)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# ---- valid replies ----------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_valid_train_reply_is_accepted_and_decoded(codec: str) -> None:
    content = _train_content(codec)
    payload = {k: a.numpy() for k, a in content.array_records[wire.DELTA].items()}
    r = _train(_reply(content), codec)
    assert isinstance(r, TrainReply), r
    assert (r.node_id, r.device_id, r.num_examples) == (NODE, DEVICE_ID, 6)
    assert r.metrics[wire.TRAIN_LOSS] == 2.5 and r.metrics[wire.HELD_VERSION] == 2
    assert r.bytes == payload_bytes(payload)
    expected = decode(payload, SHAPES, codec)
    assert r.delta.keys() == SHAPES.keys()
    for k in SHAPES:
        assert torch.equal(r.delta[k], expected[k])
    if codec == "fp32":  # lossless: the device's delta itself
        assert all(torch.equal(r.delta[k], _delta()[k]) for k in SHAPES)


def test_valid_train_reply_bytes_are_what_the_codec_sent() -> None:
    # 1-bit: one bit per parameter plus one fp16 scale per rank column.
    r = _train(_reply(_train_content("1bit")))
    assert isinstance(r, TrainReply)
    assert r.bytes == (16 * 4 // 8 + 4 * 2) + (8 * 4 // 8 + 4 * 2)


@pytest.mark.parametrize("n", [1, MAX_EXAMPLES])
def test_num_examples_bounds_are_inclusive(n: int) -> None:
    content = _train_content()
    content[wire.METRICS] = MetricRecord({**content.metric_records[wire.METRICS], wire.NUM_EXAMPLES: n})
    r = _train(_reply(content))
    assert isinstance(r, TrainReply) and r.num_examples == n


def test_valid_eval_reply_is_accepted() -> None:
    r = validate_eval(_reply(_eval_content(), "evaluate"), ROUND)
    assert isinstance(r, EvalReply), r
    assert (r.node_id, r.device_id) == (NODE, DEVICE_ID)
    assert r.metrics[wire.EVAL_LOSS] == 1.75 and r.metrics[wire.NUM_TOKENS] == 64


# ---- invalid train replies --------------------------------------------------------------


def _set_metric(key: str, value: object) -> Mutation:
    def mutate(content: RecordDict) -> None:
        metrics = dict(content.metric_records[wire.METRICS])
        if value is None:
            del metrics[key]
        else:
            metrics[key] = value
        content[wire.METRICS] = MetricRecord(metrics)

    return mutate


def _drop(key: str) -> Mutation:
    def mutate(content: RecordDict) -> None:
        del content[key]

    return mutate


def _edit_payload(edit: Callable[[Payload], None]) -> Mutation:
    """Decode the delta record to arrays, edit them, and put them back as Arrays."""

    def mutate(content: RecordDict) -> None:
        payload = {k: a.numpy() for k, a in content.array_records[wire.DELTA].items()}
        edit(payload)
        content[wire.DELTA] = ArrayRecord({k: Array(v) for k, v in payload.items()})

    return mutate


def _replace_array(key: str, array: Array) -> Mutation:
    def mutate(content: RecordDict) -> None:
        arrays = dict(content.array_records[wire.DELTA].items())
        arrays[key] = array
        content[wire.DELTA] = ArrayRecord(arrays)

    return mutate


def _set(key: str, value: np.ndarray) -> Callable[[Payload], None]:
    def edit(payload: Payload) -> None:
        payload[key] = value

    return edit


def _del(key: str) -> Callable[[Payload], None]:
    def edit(payload: Payload) -> None:
        del payload[key]

    return edit


def _nan_scale(payload: Payload) -> None:
    scales = payload[f"{Q}:scales"].copy()
    scales[1] = np.nan
    payload[f"{Q}:scales"] = scales


def _inf_scale(payload: Payload) -> None:
    scales = payload[f"{V}:scales"].copy()
    scales[0] = np.inf
    payload[f"{V}:scales"] = scales


def _raw_array(data: bytes) -> Array:
    return Array(dtype="float16", shape=(4,), stype="numpy.ndarray", data=data)


def _pickled_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([1, "a"], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, scales=np.ones(4, np.float16))
    return buf.getvalue()


Q_SCALES, Q_BITS = f"{Q}:scales", f"{Q}:bits"
GARBAGE = Array(dtype="float16", shape=(4,), stype="numpy.ndarray", data=b"garbage")

INVALID_TRAIN: dict[str, tuple[Mutation, str]] = {
    "no metrics record": (_drop(wire.METRICS), "lacks its metrics or device record"),
    "no device record": (_drop(wire.DEVICE), "lacks its metrics or device record"),
    "no round metric": (_set_metric(wire.ROUND, None), "metrics lack ['round']"),
    "no held-version metric": (_set_metric(wire.HELD_VERSION, None), "metrics lack ['held-version']"),
    "no num-examples metric": (_set_metric(wire.NUM_EXAMPLES, None), "metrics lack ['num-examples']"),
    "no train-loss metric": (_set_metric(wire.TRAIN_LOSS, None), "metrics lack ['train-loss']"),
    "earlier round": (_set_metric(wire.ROUND, ROUND - 1), f"reply is for round {ROUND - 1}, not {ROUND}"),
    "later round": (_set_metric(wire.ROUND, ROUND + 1), f"reply is for round {ROUND + 1}, not {ROUND}"),
    "round as a list": (_set_metric(wire.ROUND, [ROUND]), "reply is for round [3]"),
    "num-examples 0": (_set_metric(wire.NUM_EXAMPLES, 0), f"num-examples=0 outside [1, {MAX_EXAMPLES}]"),
    "num-examples negative": (_set_metric(wire.NUM_EXAMPLES, -4), "num-examples=-4 outside"),
    "num-examples above max": (
        _set_metric(wire.NUM_EXAMPLES, MAX_EXAMPLES + 1),
        f"num-examples={MAX_EXAMPLES + 1} outside",
    ),
    "num-examples huge": (_set_metric(wire.NUM_EXAMPLES, 10**12), "num-examples=1000000000000 outside"),
    "num-examples float": (_set_metric(wire.NUM_EXAMPLES, 4.0), "num-examples=4.0 outside"),
    "num-examples NaN": (_set_metric(wire.NUM_EXAMPLES, math.nan), "metric num-examples=nan is not a finite"),
    "train-loss NaN": (_set_metric(wire.TRAIN_LOSS, math.nan), "metric train-loss=nan is not a finite number"),
    "train-loss inf": (_set_metric(wire.TRAIN_LOSS, math.inf), "metric train-loss=inf is not a finite number"),
    "train-loss list": (_set_metric(wire.TRAIN_LOSS, [1.0, 2.0]), "metric train-loss=[1.0, 2.0] is not a finite"),
    "no delta": (_drop(wire.DELTA), "reply carries no delta"),
    "missing key": (_edit_payload(_del(Q_BITS)), f"missing ['{Q_BITS}']"),
    "extra key": (_edit_payload(_set("extra:bits", np.zeros(1, np.uint8))), "unexpected ['extra:bits']"),
    "fp32 key in a 1-bit payload": (
        _edit_payload(_set(f"{V}:values", np.zeros((8, 4), np.float32))),
        f"unexpected ['{V}:values']",
    ),
    "scales wrong dtype": (
        _edit_payload(_set(Q_SCALES, np.ones(4, np.float32))),
        f"'{Q_SCALES}': expected dtype float16, got float32",
    ),
    "bits wrong dtype": (
        _edit_payload(_set(Q_BITS, np.zeros(8, np.int8))),
        f"'{Q_BITS}': expected dtype uint8, got int8",
    ),
    "scales wrong shape": (
        _edit_payload(_set(Q_SCALES, np.ones(16, np.float16))),
        f"'{Q_SCALES}': expected shape (4,), got (16,)",
    ),
    "bits too few": (_edit_payload(_set(Q_BITS, np.zeros(7, np.uint8))), f"'{Q_BITS}': expected shape (8,), got (7,)"),
    "bits 2-D": (
        _edit_payload(_set(Q_BITS, np.zeros((2, 4), np.uint8))),
        f"'{Q_BITS}': expected shape (8,), got (2, 4)",
    ),
    "NaN in scales": (_edit_payload(_nan_scale), f"'{Q_SCALES}': holds NaN or inf"),
    "inf in scales": (_edit_payload(_inf_scale), f"'{V}:scales': holds NaN or inf"),
    "negative scale": (_edit_payload(_set(Q_SCALES, -np.ones(4, np.float16))), "negative scale"),
    "garbage array bytes": (_replace_array(Q_SCALES, GARBAGE), "pickled"),
    "truncated array bytes": (
        _replace_array(Q_SCALES, _raw_array(_npy(np.ones(4, np.float16))[:-3])),
        "EOF",
    ),
    "unknown npy version": (
        _replace_array(Q_SCALES, _raw_array(b"\x93NUMPYxx" + b"\0" * 8)),
        "format version",
    ),
    "pickled object array": (_replace_array(Q_SCALES, _raw_array(_pickled_npy())), "Object arrays cannot be loaded"),
    "npz archive": (_replace_array(Q_SCALES, _raw_array(_npz())), f"'{Q_SCALES}': expected dtype float16"),
    "torch-serialised array": (
        _replace_array(Q_SCALES, Array(dtype="float16", shape=(4,), stype="torch.Tensor", data=b"\0" * 8)),
        "Unsupported serialization type",
    ),
}


@pytest.mark.parametrize("mutate,reason", INVALID_TRAIN.values(), ids=INVALID_TRAIN.keys())
def test_invalid_train_reply_is_rejected_with_its_reason(mutate: Mutation, reason: str) -> None:
    content = _train_content()
    mutate(content)
    r = _train(_reply(content))
    assert isinstance(r, Rejection), r
    assert r.node_id == NODE
    assert reason in r.reason
    assert r.reason  # never an empty reason


def test_error_reply_is_rejected_naming_the_device_error() -> None:
    # What Flower's simulation engine sends when a ClientApp raises (ErrorCode 2).
    err = Message(Error(code=2, reason="ClientAppException: out of memory"), reply_to=_instruction())
    r = _train(err)
    assert isinstance(r, Rejection)
    assert r.node_id == NODE
    assert r.reason == "device error: ClientAppException: out of memory"
    e = validate_eval(Message(Error(code=0, reason="boom"), reply_to=_instruction("evaluate")), ROUND)
    assert isinstance(e, Rejection) and e.reason == "device error: boom"


def test_fp16_payload_is_rejected_when_the_run_expects_1bit() -> None:
    r = _train(_reply(_train_content("fp16")), "1bit")
    assert isinstance(r, Rejection) and "payload keys differ" in r.reason


def test_1bit_payload_with_fp32_values_of_the_wrong_shape_is_rejected() -> None:
    content = _train_content("fp32")
    _edit_payload(_set(f"{V}:values", np.zeros((4, 8), np.float32)))(content)
    r = _train(_reply(content), "fp32")
    assert isinstance(r, Rejection)
    assert f"'{V}:values': expected shape (8, 4), got (4, 8)" in r.reason


def test_delta_for_other_tensors_is_rejected() -> None:
    # A device attached to another model (or another rank) sends other shapes.
    r = validate_train(_reply(_train_content()), ROUND, {Q: (16, 8), V: (8, 8)}, "1bit", MAX_EXAMPLES)
    assert isinstance(r, Rejection) and "expected shape" in r.reason


def _huge_claim() -> Array:
    """A 100-byte array whose npy header claims 2 PiB: must not be allocated or crash."""
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(buf, {"descr": "<f2", "fortran_order": False, "shape": (2**50,)})
    buf.write(b"\0" * 8)
    return Array(dtype="float16", shape=(4,), stype="numpy.ndarray", data=buf.getvalue())


BYTES_THAT_CRASH = {
    "empty array bytes": Array(dtype="float16", shape=(4,), stype="numpy.ndarray", data=b""),
    "header claims 2 PiB": _huge_claim(),
}


@pytest.mark.parametrize("array", BYTES_THAT_CRASH.values(), ids=BYTES_THAT_CRASH.keys())
def test_undecodable_array_bytes_never_raise(array: Array) -> None:
    content = _train_content()
    _replace_array(Q_SCALES, array)(content)
    r = _train(_reply(content))
    assert isinstance(r, Rejection)


@pytest.mark.parametrize("value", [math.nan, math.inf, -1], ids=["nan", "inf", "negative"])
def test_held_version_must_be_a_valid_version(value: float) -> None:
    content = _train_content()
    _set_metric(wire.HELD_VERSION, value)(content)
    assert isinstance(_train(_reply(content)), Rejection)


# ---- invalid evaluate replies -----------------------------------------------------------


def _eval_with(key: str, value: object) -> Message:
    content = _eval_content()
    _set_metric(key, value)(content)
    return _reply(content, "evaluate")


INVALID_EVAL: dict[str, tuple[Callable[[], Message], str]] = {
    "earlier round": (lambda: _eval_with(wire.ROUND, ROUND - 1), f"reply is for round {ROUND - 1}, not {ROUND}"),
    "later round": (lambda: _eval_with(wire.ROUND, ROUND + 1), f"reply is for round {ROUND + 1}, not {ROUND}"),
    "eval-loss NaN": (lambda: _eval_with(wire.EVAL_LOSS, math.nan), "metric eval-loss=nan is not a finite number"),
    "eval-loss inf": (lambda: _eval_with(wire.EVAL_LOSS, -math.inf), "metric eval-loss=-inf is not a finite number"),
    "num-tokens NaN": (lambda: _eval_with(wire.NUM_TOKENS, math.nan), "metric num-tokens=nan is not a finite"),
    "no eval-loss": (lambda: _eval_with(wire.EVAL_LOSS, None), "metrics lack ['eval-loss']"),
    "no num-tokens": (lambda: _eval_with(wire.NUM_TOKENS, None), "metrics lack ['num-tokens']"),
    "no held-version": (lambda: _eval_with(wire.HELD_VERSION, None), "metrics lack ['held-version']"),
    "no metrics record": (
        lambda: _reply(RecordDict({wire.DEVICE: ConfigRecord({wire.DEVICE_ID: DEVICE_ID})}), "evaluate"),
        "lacks its metrics or device record",
    ),
    "no device record": (
        lambda: _reply(RecordDict({wire.METRICS: _eval_content().metric_records[wire.METRICS]}), "evaluate"),
        "lacks its metrics or device record",
    ),
    "metrics sent as a config record": (
        lambda: _reply(
            RecordDict(
                {
                    wire.METRICS: ConfigRecord({wire.ROUND: ROUND}),
                    wire.DEVICE: ConfigRecord({wire.DEVICE_ID: DEVICE_ID}),
                }
            ),
            "evaluate",
        ),
        "lacks its metrics or device record",
    ),
}


@pytest.mark.parametrize("build,reason", INVALID_EVAL.values(), ids=INVALID_EVAL.keys())
def test_invalid_eval_reply_is_rejected_with_its_reason(build: Callable[[], Message], reason: str) -> None:
    r = validate_eval(build(), ROUND)
    assert isinstance(r, Rejection), r
    assert r.node_id == NODE
    assert reason in r.reason


def test_train_reply_passes_eval_validation_only_with_eval_metrics() -> None:
    # A train reply lacks eval-loss: sent to the evaluate path by mistake, it is dropped.
    r = validate_eval(_reply(_train_content(), "evaluate"), ROUND)
    assert isinstance(r, Rejection) and "eval-loss" in r.reason


def _identify_reply(round_: int, device: str = DEVICE_ID, signer: str = DEVICE_ID) -> Message:
    """An identify reply naming ``device``, signed with ``signer``'s simulated key (run seed 0)."""
    content = RecordDict(
        {wire.METRICS: MetricRecord({wire.ROUND: round_}), wire.DEVICE: ConfigRecord({wire.DEVICE_ID: device})}
    )
    content[wire.DEVICE][wire.SIGNATURE] = sign(
        simulation_key(0, signer), content_digest(wire.IDENTIFY, run_tag("{}"), device, content)
    )
    return _reply(content, wire.IDENTIFY)


def test_identify_reply_names_its_device_only_when_signed_for_this_round() -> None:
    verifier = Verifier(run_tag("{}"), lambda node, device: simulation_key(0, device).public_key())
    assert validate_identity(_identify_reply(ROUND), ROUND, verifier) == DEVICE_ID
    for msg, reason in [
        (_identify_reply(ROUND - 1), f"reply is for round {ROUND - 1}, not {ROUND}"),
        (_identify_reply(ROUND, "sim-1"), "not signed with the key of device 'sim-1'"),
        (_identify_reply(ROUND, "a\nb", "a\nb"), "is not 1-128 printable characters"),
        (_reply(RecordDict(), wire.IDENTIFY), "lacks its metrics or device record"),
    ]:
        r = validate_identity(msg, ROUND, verifier)
        assert isinstance(r, Rejection) and r.node_id == NODE and reason in r.reason


# ---- what the server does with replies validation lets through ---------------------------


class ScriptedGrid:
    """An in-memory Grid: three nodes that answer every instruction at once.

    Train replies carry a small valid 1-bit delta; evaluate replies a fixed loss. ``bad``
    overrides metrics of node ``BAD_NODE``'s ``bad_kind`` replies.
    """

    BAD_NODE = 12

    def __init__(
        self, shapes: dict[str, tuple[int, ...]], bad_kind: str, bad: dict[str, float], bad_nodes: tuple[int, ...] = ()
    ) -> None:
        self.shapes, self.bad_kind, self.bad = shapes, bad_kind, bad
        self.bad_nodes = bad_nodes or (self.BAD_NODE,)
        self.nodes = [11, 12, 13]
        self.outbox: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def _answer(self, msg: Message) -> Message:
        node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
        config = msg.content.config_records[wire.CONFIG]
        metrics: dict[str, float | int] = {wire.ROUND: int(config[wire.ROUND])}  # all an identify reply says
        content = RecordDict({wire.DEVICE: ConfigRecord({wire.DEVICE_ID: f"dev-{node}"})})
        if kind != wire.IDENTIFY:
            metrics[wire.HELD_VERSION] = int(config[wire.VERSION])
        if kind == "train":
            delta = {k: torch.full(s, 0.01 * (node - 10)) for k, s in self.shapes.items()}
            content[wire.DELTA] = ArrayRecord({k: Array(v) for k, v in encode(delta, "1bit").items()})
            metrics.update({wire.NUM_EXAMPLES: 2, wire.TRAIN_LOSS: 3.0, wire.NUM_TOKENS: 50, wire.SECONDS: 0.1})
        elif kind == "evaluate":
            metrics.update({wire.EVAL_LOSS: 3.0, wire.NUM_TOKENS: 40})
        if node in self.bad_nodes and kind == self.bad_kind:
            metrics.update(self.bad)
        content[wire.METRICS] = MetricRecord(metrics)
        # Signed as a simulated device signs (run seed 0, as _scripted_config sets).
        run = run_tag(str(config[wire.RUN_CONFIG_JSON]))
        digest = content_digest(kind, run, f"dev-{node}", content)
        content[wire.DEVICE][wire.SIGNATURE] = sign(simulation_key(0, f"dev-{node}"), digest)
        return Message(content, reply_to=msg)

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        return [self._answer(m) for m in messages]

    def push_messages(self, messages: list[Message]) -> list[str]:
        """The simulation engine's path (``server/rounds.py``): push, then pull the replies."""
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.outbox) + i}"
            ids.append(msg.metadata.message_id)
        for msg in messages:
            self.outbox[msg.metadata.message_id] = self._answer(msg)
        return ids

    def pull_messages(self, message_ids: set[str]) -> list[Message]:
        return [self.outbox.pop(i) for i in sorted(message_ids) if i in self.outbox]


@pytest.mark.parametrize(
    "kind,bad",
    [
        pytest.param("train", {}, id="all replies good"),
        pytest.param("train", {wire.TRAIN_LOSS: math.nan}, id="train-loss NaN"),
        pytest.param("evaluate", {wire.EVAL_LOSS: math.nan}, id="eval-loss NaN"),
        pytest.param("evaluate", {wire.HELD_VERSION: math.nan}, id="eval held-version NaN"),
        pytest.param("evaluate", {wire.HELD_VERSION: -1}, id="eval held-version -1"),
        pytest.param("train", {wire.NUM_TOKENS: math.nan}, id="train num-tokens NaN"),
    ],
)
def test_one_device_with_bad_metrics_never_ends_the_run(
    kind: str, bad: dict[str, float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from edgetune.server.federation import run_federation
    from edgetune.server.metrics import read_metrics

    # Instruction messages read the run's identity, which Flower sets inside a real run.
    for attr, value in {"_run_id": 1, "_task_id": 1, "_node_id": SERVER_NODE}.items():
        monkeypatch.setattr(TaskIdentity, attr, value)
    run_dir = tmp_path / "run"
    cfg = RunConfig(
        seed=0,
        run_dir=str(run_dir),
        model=ModelConfig(base="tiny"),
        lora=LoraConfig(rank=2),
        federation=FederationConfig(rounds=2, num_devices=3, reply_timeout=5.0),
    )
    all_shapes = adapter_shapes(model_skeleton("tiny"), cfg.lora)
    shapes = {k: all_shapes[k] for k in exchanged_names(all_shapes, cfg.lora)}
    run_federation(ScriptedGrid(shapes, kind, bad), cfg)  # type: ignore[arg-type]
    assert json.loads((run_dir / wire.STATUS_FILE).read_text()) == {"status": "completed"}
    rows = read_metrics(run_dir)
    assert [m["round"] for m in rows] == [0, 1, 2]
    bad_train = kind == "train" and bool(bad)
    assert [m["replies"] for m in rows[1:]] == [2 if bad_train else 3] * 2
    assert all(m["version"] == m["round"] for m in rows)


def _scripted_config(run_dir: Path, **federation: object) -> RunConfig:
    fed = {"rounds": 2, "num_devices": 3, "reply_timeout": 5.0, **federation}
    return RunConfig(
        seed=0,
        run_dir=str(run_dir),
        model=ModelConfig(base="tiny"),
        lora=LoraConfig(rank=2),
        federation=FederationConfig(**fed),  # type: ignore[arg-type]
    )


def _scripted_shapes(cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    all_shapes = adapter_shapes(model_skeleton("tiny"), cfg.lora)
    return {k: all_shapes[k] for k in exchanged_names(all_shapes, cfg.lora)}


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in {"_run_id": 1, "_task_id": 1, "_node_id": SERVER_NODE}.items():
        monkeypatch.setattr(TaskIdentity, attr, value)


def test_simulated_dropouts_come_from_the_seed_and_are_reported(tmp_path: Path, server_identity: None) -> None:
    from edgetune.adapters.peft_io import load_adapter
    from edgetune.server.federation import run_federation
    from edgetune.server.metrics import read_metrics, summary_table
    from edgetune.server.rounds import dropouts

    finals = []
    for name in ("a", "b"):
        cfg = _scripted_config(tmp_path / name, rounds=4, dropout=0.4)
        run_federation(ScriptedGrid(_scripted_shapes(cfg), "train", {}), cfg, simulated=True)  # type: ignore[arg-type]
        rows = read_metrics(tmp_path / name)
        devices = ["dev-11", "dev-12", "dev-13"]
        expected = [sorted(dropouts(devices, 0.4, 0, r)) for r in range(1, 5)]
        assert [m["dropped_out"] for m in rows[1:]] == expected
        assert [m["replies"] for m in rows[1:]] == [3 - len(d) for d in expected]
        assert all(m["sampled"] == 3 for m in rows[1:])
        assert any(expected), "seed 0 should drop someone in 4 rounds at p=0.4; pick another seed"
        table = summary_table(rows)
        short = next(r for r, d in enumerate(expected, start=1) if d)
        assert f"! round {short}: {3 - len(expected[short - 1])} of 3 sampled devices replied validly" in table
        finals.append(load_adapter(tmp_path / name / wire.ADAPTER_DIR))
    for key, value in finals[0].items():
        assert torch.equal(value, finals[1][key])


def test_dropouts_are_independent_per_device_and_repeatable() -> None:
    from edgetune.server.rounds import dropouts

    devices = [f"sim-{i}" for i in range(2000)]
    dropped = dropouts(devices, 0.1, seed=3, round_=2)
    assert dropped == dropouts(reversed(devices), 0.1, seed=3, round_=2)  # order does not matter
    assert dropped != dropouts(devices, 0.1, seed=3, round_=3)
    assert 140 <= len(dropped) <= 260  # Binomial(2000, 0.1): mean 200, sd 13.4; +-4.5 sd
    assert dropouts(devices, 0.0, seed=3, round_=2) == set()
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        dropouts(devices, 1.0, seed=3, round_=2)


def test_a_run_in_which_no_device_trains_ends_failed(tmp_path: Path, server_identity: None) -> None:
    from edgetune.server.federation import FederationError, run_federation

    cfg = _scripted_config(tmp_path / "run")
    grid = ScriptedGrid(_scripted_shapes(cfg), "train", {wire.NUM_EXAMPLES: 0}, bad_nodes=(11, 12, 13))
    with pytest.raises(FederationError, match="no device trained in rounds 1..2"):
        run_federation(grid, cfg, simulated=True)  # type: ignore[arg-type]
    status = json.loads((tmp_path / "run" / wire.STATUS_FILE).read_text())
    assert status["status"] == "failed" and "0 of 3 sampled devices replied validly (3 rejected)" in status["error"]


@pytest.mark.parametrize(
    ("aggregator", "multiple", "rejected", "clipped"),
    [
        ("norm-bound", 1.0, [], ["dev-13"]),
        ("centered-clip", 0.5, [], ["dev-11", "dev-13"]),
        ("multi-krum", 1.0, [], []),
    ],
)
def test_robust_aggregators_log_and_count_whom_they_rejected_or_clipped(
    aggregator: str, multiple: float, rejected: list[str], clipped: list[str], tmp_path: Path, server_identity: None
) -> None:
    from edgetune.server.federation import run_federation
    from edgetune.server.metrics import read_metrics

    # Nodes 11, 12, 13 send 1-bit deltas of norms proportional to 1, 2, 3: with c = 1 the
    # median norm (node 12's) clips node 13; centered clipping with tau = half the median
    # distance from the median (node 12) clips both extremes; multi-Krum needs n > 2k + 2,
    # so with 3 replies it keeps them all.
    cfg = _scripted_config(tmp_path / "run", aggregator=aggregator, clip_multiple=multiple, byzantine_fraction=0.4)
    run_federation(ScriptedGrid(_scripted_shapes(cfg), "train", {}), cfg, simulated=True)  # type: ignore[arg-type]
    rows = read_metrics(tmp_path / "run")
    assert [(m["robust_rejected"], m["robust_clipped"]) for m in rows[1:]] == [(rejected, clipped)] * 2
    assert all(m["replies"] == 3 for m in rows[1:])
