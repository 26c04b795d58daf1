"""Which conversations a device owns, tokenized once per process.

A real device points at its own JSONL file (node config ``data-path``); a simulated device
is partition ``partition-id`` of the run's data source (the embedded chatterbot-corpus by
default, split as ``data.partition`` says).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from edgetune.config import DataConfig
from simulations.corpus import load_chatterbot
from simulations.partition import DeviceData, partition, split_heldout

from .data import Example, Messages, load_jsonl, pack, tokenize_conversation

__all__ = ["TokenizedDevice", "device_conversations", "tokenized_device"]


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


@functools.cache
def tokenized_device(
    data: DataConfig, data_path: str, index: int, num_devices: int, seed: int, tokenizer: PreTrainedTokenizerBase
) -> TokenizedDevice:
    """:func:`device_conversations` through the chat template (and packing, if on)."""
    conv = device_conversations(data, data_path, index, num_devices, seed)

    def encode(items: list[Messages]) -> list[Example]:
        examples = [tokenize_conversation(tokenizer, m, data.max_length) for m in items]
        examples = [e for e in examples if any(label != -100 for label in e["labels"])]
        return pack(examples, data.max_length) if data.packing else examples

    return TokenizedDevice(conv.name, encode(conv.train), encode(conv.heldout[: data.max_eval_examples]))
