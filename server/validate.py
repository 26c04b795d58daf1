"""Reply validation: every reply is checked before it can touch the global adapter.

A reply is dropped, with a logged reason, when it is an error, lacks a record, is for
another round or another version, reports an example count outside
``[1, local_steps * batch_size]`` or a metric that is not a finite number >= 0 (a bool, a
list, an integer beyond 2**53, NaN or Inf), names no device, or carries a delta that is larger
than the adapter can need, does not parse, whose names, dtypes, shapes or values do not match
what the server expects, or whose decoded root-mean-square exceeds the bound
(:func:`delta_rms_bound`: no honest local training moves an element that far). The round
goes on with the rest. With a :class:`Verifier`, a reply whose signature is missing or does not
verify under the key of the device it names is rejected before anything in it is decoded.
Validation never raises, whatever a device sends
(``tests/test_fuzz_replies.py`` throws 10,000 mutated replies at it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import Message
from torch import Tensor

from edgetune import wire
from edgetune.adapters.codec import CodecError, Payload, decode, expected_payload_bytes, payload_bytes
from edgetune.config import RunConfig
from edgetune.signing import PublicKey, content_digest, verify

_OPTIONAL = (wire.NUM_TOKENS, wire.SECONDS, wire.CPU_SECONDS, wire.SYNC_SECONDS, wire.SYNC_CPU_SECONDS)  # if present
_NPY_HEADER_SLACK = 1024  # bytes of .npy header allowed per array

__all__ = [
    "EvalReply",
    "Rejection",
    "TrainReply",
    "Verifier",
    "delta_rms_bound",
    "validate_eval",
    "validate_identity",
    "validate_metrics",
    "validate_train",
]

_MAX_EXACT_INT = 2**53  # beyond this an integer metric is not one float64 can hold exactly
_MAX_DEVICE_ID = 128  # characters
# AdamW moves an element by at most about lr (1 - beta1) / sqrt(1 - beta2) ~= 3.2 lr per step
# (Kingma & Ba 2015, sec. 2.1); error feedback can carry up to about as much again.
_ADAM_STEP_BOUND = 3.2
_FEEDBACK_FACTOR = 3.0
# Peer text (ids, metric values) quoted in a reason is cut to this many characters.
_QUOTE = 40


def delta_rms_bound(cfg: RunConfig) -> float:
    """The largest root-mean-square a decoded delta may have: ``federation.max-delta-rms``,
    or (when that is 0) ``3.2 * 3 * local_steps * learning_rate``.

    An honest device's AdamW steps move each element by at most about ``3.2 lr`` per step,
    and error feedback carries at most about twice that over, so no element, and hence no
    root-mean-square, of an honest delta exceeds the derived bound. A 1-bit reply whose
    scales are all 65504 (fp16's maximum) has RMS 65504 and is rejected.

    Example:
        >>> delta_rms_bound(RunConfig())  # 8 steps at 2e-3
        0.1536
    """
    f, t = cfg.federation, cfg.train
    bound = f.max_delta_rms or _ADAM_STEP_BOUND * _FEEDBACK_FACTOR * t.local_steps * t.learning_rate
    return round(bound, 12)


def _show(value: object) -> str:
    """A short, safe rendering of a peer-supplied value (huge integers have no cheap repr)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_EXACT_INT:
        return f"<integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= _QUOTE else text[: _QUOTE - 3] + "..."


def _number(key: str, value: object) -> float:
    """``value`` as a finite float, or ValueError naming the key (never OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"metric {key}={_show(value)} is not a finite number")
    if isinstance(value, int) and abs(value) > _MAX_EXACT_INT:
        raise ValueError(f"metric {key}={_show(value)} is not a finite number (beyond 2**53)")
    if not math.isfinite(value):
        raise ValueError(f"metric {key}={_show(value)} is not a finite number")
    return float(value)


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


@dataclass(frozen=True)
class Verifier:
    """How the server checks reply signatures (``edgetune/signing.py``)."""

    run: str
    """The run tag every reply must be signed for (``signing.run_tag`` of the run config)."""
    key_for: Callable[[int, str], PublicKey | None]
    """(node id, claimed device id) -> the public key the reply must verify under, or None."""


def _check_signature(msg: Message, kind: str, device: str, verifier: Verifier) -> None:
    """Raise ValueError unless the reply is signed by ``device``'s key over all it says."""
    signature = msg.content.config_records[wire.DEVICE].get(wire.SIGNATURE)
    if not isinstance(signature, bytes):
        raise ValueError("bad signature: the reply is not signed")
    key = verifier.key_for(msg.metadata.src_node_id, device)
    if key is None:
        raise ValueError(f"bad signature: no key known for device {device!r} on node {msg.metadata.src_node_id}")
    if not verify(key, signature, content_digest(kind, verifier.run, device, msg.content)):
        raise ValueError(f"bad signature: not signed with the key of device {device!r} for this run and round")


def _signed_for_round(msg: Message, round_: int, verifier: Verifier | None, kind: str) -> tuple[str, dict[str, float]]:
    """(device id, metrics) of a reply that names its device, for ``round_``, signed when checked."""
    if msg.has_error():
        reason = str(msg.error.reason)  # a traceback ends with the exception: keep the end
        raise ValueError(f"device error: {reason if len(reason) <= 2000 else '...' + reason[-2000:]}")
    content = msg.content
    if wire.METRICS not in content.metric_records or wire.DEVICE not in content.config_records:
        raise ValueError("reply lacks its metrics or device record")
    device = content.config_records[wire.DEVICE].get(wire.DEVICE_ID, "")
    if not isinstance(device, str) or not 1 <= len(device) <= _MAX_DEVICE_ID or not device.isprintable():
        raise ValueError(f"device-id={_show(device)} is not 1-{_MAX_DEVICE_ID} printable characters")
    if verifier is not None:  # before anything is decoded
        _check_signature(msg, kind, device, verifier)
    metrics = dict(content.metric_records[wire.METRICS])
    if wire.ROUND not in metrics:
        raise ValueError(f"metrics lack {[wire.ROUND]}")
    got_round = metrics[wire.ROUND]
    if isinstance(got_round, bool) or not isinstance(got_round, int) or got_round != round_:
        raise ValueError(f"reply is for round {_show(got_round)}, not {round_}")
    return device, metrics


def validate_identity(msg: Message, round_: int, verifier: Verifier | None = None) -> str | Rejection:
    """The device id an identify reply (``wire.IDENTIFY``) names for ``round_``, or a Rejection."""
    try:
        return _signed_for_round(msg, round_, verifier, wire.IDENTIFY)[0]
    except (ValueError, TypeError, KeyError, IndexError, ArithmeticError) as err:
        return Rejection(msg.metadata.src_node_id, str(err))


def _common(
    msg: Message, round_: int, keys: tuple[str, ...], version: int | None, verifier: Verifier | None, kind: str
) -> tuple[str, dict[str, float]]:
    device, metrics = _signed_for_round(msg, round_, verifier, kind)
    missing = [k for k in (wire.HELD_VERSION, *keys) if k not in metrics]
    if missing:
        raise ValueError(f"metrics lack {missing}")
    for key in (*keys, *(k for k in _OPTIONAL if k in metrics)):
        if _number(key, metrics[key]) < 0:
            raise ValueError(f"metric {key}={_show(metrics[key])} outside [0, inf)")
    held = metrics[wire.HELD_VERSION]
    if isinstance(held, bool) or not isinstance(held, int) or held < 0 or (version is not None and held != version):
        raise ValueError(f"held-version={_show(held)}, expected {'an integer >= 0' if version is None else version}")
    return device, metrics


def validate_metrics(
    msg: Message,
    round_: int,
    keys: tuple[str, ...],
    version: int | None,
    verifier: Verifier | None = None,
    kind: str = "train",
) -> tuple[str, dict[str, float]]:
    """``(device id, metrics)`` of a reply of message type ``kind`` whose metrics record holds
    ``keys`` and, with a ``verifier``, whose signature covers them (ValueError if not)."""
    return _common(msg, round_, keys, version, verifier, kind)


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
    max_rms: float = math.inf,
    verifier: Verifier | None = None,
) -> TrainReply | Rejection:
    """Check a train reply (sent for ``round_`` to a device synced to ``version``); decode its delta.

    ``max_rms``: the largest root-mean-square the decoded delta may have
    (:func:`delta_rms_bound`). ``verifier``: check the reply's signature first (None: replies
    are not signed in this deployment).
    """
    node = msg.metadata.src_node_id
    try:
        device, metrics = _common(msg, round_, (wire.NUM_EXAMPLES, wire.TRAIN_LOSS), version, verifier, "train")
        n = metrics[wire.NUM_EXAMPLES]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_examples:
            raise ValueError(f"num-examples={_show(n)} outside [1, {max_examples}]")
        payload = _arrays(msg, shapes, codec)
        delta = decode(payload, shapes, codec)
        _check_size(delta, max_rms)
    except (ValueError, TypeError, KeyError, IndexError, ArithmeticError, CodecError) as err:
        return Rejection(node, str(err))
    return TrainReply(node, device, delta, n, metrics, payload_bytes(payload))


def validate_eval(
    msg: Message, round_: int, version: int | None = None, verifier: Verifier | None = None
) -> EvalReply | Rejection:
    """Check an evaluate reply (numeric metrics only; signed, when ``verifier`` is given)."""
    node = msg.metadata.src_node_id
    try:
        device, metrics = _common(msg, round_, (wire.EVAL_LOSS, wire.NUM_TOKENS), version, verifier, "evaluate")
    except (ValueError, TypeError, KeyError, IndexError, ArithmeticError) as err:
        return Rejection(node, str(err))
    return EvalReply(node, device, metrics)


def _check_size(delta: dict[str, Tensor], max_rms: float) -> None:
    """Refuse a decoded delta whose root-mean-square exceeds ``max_rms`` (fp64 sums)."""
    squares = sum(float(v.double().square().sum()) for v in delta.values())
    count = sum(v.numel() for v in delta.values())
    rms = math.sqrt(squares / max(count, 1))
    if rms > max_rms:
        raise ValueError(f"delta root-mean-square {rms:.4g} > bound {max_rms:.4g} (federation.max-delta-rms)")
