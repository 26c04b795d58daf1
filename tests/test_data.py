"""Tests for edgetune/chat.py: JSONL loading, chat tokenization with assistant-only labels,
packing, collation and batching.

The tokenizer is a tiny byte-level BPE trained in code with SmolLM2's ChatML template, so
the tests exercise real ``apply_chat_template`` behaviour without the real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from edgetune.chat import (
    IGNORE_INDEX,
    ChatTemplateError,
    DataError,
    Messages,
    collate,
    count_label_tokens,
    iterate_batches,
    load_jsonl,
    pack,
    pack_rows,
    tokenize_conversation,
)

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Generation prompt ends in a space that BPE merges into the next word: token prefixes break.
SPACE_PROMPT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
# Renders only the last message, so earlier turns are not a prefix of later ones.
LAST_ONLY_TEMPLATE = (
    "{{ messages[-1]['role'] + ': ' + messages[-1]['content'] + '<|im_end|>' }}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
CORPUS = [
    "hello world, how are you today?",
    "I am fine, thank you. What is AI?",
    "Artificial intelligence is the science of making machines think.",
    "system user assistant helpful named trained by Hugging Face",
]


def build_tokenizer(chat_template: str = SMOLLM2_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ChatML special tokens, trained on a few sentences."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def labelled_runs(tokenizer: PreTrainedTokenizerFast, labels: list[int]) -> list[str]:
    """Decode each maximal run of supervised labels."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def chat(*turns: str, system: str | None = None) -> Messages:
    """Alternating user/assistant messages, optionally after a system message."""
    head = [{"role": "system", "content": system}] if system is not None else []
    roles = ("user", "assistant")
    return head + [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


# --- tokenize_conversation ------------------------------------------------------------------


def test_labels_are_assistant_content_plus_end_of_turn(tokenizer: PreTrainedTokenizerFast):
    messages = chat("What is AI?", "Machines that think.")
    example = tokenize_conversation(tokenizer, messages, max_length=512)

    expected_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert example["input_ids"] == expected_ids
    assert len(example["labels"]) == len(example["input_ids"])
    assert labelled_runs(tokenizer, example["labels"]) == ["Machines that think.<|im_end|>"]
    # The trailing newline after <|im_end|> is template glue, not supervised.
    assert example["labels"][-1] == IGNORE_INDEX
    assert tokenizer.decode(example["input_ids"][-1:]) == "\n"
    supervised = [(i, t) for i, t in zip(example["input_ids"], example["labels"], strict=True) if t != -100]
    assert all(i == t for i, t in supervised)


def test_every_assistant_turn_is_labelled(tokenizer: PreTrainedTokenizerFast):
    messages = chat("hi", "hello", "how are you?", "fine, thank you", system="Be brief.")
    example = tokenize_conversation(tokenizer, messages, max_length=512)
    runs = labelled_runs(tokenizer, example["labels"])
    assert runs == ["hello<|im_end|>", "fine, thank you<|im_end|>"]
    assert count_label_tokens(example) == sum(len(tokenizer.encode(r)) for r in runs)


def test_truncation_keeps_a_prefix(tokenizer: PreTrainedTokenizerFast):
    messages = chat("What is AI?", "Artificial intelligence.")
    full = tokenize_conversation(tokenizer, messages, max_length=512)
    short = tokenize_conversation(tokenizer, messages, max_length=len(full["input_ids"]) - 3)
    assert short["input_ids"] == full["input_ids"][:-3]
    assert short["labels"] == full["labels"][:-3]
    tiny = tokenize_conversation(tokenizer, messages, max_length=4)
    assert len(tiny["input_ids"]) == 4
    assert count_label_tokens(tiny) == 0


def test_fallback_when_tokens_merge_across_the_turn_boundary():
    tokenizer = build_tokenizer(SPACE_PROMPT_TEMPLATE)
    messages = chat("hi", "hello")
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert full[: len(prompt)] != prompt  # the token-prefix path cannot be used here

    example = tokenize_conversation(tokenizer, messages, max_length=512)
    assert example["input_ids"] == full
    # The token that straddles the boundary (" hello") is supervised.
    assert labelled_runs(tokenizer, example["labels"]) == [" hello<|im_end|>"]


def test_template_that_rewrites_history_is_rejected():
    tokenizer = build_tokenizer(LAST_ONLY_TEMPLATE)
    with pytest.raises(ChatTemplateError, match="assistant turn 1"):
        tokenize_conversation(tokenizer, chat("hi", "hello"), max_length=512)


@pytest.mark.parametrize(
    ("messages", "max_length", "match"),
    [
        (chat("hi", "hello"), 0, "max_length must be at least 1, got 0"),
        (chat("hi"), 16, "no assistant turn"),
        ([{"role": "assistant", "content": "x"}], 16, "starts with an assistant"),
        ([{"role": "robot", "content": "x"}], 16, "unknown role 'robot'"),
    ],
)
def test_tokenize_rejects_bad_input(tokenizer, messages, max_length, match):
    with pytest.raises(ValueError, match=match):
        tokenize_conversation(tokenizer, messages, max_length)


# --- pack, collate, batches -----------------------------------------------------------------

examples_strategy = st.lists(
    st.lists(st.tuples(st.integers(0, 50), st.sampled_from([IGNORE_INDEX, 1, 2])), max_size=12),
    max_size=8,
).map(lambda rows: [{"input_ids": [i for i, _ in r], "labels": [t for _, t in r]} for r in rows])


@given(examples=examples_strategy, block_size=st.integers(1, 16))
def test_pack_preserves_the_token_stream(examples, block_size):
    blocks = pack(examples, block_size)
    pairs = [p for e in examples for p in zip(e["input_ids"], e["labels"], strict=True)]
    packed = [p for b in blocks for p in zip(b["input_ids"], b["labels"], strict=True)]
    if len(pairs) <= block_size:
        assert packed == pairs
        assert len(blocks) == (1 if pairs else 0)
    else:
        assert len(blocks) == len(pairs) // block_size
        assert all(len(b["input_ids"]) == len(b["labels"]) == block_size for b in blocks)
        assert packed == pairs[: len(packed)]


def test_pack_drops_only_a_trailing_partial_block():
    examples = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [4, 5, 6, 7], "labels": [4, 5, 6, 7]},
    ]
    assert pack(examples, 3) == [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [4, 5, 6], "labels": [4, 5, 6]},
    ]
    assert pack(examples[:1], 8) == examples[:1]
    with pytest.raises(ValueError, match="block_size must be at least 1, got 0"):
        pack(examples, 0)
    with pytest.raises(ValueError, match="2 input_ids but 1 labels"):
        pack([{"input_ids": [1, 2], "labels": [1]}], 2)


