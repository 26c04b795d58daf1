"""Answer-quality evaluation: generation, baselines' budgets, the verdict, and ``edgetune eval`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from edgetune import models, wire
from edgetune.adapters.lora import attach_lora, get_adapter, init_adapter, model_adapter_shapes
from edgetune.chat import tokenize_conversation
from edgetune.cli import main
from edgetune.config import LoraConfig, RunConfig, TrainConfig
from edgetune.datasets.devices import TokenizedDevice
from edgetune.server.eval_report import eval_table, verdict
from edgetune.simulations import baselines
from edgetune.simulations.answers import generate_ids, heldout_questions
from edgetune.simulations.evaluate_run import EvalError, read_run


def _chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def test_heldout_questions_prompt_is_everything_before_the_last_answer() -> None:
    long = [*_chat("hi", "hello"), *_chat("how are you", "fine")]
    (q1, q2) = heldout_questions([long, _chat("2+2?", "4")])
    assert q1.prompt == long[:3] and q1.reference == "fine"
    assert q2.prompt == _chat("2+2?", "4")[:1] and q2.reference == "4"


def test_batched_left_padded_generation_equals_one_prompt_at_a_time() -> None:
    tokenizer = models.tiny_tokenizer()
    model = models.tiny_llama(len(tokenizer), seed=2)
    with torch.no_grad():  # larger weights: the random model then says more than newlines
        for p in model.parameters():
            p.mul_(4)
    prompts = [[{"role": "user", "content": q}] for q in ("hi", "what is a long question here?", "x")]
    batched = generate_ids(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    assert batched == [generate_ids(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert [len(r) for r in batched] == [8, 8, 3]  # the third stops at its end-of-turn token
    assert batched[2][-1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate_ids(model, tokenizer, prompts, max_new_tokens=0, batch_size=1)


def test_federated_steps_count_accepted_training_replies() -> None:
    rows = [
        {"round": 0, "per_device": {"sim-0": {"eval_loss": 2.0}, "sim-1": {"eval_loss": 2.0}}},
        {"round": 1, "per_device": {"sim-0": {"train_loss": 1.0, "eval_loss": 1.5}, "sim-1": {"eval_loss": 1.6}}},
        {"round": 2, "per_device": {"sim-0": {"train_loss": 1.0}, "sim-1": {"train_loss": 1.0}, "sim-9": {}}},
    ]
    assert baselines.federated_steps(rows, num_devices=3, local_steps=5) == [10, 5, 0]


@pytest.fixture
def two_devices(tiny_tokenizer) -> list[TokenizedDevice]:  # noqa: ANN001 - conftest fixture
    def device(name: str, n: int) -> TokenizedDevice:
        train = [tokenize_conversation(tiny_tokenizer, _chat(f"q{name}{i}", f"a{i}"), 128) for i in range(n)]
        return TokenizedDevice(name, train, train[:1])

    return [device("x", 5), device("y", 2)]


def test_baselines_use_exactly_the_stated_budgets(tiny_model, two_devices) -> None:  # noqa: ANN001
    cfg = RunConfig(seed=3, lora=LoraConfig(rank=4), train=TrainConfig(local_steps=2, batch_size=3, precision="fp32"))
    model = attach_lora(tiny_model, cfg.lora)
    start = init_adapter(model_adapter_shapes(model), cfg.seed)
    # device x (5 conversations): 4 steps of batch 3 -> 12 conversations drawn
    local = baselines.local_only(model, two_devices[0], 4, start, cfg, pad_id=0)
    assert (local.steps, local.examples) == (4, 12)
    # device y has 2 < batch 3 conversations: every batch holds both -> 3 steps, 6 drawn
    small = baselines.local_only(model, two_devices[1], 3, start, cfg, pad_id=0)
    assert (small.steps, small.examples) == (3, 6)
    # centralised: the union (7 conversations) for the total 4 + 3 = 7 steps -> 21 drawn
    central = baselines.centralised(model, two_devices, 7, start, cfg, pad_id=0)
    assert (central.steps, central.examples) == (7, 21)
    personal = baselines.personalised(model, two_devices[0], 2, local.state, cfg, pad_id=0)
    assert (personal.steps, personal.examples) == (2, 6)
    for trained, begin in ((local, start), (central, start), (personal, local.state)):
        a_names = [k for k in begin if ".lora_A." in k]
        b_names = [k for k in begin if ".lora_B." in k]
        assert all(torch.equal(trained.state[k], begin[k]) for k in a_names)  # A frozen
        assert any(not torch.equal(trained.state[k], begin[k]) for k in b_names)  # B trained
        assert math.isfinite(trained.loss)
    again = baselines.local_only(model, two_devices[0], 4, start, cfg, pad_id=0)
    assert all(torch.equal(again.state[k], local.state[k]) for k in local.state)  # same seed, same adapter
    none = baselines.train_adapter(model, start, two_devices[0].train, 0, cfg, seed=0, pad_id=0)
    assert (none.steps, none.examples) == (0, 0) and all(torch.equal(none.state[k], start[k]) for k in start)
    assert get_adapter(model)  # the model still holds an adapter


def _cell(rouge: float, loss: float = 2.0) -> dict:
    metric = {"mean": rouge, "low": rouge - 0.1, "high": rouge + 0.1}
    return {"rouge_l": metric, "exact_match": metric, "token_f1": metric, "eval_loss": loss, "questions": 4}


def _results(table: dict[str, tuple[float, float, float]]) -> dict:
    variants = ["base", "global", "local-only", "centralised"]
    devices = list(table)
    scores = {}
    for j, v in enumerate(variants):
        per = {d: _cell(table[d][j] if j < 3 else 0.5) for d in devices}
        overall = sum(table[d][j] if j < 3 else 0.5 for d in devices) / len(devices)
        scores[v] = {"devices": per, "overall": _cell(overall)}
    return {"devices": devices, "variants": variants, "scores": scores, "settings": {"confidence": 0.95}}


def test_verdict_counts_wins_and_compares_with_centralised() -> None:
    # (base, global, local-only) per device; centralised 0.5 everywhere
    results = _results({"a": (0.1, 0.4, 0.3), "b": (0.1, 0.3, 0.4), "c": (0.1, 0.5, 0.2)})
    # gains over local-only: +0.1, -0.1, +0.3 -> 2 of 3, mean +0.1; global 0.4 / centralised 0.5 = 80%
    assert verdict(results).startswith(
        "federation beat local-only on 2 of 3 devices (mean ROUGE-L +0.100), reached 80% of centralised "
        "(ROUGE-L 0.400 vs 0.500; base 0.100)"
    )
    table = eval_table(results)
    assert "0.400 [0.300, 0.500]" in table and table.splitlines()[-4].startswith("overall")
    results["variants"] = ["base", "global"]
    assert verdict(results).startswith("the global adapter beat the base model on 3 of 3 devices (ROUGE-L 0.400 vs")


def test_eval_of_a_missing_or_non_run_folder_fails_in_one_line(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    with pytest.raises(EvalError, match="no such folder"):
        read_run(tmp_path / "missing")
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert main(["eval", str(tmp_path)]) == 2
    (tmp_path / wire.CONFIG_FILE).write_text("{}")
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"edgetune: {tmp_path / 'missing'}: no such folder",
        f"edgetune: {tmp_path}: no {wire.CONFIG_FILE}, so it is not a run folder",
        f"edgetune: {tmp_path}: no final adapter ({wire.ADAPTER_DIR}/); did the run complete?",
    ]


@pytest.mark.e2e
def test_eval_of_a_two_round_tiny_run_writes_table_json_and_plot(tmp_path: Path) -> None:
    run = tmp_path / "run"
    tiny = ["--base", "tiny", "--rounds", "2", "--devices", "2", "--steps", "2", "--batch-size", "4", "--seed", "5"]
    settings = ["lora.rank=4", "data.max-length=128", "data.max-eval-examples=4", "eval.enabled=true"]
    settings += ["eval.max-new-tokens=4", "eval.bootstrap=50"]
    assert main(["simulate", *tiny, "--run-dir", str(run), *[a for s in settings for a in ("--set", s)]]) == 0
    # eval.enabled: the simulation ended with the base-vs-global evaluation
    after_run = json.loads((run / wire.EVAL_JSON).read_text())
    assert after_run["variants"] == ["base", "global"]
    assert after_run["settings"]["precision"] in ("bf16", "fp32")  # resolved as the devices did, never "auto"
    assert main(["eval", str(run), "--baselines", "--max-new-tokens", "4", "--bootstrap", "50"]) == 0
    results = json.loads((run / wire.EVAL_JSON).read_text())
    assert (run / wire.EVAL_PLOT).stat().st_size > 0
    text = (run / wire.EVAL_TEXT).read_text()
    assert text.startswith("federation beat local-only on ") and "overall" in text
    assert results["variants"] == ["base", "global", "local-only", "centralised", "personalised"]
    names = results["devices"]
    assert len(names) == 2
    budgets = results["budgets"]
    assert budgets["federated"] == {d: 4 for d in names}  # 2 rounds x 2 local steps, every device every round
    assert {d: b["steps"] for d, b in budgets["local-only"].items()} == {d: 4 for d in names}
    assert budgets["centralised"]["steps"] == 8 and budgets["centralised"]["examples"] == 32
    assert all(b["steps"] == 2 for b in budgets["personalised"].values())
    for variant in results["variants"]:
        overall = results["scores"][variant]["overall"]
        assert overall["questions"] == 8  # 4 held-out questions on each of the 2 devices
        assert overall["rouge_l"]["low"] <= overall["rouge_l"]["mean"] <= overall["rouge_l"]["high"]
        assert all(len(results["answers"][d]["by_variant"][variant]) == 4 for d in names)
    # the base variant's held-out loss is the run's round-0 loss (same examples, same loop)
    first = json.loads((run / wire.METRICS_FILE).read_text().splitlines()[0])
    assert results["scores"]["base"]["overall"]["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-4)
    # --data: the same evaluation on a user's own JSONL devices (one file per device)
    own = tmp_path / "own"
    own.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        lines = [json.dumps({"prompt": f"{name} question {i}?", "response": f"answer {i}"}) for i in range(5)]
        (own / name).write_text("\n".join(lines) + "\n")
    out = tmp_path / "own-eval"
    args = ["--data", str(own), "--max-new-tokens", "2", "--bootstrap", "20", "--out", str(out)]
    assert main(["eval", str(run), *args]) == 0
    mine = json.loads((out / wire.EVAL_JSON).read_text())
    assert mine["devices"] == ["a.jsonl", "b.jsonl"] and mine["data"] == str(own)
    assert mine["scores"]["global"]["overall"]["questions"] == 2  # 20% of 5 held out per device
    assert main(["eval", str(run), "--data", str(tmp_path / "nothing.jsonl")]) == 2
