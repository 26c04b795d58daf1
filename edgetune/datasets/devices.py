"""Which conversations a device owns, tokenized once per process.

A real device points at its own JSONL file (node config ``data-path``); a simulated device
is partition ``partition-id`` of the run's data source (the embedded chatterbot-corpus by
default, split as ``data.partition`` says).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from edgetune import wire
from edgetune.chat import Example, Messages, load_jsonl, pack, tokenize_conversation
from edgetune.config import DataConfig, RunConfig
from edgetune.datasets.corpus import load_chatterbot
from edgetune.datasets.partition import DeviceData, partition, split_heldout

__all__ = ["TokenizedDevice", "canary_file_for", "device_conversations", "planted_canaries", "tokenized_device"]


@dataclass(frozen=True)
class TokenizedDevice:
    name: str
    train: list[Example]
    heldout: list[Example]


def _split(name: str, conversations: list[Messages], heldout_fraction: float, seed: int) -> DeviceData:
    return split_heldout(name, conversations, heldout_fraction, np.random.default_rng(seed))


@functools.cache
def device_conversations(data: DataConfig, data_path: str, index: int, num_devices: int, seed: int) -> DeviceData:
    """The train/held-out conversations of device ``index`` of ``num_devices``.

    Args:
        data: The run's data recipe.
        data_path: The device's own JSONL file ("" for a simulated device).
        index: The device's partition index (simulation).
        num_devices: Devices in the federation.
        seed: Run seed (held-out split and partition).
    """
    if data_path:
        return _split(Path(data_path).name, load_jsonl(data_path), data.heldout_fraction, seed)
    if not 0 <= index < num_devices:
        raise ValueError(f"partition-id {index} out of range for {num_devices} devices")
    if data.source == "chatterbot":
        slices = load_chatterbot(tuple(data.languages))
        return partition(slices, data.partition, num_devices, data.heldout_fraction, seed, data.dirichlet_alpha)[index]
    source = Path(data.source)
    if source.is_dir():
        files = sorted(source.glob("*.jsonl"))
        if len(files) < num_devices:
            raise ValueError(f"data.source {source} holds {len(files)} .jsonl files for {num_devices} devices")
        return _split(files[index].name, load_jsonl(files[index]), data.heldout_fraction, seed)
    conversations = load_jsonl(source)
    shard = [c for i, c in enumerate(conversations) if i % num_devices == index]
    return _split(f"{source.name}#{index}", shard, data.heldout_fraction, seed)


def canary_file_for(cfg: RunConfig, device_root: str) -> str:
    """Where an audit run keeps its canaries (the run folder, parent of the device root); "" if none."""
    return str(Path(device_root).parent / wire.CANARIES_FILE) if cfg.audit.canaries > 0 else ""


def planted_canaries(canary_file: str, index: int) -> list[Messages]:
    """The canary conversations an audit run plants in device ``index``, each repeated; [] if none.

    Raises:
        ValueError: the run plants canaries but ``canary_file`` is not readable here (only
            simulated devices, which share the run folder, can take part in an audit run).
    """
    if not canary_file:
        return []
    try:
        body = json.loads(Path(canary_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"audit run: cannot read the canaries at {canary_file} ({err}); simulation only") from None
    mine = [c["messages"] for c in body["planted"] if int(c["device"]) == index]
    return [m for m in mine for _ in range(int(body["repeats"]))]


@functools.cache
def tokenized_device(
    data: DataConfig,
    data_path: str,
    index: int,
    num_devices: int,
    seed: int,
    tokenizer: PreTrainedTokenizerBase,
    canary_file: str = "",
) -> TokenizedDevice:
    """:func:`device_conversations` through the chat template (and packing, if on).

    In an audit run (``canary_file`` set) the device's planted canaries join its TRAINING split.
    """
    conv = device_conversations(data, data_path, index, num_devices, seed)

    def encode(items: list[Messages]) -> list[Example]:
        examples = [tokenize_conversation(tokenizer, m, data.max_length) for m in items]
        examples = [e for e in examples if any(label != -100 for label in e["labels"])]
        return pack(examples, data.max_length) if data.packing else examples

    train = conv.train + planted_canaries(canary_file, index)
    return TokenizedDevice(conv.name, encode(train), encode(conv.heldout[: data.max_eval_examples]))
