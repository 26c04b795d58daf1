"""Distillation: the KL variants by hand, depth pruning, caches, resume, model card, sequence level."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from edgetune import models
from edgetune.config import ConfigError
from edgetune.datasets.public_prompts import public_prompt_set, topic_chunks
from edgetune.server.distill.loss import distill_loss, divergence, teacher_topk
from edgetune.server.distill.model_card import render_model_card
from edgetune.server.distill.prune import PruneError, parse_keep, prune_layers
from edgetune.server.distill.run import DistillConfig, Loaded, distill, make_student, same_vocabulary

P = [0.5, 0.3, 0.2]
Q = [0.2, 0.5, 0.3]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("forward-kl", _kl(P, Q)),  # 0.5 ln 2.5 + 0.3 ln 0.6 + 0.2 ln(2/3) = 0.458145 - 0.153248 - 0.081093 = 0.223804
        ("reverse-kl", _kl(Q, P)),
        ("skew-kl", _kl(P, [0.25 * p + 0.75 * q for p, q in zip(P, Q, strict=True)])),
    ],
)
def test_divergence_matches_hand_formula(kind: str, expected: float) -> None:
    got = divergence(torch.tensor([P]), torch.tensor([Q]), kind, skew=0.25)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_forward_kl_by_hand_value() -> None:
    assert divergence(torch.tensor(P), torch.tensor(Q), "forward-kl").item() == pytest.approx(0.223805, abs=1e-6)


def test_skew_zero_is_forward_and_bad_kind_fails() -> None:
    p, q = torch.tensor(P), torch.tensor(Q)
    assert divergence(p, q, "skew-kl", skew=0.0).item() == pytest.approx(divergence(p, q, "forward-kl").item())
    with pytest.raises(ValueError, match="unknown divergence 'js'"):
        divergence(p, q, "js")


def test_full_vocab_loss_is_exact_softened_kl_plus_ce() -> None:
    torch.manual_seed(0)
    teacher, student = torch.randn(4, 6), torch.randn(4, 6)
    labels = torch.tensor([0, 3, 5, 1])
    t, alpha = 2.0, 0.3
    logp, index = teacher_topk(teacher, k=6, temperature=t)  # k = V: the rest bucket is empty
    loss, kl, ce = distill_loss(student, labels, logp, index, kind="forward-kl", temperature=t, alpha=alpha)
    p, q = torch.softmax(teacher / t, -1), torch.softmax(student / t, -1)
    expected_kl = sum(_kl(p[i].tolist(), q[i].tolist()) for i in range(4)) / 4
    expected_ce = -sum(torch.log_softmax(student, -1)[i, labels[i]].item() for i in range(4)) / 4
    assert kl.item() == pytest.approx(expected_kl, rel=1e-5)
    assert ce.item() == pytest.approx(expected_ce, rel=1e-5)
    assert loss.item() == pytest.approx(alpha * t**2 * expected_kl + (1 - alpha) * expected_ce, rel=1e-5)


@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl", "skew-kl"])
def test_top_k_coarsening_never_exceeds_full_kl(kind: str) -> None:
    torch.manual_seed(1)
    teacher, student, labels = torch.randn(5, 50), torch.randn(5, 50), torch.zeros(5, dtype=torch.long)
    full = distill_loss(student, labels, *teacher_topk(teacher, 50, 1.0), kind=kind, temperature=1.0, alpha=1.0)[1]
    top8 = distill_loss(student, labels, *teacher_topk(teacher, 8, 1.0), kind=kind, temperature=1.0, alpha=1.0)[1]
    assert 0.0 <= top8.item() <= full.item() + 1e-6


def test_parse_keep_specs() -> None:
    assert parse_keep("half", 30) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert parse_keep("every:3", 10) == [0, 3, 6, 9]
    assert parse_keep("first:2", 6) == [0, 1, 5]
    assert parse_keep("0,2-3,5", 8) == [0, 2, 3, 5]
    with pytest.raises(PruneError, match=r"layers \[9\] do not exist"):
        parse_keep("0,9", 4)
    with pytest.raises(PruneError, match="keeps all 2 layers"):
        parse_keep("0,1", 2)
    with pytest.raises(PruneError, match="'x' is not a layer id"):
        parse_keep("0,x", 4)


def test_pruning_copies_the_kept_layers(tiny_model: torch.nn.Module) -> None:
    student = prune_layers(tiny_model, [1])
    assert student.config.num_hidden_layers == 1 and tiny_model.config.num_hidden_layers == 2
    kept, source = student.model.layers[0], tiny_model.model.layers[1]
    for (name, a), (_, b) in zip(kept.state_dict().items(), source.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert kept.self_attn.layer_idx == 0
    assert torch.equal(student.model.embed_tokens.weight, tiny_model.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, tiny_model.model.norm.weight)
    assert student.lm_head.weight is student.model.embed_tokens.weight  # tied, like the teacher
    assert student.model.embed_tokens.weight.data_ptr() != tiny_model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 100, (1, 12))
    assert student(ids).logits.shape == (1, 12, tiny_model.config.vocab_size)


def test_public_prompt_set_is_split_and_chat_shaped() -> None:
    train, held = public_prompt_set()
    assert len(held) * 9 <= len(train) <= len(held) * 10
    assert not {json.dumps(c) for c in train} & {json.dumps(c) for c in held}
    assert [m["role"] for m in train[0]] == ["user", "assistant"]
    assert [len(c) for c in topic_chunks("a" * 50 + "\n\n" + "b" * 50, max_chars=80)] == [50, 50]


def _data(tmp_path: Path, n: int = 12) -> Path:
    path = tmp_path / "data.jsonl"
    lines = [json.dumps({"prompt": f"q{i}?", "response": f"answer number {i} is {i * 7}."}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _cfg(tmp_path: Path, out: str, **kw: object) -> DistillConfig:
    base = {"out": tmp_path / out, "teacher": "tiny", "student": "prune:1", "data": str(_data(tmp_path)),
            "steps": 5, "batch_size": 4, "max_length": 128, "precision": "fp32", "warmup": 1,
            "cache_dir": tmp_path / "cache", "lr": 1e-2}  # fmt: skip
    return DistillConfig(**{**base, **kw})


def _run(cfg: DistillConfig, teacher: Loaded | None = None, **hooks: object) -> tuple[dict, torch.nn.Module]:
    teacher = teacher or models.load_base("tiny")
    student, shape = make_student(cfg.student, teacher, models.load_base)
    return distill(cfg, teacher, student, shape, **hooks), student[0]


def test_cache_means_no_teacher_in_later_epochs_or_runs(tmp_path: Path) -> None:
    calls = {"n": 0, "in_training": 0, "training": False}

    def on_call() -> None:
        calls["n"] += 1
        calls["in_training"] += calls["training"]

    def on_step(step: int) -> None:
        calls["training"] = True

    summary, _ = _run(_cfg(tmp_path, "a", steps=0, epochs=3), on_teacher_call=on_call, on_step=on_step)
    assert calls == {"n": 3, "in_training": 0, "training": True}  # 11 train examples, batches of 4: one pass
    assert summary["steps"] == 9 and len(summary["epoch_seconds"]) == 3
    calls["n"] = 0
    _run(_cfg(tmp_path, "b", steps=0, epochs=3), on_teacher_call=on_call)
    assert calls["n"] == 0  # same teacher, data and settings: read from the cache


def test_resume_gives_the_uninterrupted_result(tmp_path: Path) -> None:
    _, straight = _run(_cfg(tmp_path, "straight", checkpoint_every=2))

    def crash(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(tmp_path, "resumed", checkpoint_every=2), on_step=crash)
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000002" / "optimizer.safetensors").is_file()
    with pytest.raises(ConfigError, match="not empty"):
        _run(_cfg(tmp_path, "resumed", checkpoint_every=2))
    with pytest.raises(ConfigError, match="other settings"):
        _run(_cfg(tmp_path, "resumed", checkpoint_every=2, resume=True, lr=5e-3))
    summary, resumed = _run(_cfg(tmp_path, "resumed", checkpoint_every=2, resume=True))
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert summary["steps"] == 5 and not (tmp_path / "resumed" / "checkpoints").exists()


def test_output_folder_and_model_card(tmp_path: Path) -> None:
    summary, _ = _run(_cfg(tmp_path, "out", loss="skew-kl", skew=0.2, temperature=2.0))
    out = tmp_path / "out"
    card = (out / "README.md").read_text()
    for text in ("`tiny`", "depth-pruned teacher (prune:1)", "| layers | 1 of 2 |", "| layers kept | 1 |",
                 "| loss | skew-kl |", "| skew | 0.2000 |", "| temperature T | 2.0000 |", "| teacher top-k | 64 |",
                 f"| student held-out loss after | {summary['student_heldout_loss_after']:.4f} |",
                 "teacher held-out loss", "student speed-up", str(tmp_path / "data.jsonl")):  # fmt: skip
        assert text in card, text
    assert json.loads((out / "distill.json").read_text())["settings"]["loss"] == "skew-kl"
    model, tokenizer = models.load_base(str(out))  # a plain Hugging Face folder
    assert model.config.num_hidden_layers == 1 and len(tokenizer) == len(models.tiny_tokenizer())


def test_model_card_renders_every_section() -> None:
    card = render_model_card(teacher="t", shape={"layers": 3}, data={"source": "s"}, loss={"alpha": 0.5},
                             evaluation={"loss": 1.23456})  # fmt: skip
    for text in (
        "## Teacher",
        "## Student",
        "| layers | 3 |",
        "| source | s |",
        "| alpha | 0.5000 |",
        "| loss | 1.2346 |",
    ):
        assert text in card


def test_sequence_level_with_a_different_tokenizer(tmp_path: Path) -> None:
    tokenizer = models.tiny_tokenizer()
    tokenizer.add_tokens(["<teacher-only>"])
    teacher = (models.tiny_llama(len(tokenizer), seed=1), tokenizer)
    assert not same_vocabulary(tokenizer, models.tiny_tokenizer())
    cfg = _cfg(tmp_path, "seq", student="tiny", loss="seq", max_new_tokens=6, steps=2)
    with pytest.raises(ConfigError, match="use --loss seq"):
        _run(_cfg(tmp_path, "kl", student="tiny"), teacher=teacher)
    calls = []
    summary, _ = _run(cfg, teacher=teacher, on_teacher_call=lambda: calls.append(1))
    assert len(calls) == 11  # one generation per training prompt
    (generations,) = (tmp_path / "cache").glob("*/generations.jsonl")
    first = json.loads(generations.read_text().splitlines()[0])["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"] and first[0]["content"] == "q0?"
    assert math.isfinite(summary["student_heldout_loss_after"])
    calls.clear()
    _run(_cfg(tmp_path, "seq2", student="tiny", loss="seq", max_new_tokens=6, steps=2), teacher=teacher,
         on_teacher_call=lambda: calls.append(1))  # fmt: skip
    assert calls == []


def test_cli_exit_codes(tmp_path: Path) -> None:
    from edgetune.cli import main

    common = ["distill", "--teacher", "tiny", "--data", str(_data(tmp_path)), "--cache-dir", str(tmp_path / "c")]
    assert main([*common, "--student", "prune:0,7", "--out", str(tmp_path / "a")]) == 2  # no layer 7
    assert main([*common, "--loss", "kl", "--out", str(tmp_path / "b")]) == 2
    ok = ["--student", "prune:0", "--steps", "1", "--max-length", "128", "--out", str(tmp_path / "ok")]
    assert main([*common, *ok]) == 0
    assert (tmp_path / "ok" / "model.safetensors").is_file()
