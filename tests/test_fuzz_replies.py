"""Fuzzing reply validation: 10,000 randomly mutated train and evaluate replies, none raises.

Replies are signed as a simulated device signs them, and some carry bad signatures: none,
random bytes, another device's key, or a valid signature over content changed afterwards.

Each case starts from a valid reply (built the way a device builds it) and applies one to three
mutations drawn from a fixed-seed generator: metric values of every wrong type and magnitude
(10**400, 2**53 + 1, NaN, Inf, bools, lists, negatives), missing metrics and records, device
ids that are not one printable string, arrays with wrong dtypes and shapes, truncated or random
bytes, headers claiming huge dimensions, extra and missing keys, non-finite values, 1-bit
scales at fp16's maximum, and error replies. Validation must return a reply or a
:class:`Rejection` for every one. The seed is fixed, so every run checks the same cases.
"""

from __future__ import annotations

import io
import math
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from edgetune import wire
from edgetune.adapters.codec import encode
from edgetune.server.validate import EvalReply, Rejection, TrainReply, Verifier, validate_eval, validate_train
from edgetune.signing import content_digest, run_tag, sign, simulation_key

CASES = 10_000
ROUND, VERSION, MAX_EXAMPLES, MAX_RMS, SEED = 3, 2, 8, 0.5, 0
RUN = run_tag("fuzz")
VERIFIER = Verifier(RUN, lambda node, device: simulation_key(SEED, device).public_key())
KEYS = {d: simulation_key(SEED, d) for d in ("sim-0", "sim-1")}
Q = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
V = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
SHAPES: dict[str, tuple[int, ...]] = {Q: (16, 4), V: (8, 4)}
CODECS = ("1bit", "fp16", "fp32")
METRIC_KEYS = (wire.ROUND, wire.HELD_VERSION, wire.NUM_EXAMPLES, wire.TRAIN_LOSS, wire.EVAL_LOSS, wire.NUM_TOKENS)
BAD_NUMBERS: tuple[object, ...] = (
    10**400,
    -(10**400),
    2**53 + 1,
    2**63,
    math.nan,
    math.inf,
    -math.inf,
    True,
    False,
    -1,
    -1e-300,
    0,
    1e308,
    [1, 2],
    [1.0, math.nan],
    [],
    3.0,
    ROUND + 1,
)