def test_collate_right_pads():
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
        pad_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert count_label_tokens(batch) == 3
    with pytest.raises(ValueError, match="at least one example"):
        collate([], pad_id=0)


def test_pack_rows_lays_examples_end_to_end_in_fewer_rows():
    examples = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, 4, 5]},
        {"input_ids": [6, 7], "labels": [-100, 7]},
        {"input_ids": [8, 9, 10], "labels": [8, 9, 10]},
    ]
    batch = collate(examples, pad_id=0)
    packed = pack_rows(batch)
    # Longest first: [5] alone, then 3 and 2 share a row of the batch's width.
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5], [8, 9, 10, 6, 7]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    # An example's first token is never predicted, packed or not: its label goes.
    assert packed["labels"].tolist() == [[-100, 2, 3, 4, 5], [-100, 9, 10, -100, 7]]
    assert packed["attention_mask"].sum() == batch["attention_mask"].sum() == 10
    assert count_label_tokens(packed) == count_label_tokens(batch) - 1  # only the first, unused label
    # Room left at a row's end continues the last example's positions.
    tail = pack_rows(collate([*examples, {"input_ids": [11], "labels": [11]}], pad_id=0))
    assert tail["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert tail["attention_mask"][2].tolist() == [1, 0, 0, 0, 0]
    # Nothing to gain: the batch itself.
    same = collate(examples[:2], pad_id=0)
    assert pack_rows(same) is same


def numbered(n: int) -> list[dict[str, list[int]]]:
    """Example k is the single token k, so a batch's ids say which examples it holds."""
    return [{"input_ids": [k], "labels": [k]} for k in range(n)]


def test_iterate_batches_is_deterministic_and_covers_each_epoch():
    first = [b["input_ids"].flatten().tolist() for b in iterate_batches(numbered(6), 2, 9, 7, 0)]
    again = [b["input_ids"].flatten().tolist() for b in iterate_batches(numbered(6), 2, 9, 7, 0)]
    other = [b["input_ids"].flatten().tolist() for b in iterate_batches(numbered(6), 2, 9, 8, 0)]
    assert len(first) == 9 and all(len(b) == 2 for b in first)
    assert first == again and first != other
    for epoch in range(3):
        seen = [k for batch in first[3 * epoch : 3 * epoch + 3] for k in batch]
        assert sorted(seen) == [0, 1, 2, 3, 4, 5]
    assert first[:3] != first[3:6]  # reshuffled between epochs


def test_iterate_batches_uses_every_example_when_fewer_than_batch_size():
    batches = list(iterate_batches(numbered(3), batch_size=8, steps=4, seed=0, pad_id=0))
    assert len(batches) == 4
    assert all(sorted(b["input_ids"].flatten().tolist()) == [0, 1, 2] for b in batches)
    assert list(iterate_batches(numbered(3), 2, steps=0, seed=0, pad_id=0)) == []


@pytest.mark.parametrize(
    ("n", "batch_size", "steps", "match"),
    [(0, 2, 1, "at least one example"), (3, 0, 1, "batch_size"), (3, 2, -1, "steps")],
)
def test_iterate_batches_validates_at_call_time(n, batch_size, steps, match):
    with pytest.raises(ValueError, match=match):
        iterate_batches(numbered(n), batch_size, steps, seed=0, pad_id=0)


# --- load_jsonl -----------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_reads_both_formats_and_skips_blank_lines(tmp_path: Path):
    conversation = chat("hi", "hello", system="Be kind.")
    path = write_lines(
        tmp_path / "data.jsonl",
        [
            json.dumps({"messages": conversation}),
            "",
            "   ",
            json.dumps({"prompt": "a", "response": "b"}),
        ],
    )
    assert load_jsonl(path) == [conversation, chat("a", "b")]
    assert load_jsonl(str(path)) == load_jsonl(path)


text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)


