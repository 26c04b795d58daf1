"""Reply validation: every reply is checked before it can touch the global adapter.

A reply is dropped, with a logged reason, when it is an error, lacks a record, is for
another round, reports an example count outside ``[1, local_steps * batch_size]`` or a
non-finite loss, or carries a delta whose names, dtypes, shapes (hence size) or values do
not match what the server expects. The round goes on with the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.app import Message
from torch import Tensor

from adapters.codec import CodecError, decode, payload_bytes
from edgetune import wire

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


def _common(msg: Message, round_: int, keys: tuple[str, ...]) -> tuple[str, dict[str, float]]:
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
    for key in keys:
        value = metrics[key]
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"metric {key}={value!r} is not a finite number")
    return str(content.config_records[wire.DEVICE].get(wire.DEVICE_ID, "")), metrics


def validate_train(
    msg: Message, round_: int, shapes: dict[str, tuple[int, ...]], codec: str, max_examples: int
) -> TrainReply | Rejection:
    """Check a train reply; decode its delta."""
    node = msg.metadata.src_node_id
    try:
        device, metrics = _common(msg, round_, (wire.NUM_EXAMPLES, wire.TRAIN_LOSS))
        n = metrics[wire.NUM_EXAMPLES]
        if not isinstance(n, int) or not 1 <= n <= max_examples:
            raise ValueError(f"num-examples={n!r} outside [1, {max_examples}]")
        if wire.DELTA not in msg.content.array_records:
            raise ValueError("reply carries no delta")
        payload = {k: a.numpy() for k, a in msg.content.array_records[wire.DELTA].items()}
        delta = decode(payload, shapes, codec)
    except (ValueError, TypeError, KeyError, CodecError) as err:
        return Rejection(node, str(err))
    return TrainReply(node, device, delta, n, metrics, payload_bytes(payload))


def validate_eval(msg: Message, round_: int) -> EvalReply | Rejection:
    """Check an evaluate reply (numeric metrics only)."""
    node = msg.metadata.src_node_id
    try:
        device, metrics = _common(msg, round_, (wire.EVAL_LOSS, wire.NUM_TOKENS))
    except (ValueError, TypeError, KeyError) as err:
        return Rejection(node, str(err))
    return EvalReply(node, device, metrics)
