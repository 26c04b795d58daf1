"""Reply validation: every reply is checked before it can touch the global adapter.

A reply is dropped, with a logged reason, when it is an error, lacks a record, is for
another round or another version, reports an example count outside
``[1, local_steps * batch_size]`` or a metric that is not a finite number >= 0, or carries
a delta that is larger than the adapter can need, does not parse, or whose names, dtypes,
shapes or values do not match what the server expects. The round goes on with the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.app import Message
from torch import Tensor

from edgetune import wire
from edgetune.adapters.codec import CodecError, Payload, decode, expected_payload_bytes, payload_bytes

_OPTIONAL = (wire.NUM_TOKENS, wire.SECONDS)  # checked when present
_NPY_HEADER_SLACK = 1024  # bytes of .npy header allowed per array

__all__ = ["EvalReply", "Rejection", "TrainReply", "validate_eval", "validate_train"]


@dataclass(frozen=True)
class Rejection:
    node_id: int
    reason: str


@dataclass(frozen=True)
class TrainReply:
    node_id: int
    device_id: str
    delta: dict[str, Tensor]
    num_examples: int
    metrics: dict[str, float]
    bytes: int


@dataclass(frozen=True)
class EvalReply:
    node_id: int
    device_id: str
    metrics: dict[str, float]


def _common(msg: Message, round_: int, keys: tuple[str, ...], version: int | None) -> tuple[str, dict[str, float]]:
    if msg.has_error():
        raise ValueError(f"device error: {msg.error.reason}")
    content = msg.content
    if wire.METRICS not in content.metric_records or wire.DEVICE not in content.config_records:
        raise ValueError("reply lacks its metrics or device record")
    metrics = dict(content.metric_records[wire.METRICS])
    missing = [k for k in (wire.ROUND, wire.HELD_VERSION, *keys) if k not in metrics]
    if missing:
        raise ValueError(f"metrics lack {missing}")
    if metrics[wire.ROUND] != round_:
        raise ValueError(f"reply is for round {metrics[wire.ROUND]}, not {round_}")
    for key in (*keys, *(k for k in _OPTIONAL if k in metrics)):
        value = metrics[key]
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"metric {key}={value!r} is not a finite number")
        if value < 0:
            raise ValueError(f"metric {key}={value!r} outside [0, inf)")
    held = metrics[wire.HELD_VERSION]
    if not isinstance(held, int) or held < 0 or (version is not None and held != version):
        raise ValueError(f"held-version={held!r}, expected {'an integer >= 0' if version is None else version}")
    return str(content.config_records[wire.DEVICE].get(wire.DEVICE_ID, "")), metrics


def _arrays(msg: Message, shapes: dict[str, tuple[int, ...]], codec: str) -> Payload:
    """The delta's arrays, refusing oversized data before numpy parses a header."""
    if wire.DELTA not in msg.content.array_records:
        raise ValueError("reply carries no delta")
    record = msg.content.array_records[wire.DELTA]
    limit = expected_payload_bytes(shapes, codec) + _NPY_HEADER_SLACK * max(len(record), 1)
    size = sum(len(a.data) for a in record.values())
    if size > limit:
        raise ValueError(f"delta is {size} bytes, more than the {limit} this adapter can need")
    payload = {}
    for key, array in record.items():
        try:
            payload[key] = array.numpy()
        except Exception as err:  # noqa: BLE001 - any parse failure of peer bytes is a bad reply
            raise ValueError(f"array {key!r} does not decode: {type(err).__name__}: {err}") from None
    return payload


def validate_train(
    msg: Message,
    round_: int,
    shapes: dict[str, tuple[int, ...]],
    codec: str,
    max_examples: int,
    version: int | None = None,
) -> TrainReply | Rejection:
    """Check a train reply (sent for ``round_`` to a device synced to ``version``); decode its delta."""
    node = msg.metadata.src_node_id
    try:
        device, metrics = _common(msg, round_, (wire.NUM_EXAMPLES, wire.TRAIN_LOSS), version)
        n = metrics[wire.NUM_EXAMPLES]
        if not isinstance(n, int) or not 1 <= n <= max_examples:
            raise ValueError(f"num-examples={n!r} outside [1, {max_examples}]")
        payload = _arrays(msg, shapes, codec)
        delta = decode(payload, shapes, codec)
    except (ValueError, TypeError, KeyError, CodecError) as err:
        return Rejection(node, str(err))
    return TrainReply(node, device, delta, n, metrics, payload_bytes(payload))


def validate_eval(msg: Message, round_: int, version: int | None = None) -> EvalReply | Rejection:
    """Check an evaluate reply (numeric metrics only)."""
    node = msg.metadata.src_node_id
    try:
        device, metrics = _common(msg, round_, (wire.EVAL_LOSS, wire.NUM_TOKENS), version)
    except (ValueError, TypeError, KeyError) as err:
        return Rejection(node, str(err))
    return EvalReply(node, device, metrics)