@settings(max_examples=30)
@given(st.lists(st.tuples(text, text).map(lambda qa: chat(*qa)), min_size=1, max_size=5))
def test_load_jsonl_round_trips(tmp_path_factory, conversations):
    path = tmp_path_factory.mktemp("jsonl") / "data.jsonl"
    write_lines(path, [json.dumps({"messages": c}) for c in conversations])
    assert load_jsonl(path) == conversations


GOOD = json.dumps({"prompt": "q", "response": "a"})


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"prompt": "q", "response": ', "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"prompt": "q"}', r"keys \['prompt'\]"),
        ('{"prompt": "q", "response": "a", "id": 3}', "keys"),
        ('{"prompt": 1, "response": "a"}', "'prompt' must be a string, got int"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "user"}]}', "exactly 'role' and 'content'"),
        ('{"messages": [{"role": "user", "content": 5}]}', "content must be a string, got int"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "unknown role 'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', "starts with an assistant"),
    ],
)
def test_load_jsonl_names_the_bad_line(tmp_path: Path, bad_line: str, problem: str):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, "", bad_line, GOOD])
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{problem}"):
        load_jsonl(path)


def test_load_jsonl_file_level_errors(tmp_path: Path):
    with pytest.raises(DataError, match=r"missing\.jsonl: data file not found"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no conversations"):
        load_jsonl(write_lines(tmp_path / "empty.jsonl", ["", ""]))
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(GOOD.encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"binary\.jsonl:2: not valid UTF-8"):
        load_jsonl(binary)