def _instruction(kind: str) -> Message:
    meta = Metadata(
        run_id=1,
        message_id="instruction-1",
        src_node_id=1,
        dst_node_id=5,
        reply_to_message_id="",
        group_id=str(ROUND),
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(RecordDict(), metadata=meta)


INSTRUCTIONS = {kind: _instruction(kind) for kind in ("train", "evaluate")}


def _valid_parts(kind: str, codec: str, rng: np.random.Generator) -> tuple[dict, dict, dict]:
    metrics: dict[str, object] = {wire.ROUND: ROUND, wire.HELD_VERSION: VERSION, wire.NUM_TOKENS: 64}
    device: dict[str, object] = {wire.DEVICE_ID: "sim-0"}
    arrays: dict[str, np.ndarray] = {}
    if kind == "train":
        metrics.update({wire.NUM_EXAMPLES: 6, wire.TRAIN_LOSS: 2.5, wire.SECONDS: 0.5})
        delta = {k: torch.from_numpy(rng.normal(0, 0.05, s).astype(np.float32)) for k, s in SHAPES.items()}
        arrays = dict(encode(delta, codec))
    else:
        metrics[wire.EVAL_LOSS] = 1.75
    return metrics, device, arrays


def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _mutate_array(arr: np.ndarray, rng: np.random.Generator) -> Array | np.ndarray:
    choice = int(rng.integers(9))
    if choice == 0:
        return arr.astype(rng.choice(["float64", "int8", "uint16", "float16", "bool", "complex64"]))
    if choice == 1:
        return arr.reshape(-1) if arr.ndim > 1 else arr.reshape(1, -1)
    if choice == 2:
        data = Array(arr).data
        return Array(str(arr.dtype), tuple(arr.shape), "numpy.ndarray", data[: int(rng.integers(len(data)))])
    if choice == 3:
        data = rng.bytes(int(rng.integers(0, 200)))
        return Array(str(arr.dtype), tuple(arr.shape), "numpy.ndarray", data)
    if choice == 4:  # a header claiming an enormous array, followed by a few bytes
        shape = (int(rng.choice([2**40, 2**62, 10**12])),) + (int(rng.integers(1, 9)),) * int(rng.integers(0, 3))
        return Array("float32", shape, "numpy.ndarray", _npy_header("<f4", shape) + rng.bytes(16))
    if choice == 5 and arr.dtype.kind == "f":
        out = arr.copy()
        out.flat[int(rng.integers(out.size))] = rng.choice([np.nan, np.inf, -np.inf])
        return out
    if choice == 6 and arr.dtype == np.float16:  # 1-bit scales (or fp16 values) at fp16's maximum
        return np.full_like(arr, 65504)
    if choice == 7:
        return Array(str(arr.dtype), tuple(arr.shape), "torch.tensor", Array(arr).data)
    return np.concatenate([arr.reshape(-1), arr.reshape(-1)])


def _mutation(kind: str, rng: np.random.Generator) -> Callable[[dict, dict, dict], None]:
    """One random change to (metrics, device, arrays)."""
    choice = int(rng.integers(8 if kind == "train" else 5))

    def apply(metrics: dict, device: dict, arrays: dict) -> None:
        if choice == 0:
            metrics[str(rng.choice(METRIC_KEYS))] = BAD_NUMBERS[int(rng.integers(len(BAD_NUMBERS)))]
        elif choice == 1:
            metrics.pop(str(rng.choice(METRIC_KEYS)), None)
        elif choice == 2:
            options: list[object] = ["", "x" * 500, "a\nb", "\x00", 7, ["sim-1"], b"sim-0"]
            device[wire.DEVICE_ID] = options[int(rng.integers(len(options)))]
        elif choice == 3:
            device.clear()
        elif choice == 4:
            metrics["unknown"] = float(rng.normal())
        elif choice == 5 and arrays:
            key = sorted(arrays)[int(rng.integers(len(arrays)))]
            if isinstance(arrays[key], np.ndarray):
                arrays[key] = _mutate_array(arrays[key], rng)
            else:  # already an Array made of bytes: other bytes
                arrays[key] = Array("float32", (4,), "numpy.ndarray", rng.bytes(int(rng.integers(0, 64))))
        elif choice == 6 and arrays:
            arrays.pop(sorted(arrays)[int(rng.integers(len(arrays)))])
        elif choice == 7:
            arrays[f"{Q}:{rng.choice(['bits', 'scales', 'values', 'other'])}x"] = rng.normal(size=4).astype(np.float32)

    return apply


def _build(kind: str, metrics: dict, device: dict, arrays: dict, rng: np.random.Generator) -> Message | None:
    """The reply as a device would send it; None where Flower itself refuses the content."""
    drop = int(rng.integers(12))  # now and then a whole record is missing or an error comes back
    if drop == 0:
        return Message(Error(code=0, reason="device failed"), reply_to=INSTRUCTIONS[kind])
    try:
        content = RecordDict()
        if drop != 1:
            content[wire.METRICS] = MetricRecord(metrics)
        if drop != 2:
            content[wire.DEVICE] = ConfigRecord(device)
        if kind == "train" and drop != 3:
            content[wire.DELTA] = ArrayRecord({k: v if isinstance(v, Array) else Array(v) for k, v in arrays.items()})
    except (TypeError, ValueError):
        return None  # a value no Flower record can hold cannot reach the server either
    _sign(kind, content, rng)
    return Message(content, reply_to=INSTRUCTIONS[kind])


def _sign(kind: str, content: RecordDict, rng: np.random.Generator) -> None:
    """Mostly a valid signature (so the other checks are reached); else none, random bytes,
    another device's key, or a valid signature followed by one changed byte or metric."""
    if wire.DEVICE not in content.config_records:
        return
    device = content.config_records[wire.DEVICE].get(wire.DEVICE_ID)
    mode = int(rng.integers(10))
    if mode == 0 or not isinstance(device, str):
        return
    if mode == 1:
        content[wire.DEVICE][wire.SIGNATURE] = rng.bytes(int(rng.choice([0, 1, 63, 64, 65, 200])))
        return
    try:
        digest = content_digest(kind, RUN, device, content)
    except (TypeError, ValueError):
        return  # metrics no JSON can carry: sent unsigned
    key = KEYS["sim-1" if mode == 2 else "sim-0"] if device == "sim-0" else simulation_key(SEED, device)
    content[wire.DEVICE][wire.SIGNATURE] = sign(key, digest)
    if mode == 3 and wire.DELTA in content.array_records and len(content[wire.DELTA]) > 0:
        key = sorted(content[wire.DELTA])[0]
        a = content[wire.DELTA][key]
        data = bytearray(a.data)
        if data:
            data[int(rng.integers(len(data)))] ^= 1 << int(rng.integers(8))
        content[wire.DELTA][key] = Array(a.dtype, a.shape, a.stype, bytes(data))
    elif mode == 4 and wire.METRICS in content.metric_records:
        content[wire.METRICS]["extra"] = 1.0


def _validate(kind: str, msg: Message, codec: str) -> object:
    if kind == "train":
        return validate_train(msg, ROUND, SHAPES, codec, MAX_EXAMPLES, VERSION, MAX_RMS, VERIFIER)
    return validate_eval(msg, ROUND, VERSION, VERIFIER)


def test_ten_thousand_mutated_replies_are_each_accepted_or_rejected() -> None:
    rng = np.random.default_rng(20261129)
    outcomes: Counter[str] = Counter()
    checked = 0
    while checked < CASES:
        kind = "train" if rng.random() < 0.6 else "evaluate"
        codec = CODECS[int(rng.integers(len(CODECS)))]
        metrics, device, arrays = _valid_parts(kind, codec, rng)
        for _ in range(int(rng.integers(1, 4))):
            _mutation(kind, rng)(metrics, device, arrays)
        msg = _build(kind, metrics, device, arrays, rng)
        if msg is None:
            outcomes["refused by Flower"] += 1
            continue
        result = _validate(kind, msg, codec)  # must not raise
        assert isinstance(result, Rejection | TrainReply | EvalReply), type(result)
        if isinstance(result, Rejection):
            assert result.reason and len(result.reason) < 1000, result.reason
            outcomes["rejected"] += 1
        else:
            outcomes["accepted"] += 1
        checked += 1
    assert outcomes["rejected"] > CASES // 2 and outcomes["accepted"] > 0, outcomes


def test_huge_integer_metric_is_rejected_not_raised() -> None:
    rng = np.random.default_rng(0)
    for key in (wire.TRAIN_LOSS, wire.NUM_TOKENS, wire.ROUND, wire.HELD_VERSION, wire.NUM_EXAMPLES):
        metrics, device, arrays = _valid_parts("train", "1bit", rng)
        metrics[key] = 10**400
        msg = _build("train", metrics, device, arrays, np.random.default_rng(5))  # draws no dropped record
        assert msg is not None
        result = validate_train(msg, ROUND, SHAPES, "1bit", MAX_EXAMPLES, VERSION, MAX_RMS)
        assert isinstance(result, Rejection) and "integer of 1329 bits" in result.reason, result


def test_1bit_scales_at_fp16_maximum_are_rejected_by_the_size_bound() -> None:
    rng = np.random.default_rng(1)
    metrics, device, arrays = _valid_parts("train", "1bit", rng)
    for key in arrays:
        if key.endswith(wire.SCALES):
            arrays[key] = np.full_like(arrays[key], 65504)
    msg = Message(
        RecordDict(
            {
                wire.METRICS: MetricRecord(metrics),
                wire.DEVICE: ConfigRecord(device),
                wire.DELTA: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            }
        ),
        reply_to=INSTRUCTIONS["train"],
    )
    result = validate_train(msg, ROUND, SHAPES, "1bit", MAX_EXAMPLES, VERSION, MAX_RMS)
    assert isinstance(result, Rejection) and "root-mean-square 6.55e+04 > bound 0.5" in result.reason
    honest = validate_train(msg, ROUND, SHAPES, "1bit", MAX_EXAMPLES, VERSION, math.inf)
    assert isinstance(honest, TrainReply)  # only the bound refused it
