"""What left each device: one JSON line per reply received, with a verdict.

The federation calls :func:`record_uplink` for every train and evaluate reply BEFORE
validation, so rejected replies are on record too; identify replies (the device id, signed,
once per run start) only when rejected or flagged. Each line of ``uplinks.jsonl`` reads::

    {"round": 1, "kind": "train", "node": 7, "device": "sim-0",
     "records": [{"record": "delta", "type": "array", "items": [
                    {"name": "...lora_B.weight:bits", "shape": [64, 1], "dtype": "uint8", "bytes": 64}, ...]},
                 {"record": "metrics", "type": "metric", "keys": ["eval-loss", ...]},
                 {"record": "device", "type": "config", "keys": ["device-id", "signature"]}],
     "bytes": 1234, "verdict": "only adapter deltas and numeric metrics", "offending": []}

Allowed content (anything else is listed under ``offending``):
    ``delta``   ArrayRecord, train replies only: keys ``<adapter tensor>:<part>`` with a LoRA
                tensor name and a codec part (bits, scales, values), numeric dtypes
    ``metrics`` MetricRecord: the known numeric metric keys, scalar values
    ``device``  ConfigRecord holding only the device id and its signature of the reply
    ``secagg``  ConfigRecord, secure-aggregation replies (kind ``secagg-<stage>``): public keys,
                AES-GCM ciphertexts, a seed commitment, Shamir shares, the advertisement's signature
                and signer (never a plain input)
    ``secagg-masked`` ArrayRecord, ``secagg-mask`` replies: the masked input, packed uint8
    ``secagg-public`` ArrayRecord, ``secagg-keys`` replies: the two X25519 public keys
Errors a device reports are text that left it, so they are flagged as well.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flwr.app import Message

from edgetune import wire

__all__ = ["ALLOWED_VERDICT", "describe_uplink", "read_uplinks", "record_uplink"]

ALLOWED_VERDICT = "only adapter deltas and numeric metrics"
_METRIC_KEYS = frozenset(
    {wire.ROUND, wire.HELD_VERSION, wire.NUM_EXAMPLES, wire.TRAIN_LOSS, wire.EVAL_LOSS, wire.NUM_TOKENS, wire.SECONDS}
    | {wire.CPU_SECONDS, wire.SYNC_SECONDS, wire.SYNC_CPU_SECONDS}  # timing of the round's phases
)
_PARTS = frozenset({wire.BITS, wire.SCALES, wire.VALUES})
_SECAGG_KEYS = frozenset(
    {wire.ROUND, wire.SA_C_PK, wire.SA_S_PK, wire.SA_DST, wire.SA_CIPHERTEXTS, wire.SA_COMMITMENT}
    | {wire.SA_ADVERT_SIG, wire.SA_SIGNER}  # the key advertisement's signature and its signer's key id
    | {wire.SA_SEED_SHARES, wire.SA_SEED_SHARES + "-src", wire.SA_KEY_SHARES, wire.SA_KEY_SHARES + "-src"}
)
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_.]+\.lora_[AB]\.weight$")
_NUMERIC_DTYPES = re.compile(r"^(u?int(8|16|32|64)|float(16|32|64)|bfloat16|bool)$")


def _array_items(name: str, record: Any, kind: str) -> tuple[dict[str, Any], list[str]]:
    items, bad = [], []
    protocol = {("secagg-mask", wire.SECAGG_MASKED), ("secagg-keys", wire.SECAGG_PUBLIC)}
    if (kind, name) in protocol:  # the masked input (uniform in Z_(2^k)), or the two public keys
        for key, array in record.items():
            items.append({"name": key, "shape": list(array.shape), "dtype": str(array.dtype), "bytes": len(array.data)})
            allowed = {wire.SECAGG_MASKED} if name == wire.SECAGG_MASKED else {wire.SA_C_PK, wire.SA_S_PK}
            if key not in allowed or str(array.dtype) != "uint8":
                bad.append(f"array {name}/{key!r} is not secure-aggregation protocol data")
        return {"record": name, "type": "array", "items": items}, bad
    if name != wire.DELTA or kind != "train":
        bad.append(f"array record {name!r} in a {kind} reply (only 'delta' in train replies)")
    for key, array in record.items():
        tensor, sep, part = key.rpartition(wire.PART_SEP)
        items.append({"name": key, "shape": list(array.shape), "dtype": str(array.dtype), "bytes": len(array.data)})
        if not (sep and part in _PARTS and _ADAPTER_NAME.match(tensor)):
            bad.append(f"array {name}/{key!r} is not an adapter tensor part")
        if not _NUMERIC_DTYPES.match(str(array.dtype)):
            bad.append(f"array {name}/{key!r} has non-numeric dtype {array.dtype!r}")
    return {"record": name, "type": "array", "items": items}, bad


def _metric_items(name: str, record: Any) -> tuple[dict[str, Any], list[str]]:
    bad = [] if name == wire.METRICS else [f"metric record {name!r} (only 'metrics')"]
    for key, value in record.items():
        if key not in _METRIC_KEYS:
            bad.append(f"metric {name}/{key!r} is not a known metric")
        if not isinstance(value, int | float) or isinstance(value, bool):
            bad.append(f"metric {name}/{key!r} is a {type(value).__name__}, not one number")
    return {"record": name, "type": "metric", "keys": sorted(record.keys())}, bad


def _config_items(name: str, record: Any, kind: str = "") -> tuple[dict[str, Any], list[str]]:
    entry: dict[str, Any] = {"record": name, "type": "config", "keys": sorted(record.keys())}
    if name == wire.SECAGG and kind.startswith("secagg-"):  # public keys, ciphertexts, shares
        extra = sorted(set(record.keys()) - _SECAGG_KEYS)
        return entry, [f"secagg record carries unknown keys {extra}"] if extra else []
    if name == wire.DEVICE and wire.DEVICE_ID in record and set(record.keys()) <= {wire.DEVICE_ID, wire.SIGNATURE}:
        return entry, []
    allowed = {wire.DEVICE_ID, wire.SIGNATURE}
    extra = sorted(set(record.keys()) - allowed) if name == wire.DEVICE else sorted(record.keys())
    return entry, [f"config record {name!r} carries {extra} (only 'device' with the device id)"]


def _device_id(msg: Message) -> str:
    if msg.has_error() or wire.DEVICE not in msg.content.config_records:
        return f"node-{msg.metadata.src_node_id}"
    return str(msg.content.config_records[wire.DEVICE].get(wire.DEVICE_ID, f"node-{msg.metadata.src_node_id}"))


def describe_uplink(round_: int, kind: str, msg: Message) -> dict[str, Any]:
    """One reply as a JSON-ready description plus its verdict.

    Args:
        round_: The round the server sent the message for.
        kind: ``train`` or ``evaluate`` (what the server asked for).
        msg: The reply exactly as received.

    Returns:
        A dict with round, kind, node, device, records, bytes, verdict and offending items.
    """
    records: list[dict[str, Any]] = []
    offending: list[str] = []
    if msg.has_error():
        reason = str(msg.error.reason or "")
        records.append({"record": "error", "type": "error", "code": int(msg.error.code), "chars": len(reason)})
        offending.append(f"error text ({len(reason)} characters) left the device")
    else:
        content = msg.content
        for describe, group in (
            (lambda n, r: _array_items(n, r, kind), content.array_records),
            (_metric_items, content.metric_records),
            (lambda n, r: _config_items(n, r, kind), content.config_records),
        ):
            for name, record in group.items():
                entry, bad = describe(name, record)
                records.append(entry)
                offending.extend(bad)
    total = sum(item["bytes"] for r in records if r["type"] == "array" for item in r["items"])
    return {
        "round": round_,
        "kind": kind,
        "node": int(msg.metadata.src_node_id),
        "device": _device_id(msg),
        "records": records,
        "bytes": total,
        "verdict": ALLOWED_VERDICT if not offending else "flagged",
        "offending": offending,
    }


def record_uplink(run_dir: Path, round_: int, kind: str, msg: Message) -> dict[str, Any]:
    """Append what ``msg`` carried to ``run_dir/uplinks.jsonl``; returns the line written."""
    line = describe_uplink(round_, kind, msg)
    with open(Path(run_dir) / wire.UPLINKS_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line, sort_keys=True) + "\n")
    return line


def read_uplinks(run_dir: Path) -> list[dict[str, Any]]:
    """Every recorded reply, in arrival order (a line cut by a crash is skipped)."""
    path = Path(run_dir) / wire.UPLINKS_FILE
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return lines
