"""Tests for edgetune/datasets/corpus.py (chatterbot-corpus loading) and edgetune/datasets/partition.py
(splitting conversations across virtual devices)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edgetune.chat import Messages
from edgetune.datasets.corpus import available_languages, load_chatterbot
from edgetune.datasets.partition import (
    SCHEMES,
    DeviceData,
    partition,
    partition_by_slice,
    partition_dirichlet,
    partition_iid,
)

# --- corpus ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def english() -> dict[tuple[str, str], list[Messages]]:
    return load_chatterbot(("english",))


def test_english_slices_are_alternating_chats(english):
    assert {("english", "ai"), ("english", "tech_support")} <= set(english)
    assert {language for language, _ in english} == {"english"}
    for conversations in english.values():
        assert conversations
        for messages in conversations:
            assert len(messages) >= 2 and len(messages) % 2 == 0
            roles = [m["role"] for m in messages]
            assert roles == ["user", "assistant"] * (len(messages) // 2)
            assert all(isinstance(m["content"], str) for m in messages)
    first = english[("english", "ai")][0]
    assert first[0] == {"role": "user", "content": "What is AI?"}


def test_all_languages_load():
    languages = available_languages()
    assert "english" in languages and len(languages) >= 20
    slices = load_chatterbot()
    assert {language for language, _ in slices} == set(languages)


def test_unknown_language_lists_available_ones():
    with pytest.raises(ValueError, match=r"\['klingon'\]; available: .*english"):
        load_chatterbot(("english", "klingon"))
    with pytest.raises(ValueError, match="languages is empty"):
        load_chatterbot(())
    with pytest.raises(TypeError, match="'english'"):
        load_chatterbot("english")  # type: ignore[arg-type]


def test_conversion_rules_on_a_small_corpus(tmp_path: Path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "misc.yml").write_text(
        "categories: [misc]\n"
        "conversations:\n"
        "- [hi, 42]\n"  # non-string item coerced
        "- [alone]\n"  # fewer than two turns: skipped
        "- just a string\n"  # not a list: skipped
        "- [a, b, c]\n"  # unanswered last user turn dropped
        "- [yes, 1.5, ' x ', d]\n",
        encoding="utf-8",
    )
    (tmp_path / "toy" / "empty.yml").write_text("conversations: []\n", encoding="utf-8")
    slices = load_chatterbot(("toy",), data_dir=tmp_path)
    assert list(slices) == [("toy", "misc")]
    contents = [[m["content"] for m in messages] for messages in slices[("toy", "misc")]]
    assert contents == [["hi", "42"], ["a", "b"], ["True", "1.5", "x", "d"]]
    assert [m["role"] for m in slices[("toy", "misc")][2]] == ["user", "assistant"] * 2


# --- partition ------------------------------------------------------------------------------


def make_slices(sizes: dict[tuple[str, str], int]) -> dict[tuple[str, str], list[Messages]]:
    """Synthetic slices whose conversations carry unique ids as their user content."""
    return {
        key: [
            [
                {"role": "user", "content": f"{key[0]}/{key[1]}/{i}"},
                {"role": "assistant", "content": "ok"},
            ]
            for i in range(size)
        ]
        for key, size in sizes.items()
    }


def ids(conversations: list[Messages]) -> list[str]:
    return [messages[0]["content"] for messages in conversations]


def assert_disjoint_cover(devices: list[DeviceData], expected: set[str]) -> None:
    seen = [i for d in devices for i in ids(d.train) + ids(d.heldout)]
    assert len(seen) == len(set(seen)), "a conversation landed on two devices or splits"
    assert set(seen) == expected
    assert all(d.train and d.heldout for d in devices)


def test_by_slice_takes_the_largest_slices_ties_by_name():
    slices = make_slices({("en", "b"): 5, ("en", "a"): 5, ("de", "z"): 9, ("en", "tiny"): 2})
    devices = partition_by_slice(slices, num_devices=3, heldout_fraction=0.2, seed=0)
    assert [d.name for d in devices] == ["de/z", "en/a", "en/b"]
    for device in devices:
        language, topic = device.name.split("/")
        owned = ids(device.train) + ids(device.heldout)
        assert sorted(owned) == sorted(ids(slices[(language, topic)]))
    assert [len(d.heldout) for d in devices] == [2, 1, 1]  # round(0.2 * 9) = 2
    with pytest.raises(ValueError, match="4 slices cannot fill 5 devices"):
        partition_by_slice(slices, num_devices=5, heldout_fraction=0.2, seed=0)


@pytest.mark.parametrize(
    ("n", "fraction", "held"),
    [(10, 0.2, 2), (2, 0.9, 1), (3, 0.01, 1), (7, 0.5, 4), (5, 0.5, 3)],  # rounded half up
)
def test_heldout_sizes(n: int, fraction: float, held: int):
    (device,) = partition_by_slice(make_slices({("en", "t"): n}), 1, fraction, seed=3)
    assert (len(device.heldout), len(device.train)) == (held, n - held)
    # Both parts keep the original relative order.
    assert ids(device.train) == sorted(ids(device.train), key=lambda s: int(s.split("/")[-1]))


sizes_strategy = st.dictionaries(
    st.tuples(st.sampled_from(["en", "de", "fr"]), st.sampled_from(["ai", "food", "sports", "x"])),
    st.integers(0, 30),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(
    sizes=sizes_strategy,
    scheme=st.sampled_from(SCHEMES),
    num_devices=st.integers(1, 6),
    fraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**32 - 1),
    alpha=st.floats(0.01, 100.0),
)
def test_partitions_are_disjoint_cover_and_deterministic(sizes, scheme, num_devices, fraction, seed, alpha):
    slices = make_slices(sizes)
    if scheme == "lang-topic":
        assume(len(slices) >= num_devices)
        chosen = sorted(slices, key=lambda k: (-len(slices[k]), k))[:num_devices]
        assume(all(len(slices[k]) >= 2 for k in chosen))
        expected = {i for k in chosen for i in ids(slices[k])}
    else:
        assume(sum(sizes.values()) >= 2 * num_devices)
        expected = {i for c in slices.values() for i in ids(c)}
    devices = partition(slices, scheme, num_devices, fraction, seed, alpha=alpha)
    assert len(devices) == num_devices
    assert len({d.name for d in devices}) == num_devices
    assert_disjoint_cover(devices, expected)
    assert devices == partition(slices, scheme, num_devices, fraction, seed, alpha=alpha)


def test_iid_shares_differ_by_at_most_one():
    slices = make_slices({("en", "a"): 11, ("en", "b"): 12})
    devices = partition_iid(slices, num_devices=4, heldout_fraction=0.25, seed=1)
    sizes = [len(d.train) + len(d.heldout) for d in devices]
    assert sorted(sizes) == [5, 6, 6, 6]
    assert [d.name for d in devices] == ["iid-0", "iid-1", "iid-2", "iid-3"]


def labels_per_device(devices: list[DeviceData]) -> float:
    counts = [len({i.rsplit("/", 1)[0] for i in ids(d.train + d.heldout)}) for d in devices]
    return sum(counts) / len(counts)


def test_dirichlet_alpha_controls_label_skew():
    slices = make_slices({("en", t): 60 for t in "abcdef"})
    skewed = partition_dirichlet(slices, 6, 0.2, seed=0, alpha=0.05)
    uniform = partition_dirichlet(slices, 6, 0.2, seed=0, alpha=100.0)
    assert labels_per_device(skewed) < 3 < labels_per_device(uniform)
    assert labels_per_device(uniform) == 6


def test_dirichlet_guarantees_two_per_device_on_a_tight_pool():
    slices = make_slices({("en", "a"): 8, ("en", "b"): 2})
    devices = partition_dirichlet(slices, num_devices=5, heldout_fraction=0.5, seed=0, alpha=0.01)
    assert [len(d.train) + len(d.heldout) for d in devices] == [2] * 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"scheme": "random"},
            "unknown partition scheme 'random'; valid schemes: lang-topic, iid, dirichlet",
        ),
        ({"num_devices": 0}, "num_devices must be at least 1, got 0"),
        ({"heldout_fraction": 0.0}, r"heldout_fraction must be in \(0, 1\), got 0.0"),
        ({"heldout_fraction": 1.0}, "got 1.0"),
        ({"scheme": "dirichlet", "alpha": 0.0}, "alpha must be positive, got 0.0"),
        ({"scheme": "iid", "num_devices": 4}, "6 conversations cannot give 4 devices"),
    ],
)
def test_partition_rejects_bad_arguments(kwargs, match):
    arguments = {"scheme": "lang-topic", "num_devices": 2, "heldout_fraction": 0.2, "seed": 0}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        partition(make_slices({("en", "a"): 3, ("en", "b"): 3}), **arguments)


def test_lang_topic_on_the_real_corpus(english):
    devices = partition(english, "lang-topic", num_devices=4, heldout_fraction=0.1, seed=0)
    assert all(d.name.startswith("english/") for d in devices)
    sizes = [len(d.train) + len(d.heldout) for d in devices]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] == max(len(c) for c in english.values())
