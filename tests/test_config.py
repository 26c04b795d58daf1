"""Tests for edgetune/config.py: flat dashed keys <-> the frozen RunConfig tree, defaults,
value parsing and validation messages that name the key."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edgetune.config import (
    ALL_PROJECTIONS,
    ConfigError,
    DataConfig,
    FederationConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    dumps,
    from_flat,
    to_flat,
)


def test_defaults() -> None:
    cfg = from_flat({})
    assert cfg == RunConfig()
    assert cfg.seed == 0 and cfg.run_dir == "runs/default"
    assert cfg.model.base == "smollm2"
    assert cfg.lora == LoraConfig(rank=8, alpha=16.0, targets=ALL_PROJECTIONS, train_a=False)
    assert cfg.federation.codec == "1bit" and cfg.federation.rounds == 3
    assert cfg.federation.sampled == cfg.federation.num_devices == 8
    assert cfg.train.precision == "auto" and cfg.data.partition == "lang-topic"


def test_docstring_example() -> None:
    cfg = from_flat({"federation.rounds": 2, "lora.rank": 4})
    assert (cfg.federation.rounds, cfg.lora.rank, cfg.lora.alpha) == (2, 4, 16.0)


def test_to_flat_uses_dashed_section_keys() -> None:
    flat = to_flat(RunConfig())
    assert flat["run-dir"] == "runs/default"
    assert flat["lora.targets"] == ",".join(ALL_PROJECTIONS)
    assert flat["federation.devices-per-round"] == 0
    assert flat["data.heldout-fraction"] == 0.2
    assert flat["lora.train-a"] is False
    assert json.loads(dumps(RunConfig())) == flat


def test_round_trip_of_defaults_and_of_a_custom_config() -> None:
    custom = RunConfig(
        seed=7,
        run_dir="/tmp/run",
        model=ModelConfig(base="tiny"),
        lora=LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj"), train_a=True),
        data=DataConfig(source="x.jsonl", partition="dirichlet", languages=("english", "german"), packing=True),
        train=TrainConfig(local_steps=3, batch_size=2, learning_rate=1e-4, precision="fp32"),
        federation=FederationConfig(rounds=5, num_devices=4, devices_per_round=2, codec="fp16", min_replies=2),
    )
    for cfg in (RunConfig(), custom):
        assert from_flat(to_flat(cfg)) == cfg
        assert to_flat(from_flat(to_flat(cfg))) == to_flat(cfg)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().lora.rank = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("OFF", False),
        (True, True),
        (False, False),
    ],
)
def test_bool_parsing(text: object, expected: bool) -> None:
    assert from_flat({"lora.train-a": text}).lora.train_a is expected


@pytest.mark.parametrize("bad", ["maybe", "", 2, 1.0])
def test_bad_bool_raises(bad: object) -> None:
    with pytest.raises(ConfigError, match="lora.train-a"):
        from_flat({"lora.train-a": bad})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("q_proj,v_proj", ("q_proj", "v_proj")),
        (" q_proj , v_proj ,", ("q_proj", "v_proj")),
        ("o_proj", ("o_proj",)),
        (["k_proj", "v_proj"], ("k_proj", "v_proj")),
        (("up_proj",), ("up_proj",)),
    ],
)
def test_tuple_parsing(value: object, expected: tuple[str, ...]) -> None:
    assert from_flat({"lora.targets": value}).lora.targets == expected


def test_number_parsing() -> None:
    cfg = from_flat({"seed": "3", "federation.rounds": 4.0, "lora.alpha": "32", "train.learning-rate": "1e-3"})
    assert cfg.seed == 3 and isinstance(cfg.seed, int)
    assert cfg.federation.rounds == 4 and isinstance(cfg.federation.rounds, int)
    assert cfg.lora.alpha == 32.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.train.learning_rate == 1e-3


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lora.rank", 0),
        ("lora.alpha", 0),
        ("lora.alpha", -1.0),
        ("lora.alpha", "nan"),
        ("lora.targets", ""),
        ("data.partition", "random"),
        ("data.heldout-fraction", 0.0),
        ("data.heldout-fraction", 1.0),
        ("data.max-length", 7),
        ("data.dirichlet-alpha", 0.0),
        ("train.local-steps", 0),
        ("train.batch-size", 0),
        ("train.learning-rate", 0.0),
        ("train.precision", "fp16"),
        ("federation.rounds", 0),
        ("federation.num-devices", 0),
        ("federation.devices-per-round", -1),
        ("federation.devices-per-round", 9),
        ("federation.codec", "3bit"),
        ("federation.min-replies", 0),
        ("federation.reply-timeout", 0),
        ("federation.rounds", 2.5),
        ("federation.rounds", "three"),
        ("federation.rounds", True),
        ("seed", "x"),
        ("lora.alpha", "sixteen"),
        ("lora.targets", 3),
    ],
)
def test_invalid_value_raises_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_flat({key: value})


@pytest.mark.parametrize(("key", "value"), [("lora.alpha", "inf"), ("train.learning-rate", float("inf"))])
def test_non_finite_numbers_raise(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_flat({key: value})


def test_devices_per_round_is_checked_against_num_devices() -> None:
    assert from_flat({"federation.num-devices": 3, "federation.devices-per-round": 3}).federation.sampled == 3
    with pytest.raises(ConfigError, match="devices-per-round"):
        from_flat({"federation.num-devices": 3, "federation.devices-per-round": 4})


@pytest.mark.parametrize("key", ["lora.rnak", "federation.codecs", "bogus", "sed", "lora", "bogus.rank", "a.b.c"])
def test_unknown_key_raises(key: str) -> None:
    with pytest.raises(ConfigError, match="unknown config"):
        from_flat({key: 1})


def test_unknown_key_message_names_the_key() -> None:
    with pytest.raises(ConfigError, match="'lora.rnak'"):
        from_flat({"lora.rnak": 4})


def test_dataclasses_validate_on_construction() -> None:
    with pytest.raises(ConfigError, match="lora.rank"):
        LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="federation.codec"):
        FederationConfig(codec="int4")
