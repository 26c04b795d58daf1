"""Which conversations a device gets: embedded corpus partitions and users' own JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgetune.chat import DataError
from edgetune.config import DataConfig
from edgetune.datasets.devices import device_conversations, tokenized_device
from edgetune.models import tiny_tokenizer


def _write_jsonl(path: Path, n: int, tag: str) -> Path:
    lines = [json.dumps({"prompt": f"{tag} question {i}?", "response": f"{tag} answer {i}."}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_simulated_devices_are_distinct_lang_topic_slices() -> None:
    data = DataConfig()
    devices = [device_conversations(data, "", i, 4, 0) for i in range(4)]
    assert len({d.name for d in devices}) == 4
    assert all(d.name.startswith("english/") for d in devices)
    assert all(d.train and d.heldout for d in devices)


def test_own_jsonl_file_is_split_into_train_and_heldout(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "mine.jsonl", 10, "mine")
    device = device_conversations(DataConfig(), str(path), 0, 1, 0)
    assert (len(device.train), len(device.heldout)) == (8, 2)
    assert device.train[0][0] == {"role": "user", "content": device.train[0][0]["content"]}


def test_folder_source_gives_device_i_its_ith_file(tmp_path: Path) -> None:
    for i in range(3):
        _write_jsonl(tmp_path / f"{i}.jsonl", 5, f"dev{i}")
    data = DataConfig(source=str(tmp_path))
    device = device_conversations(data, "", 2, 3, 0)
    assert all("dev2" in m[0]["content"] for m in device.train + device.heldout)
    with pytest.raises(ValueError, match="3 .jsonl files for 4 devices"):
        device_conversations(data, "", 0, 4, 0)


def test_single_file_source_is_sharded_across_devices(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "all.jsonl", 12, "x")
    data = DataConfig(source=str(path))
    shards = [device_conversations(data, "", i, 3, 0) for i in range(3)]
    seen = [m[0]["content"] for d in shards for m in d.train + d.heldout]
    assert len(seen) == len(set(seen)) == 12


def test_malformed_user_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "q", "response": "a"}\n{"prompt": "q"}\n')
    with pytest.raises(DataError, match=":2"):
        device_conversations(DataConfig(), str(path), 0, 1, 0)


def test_tokenized_device_caps_heldout_and_keeps_supervised_examples(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "mine.jsonl", 40, "mine")
    data = DataConfig(max_eval_examples=3, max_length=256)
    device = tokenized_device(data, str(path), 0, 1, 0, tiny_tokenizer())
    assert len(device.heldout) == 3
    assert all(any(label != -100 for label in e["labels"]) for e in device.train)
