"""``edgetune eval``'s work: answer quality of a finished run against the base model and baselines.

    read_run       the run's resolved config and metrics; a one-line EvalError if RUN is not one
    evaluate_run   every variant on every device's held-out questions -> the results dict

Variants (``server.eval_report.VARIANTS``): ``base`` (the version-0 adapter: A from the run
seed, B = 0, so B A = 0 and the model is exactly the base model), ``global`` (the run's
``adapter/``), and with baselines ``local-only``, ``centralised`` and ``personalised``
(``simulations/baselines.py``). Devices, partition, held-out split and seed come from the
run's ``config.json``, so the held-out questions are exactly those the run evaluated each
round (the first ``data.max-eval-examples`` of each split); ``data_source`` swaps in a user's
own JSONL file or folder of files instead. Prompts are the plain questions (no RAG context,
no audit canaries).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgetune import wire
from edgetune.adapters.lora import device_model, init_adapter, model_adapter_shapes
from edgetune.adapters.peft_io import load_adapter
from edgetune.config import ConfigError, RunConfig, from_flat
from edgetune.datasets.devices import device_conversations, tokenized_device
from edgetune.lm import pad_id
from edgetune.precision import resolve_run
from edgetune.server.answer_metrics import METRICS, bootstrap_ci
from edgetune.server.eval_report import VARIANTS, verdict
from edgetune.server.metrics import read_metrics
from edgetune.simulations import baselines
from edgetune.simulations.answers import heldout_questions, score_variant

__all__ = ["EvalError", "evaluate_run", "read_run"]

Progress = Callable[[str], None]


class EvalError(ValueError):
    """RUN is not a finished run folder, or its data cannot be evaluated (the message says why)."""


def read_run(run_dir: Path) -> tuple[RunConfig, list[dict]]:
    """The resolved config and the metrics lines of a finished run.

    Raises:
        EvalError: no such folder, no ``config.json`` (not a run folder), an unreadable
            config, or no ``adapter/`` (the run did not complete).
    """
    if not run_dir.is_dir():
        raise EvalError(f"{run_dir}: no such folder")
    config_path = run_dir / wire.CONFIG_FILE
    if not config_path.is_file():
        raise EvalError(f"{run_dir}: no {wire.CONFIG_FILE}, so it is not a run folder")
    try:
        cfg = resolve_run(from_flat(json.loads(config_path.read_text(encoding="utf-8"))))  # precision for this CPU
    except (ValueError, ConfigError) as err:
        raise EvalError(f"{config_path}: unreadable run config ({err})") from None
    if not (run_dir / wire.ADAPTER_DIR).is_dir():
        raise EvalError(f"{run_dir}: no final adapter ({wire.ADAPTER_DIR}/); did the run complete?")
    return cfg, read_metrics(run_dir)


def _cell(raw: Sequence[dict[str, Any]], cfg: RunConfig) -> dict[str, Any]:
    """Means with bootstrap CIs over all questions of ``raw`` (one or more devices' scores)."""
    cell: dict[str, Any] = {}
    for metric in METRICS:
        values = [v for r in raw for v in r[metric]]
        low, high = bootstrap_ci(values, cfg.eval.confidence, cfg.eval.bootstrap, cfg.seed)
        cell[metric] = {"mean": sum(values) / len(values), "low": low, "high": high}
    tokens = sum(r["eval_tokens"] for r in raw)
    cell["eval_loss"] = sum(r["eval_loss"] * r["eval_tokens"] for r in raw) / tokens if tokens else float("nan")
    cell["eval_tokens"] = tokens
    cell["questions"] = sum(len(r["rouge_l"]) for r in raw)
    return cell


def _budget(trained: baselines.Trained) -> dict[str, int]:
    return {"steps": trained.steps, "examples": trained.examples}


def evaluate_run(
    run_dir: Path,
    cfg: RunConfig,
    rows: Sequence[dict],
    with_baselines: bool,
    data_source: str | None = None,
    progress: Progress = print,
) -> dict[str, Any]:
    """Score every variant on every device's held-out questions (see the module docstring).

    Args:
        run_dir: The run folder (its ``adapter/`` is the global adapter).
        cfg: The run's config (``read_run``), with the ``eval`` settings to use.
        rows: The run's metrics lines (the local-only budgets come from them).
        with_baselines: Also train and score local-only, centralised and personalised.
        data_source: A JSONL file or folder of JSONL files replacing the run's device data.
        progress: Called with one line per finished step.

    Raises:
        EvalError: baselines asked for a run that recorded no accepted training reply.
    """
    start_time = time.perf_counter()
    cfg = resolve_run(cfg)  # the precision the run's devices used on this CPU (never ``auto``)
    data = cfg.data if data_source is None else dataclasses.replace(cfg.data, source=data_source)
    n, ev = cfg.federation.num_devices, cfg.eval
    model, tokenizer = device_model(cfg.model.base, cfg.lora, cfg.model.quantize)
    pad = pad_id(tokenizer)
    conversations = [device_conversations(data, "", i, n, cfg.seed) for i in range(n)]
    devices = [tokenized_device(data, "", i, n, cfg.seed, tokenizer) for i in range(n)]
    questions = [heldout_questions(c.heldout[: data.max_eval_examples]) for c in conversations]
    names = [c.name for c in conversations]
    base_state = init_adapter(model_adapter_shapes(model), cfg.seed)
    global_state = {**base_state, **load_adapter(run_dir / wire.ADAPTER_DIR)}
    variants = list(VARIANTS if with_baselines else VARIANTS[:2])
    personal_steps = ev.personal_steps or cfg.train.local_steps
    fed_steps = baselines.federated_steps(rows, n, cfg.train.local_steps)
    budgets: dict[str, Any] = {
        "batch_size": cfg.train.batch_size,
        "federated": dict(zip(names, fed_steps, strict=True)),
    }
    central_state = None
    if with_baselines:
        if sum(fed_steps) == 0:
            raise EvalError(f"{run_dir}: metrics record no accepted training reply, so baselines have no budget")
        pooled = sum(len(d.train) for d in devices)
        progress(f"[centralised] training on {pooled} pooled conversations, {sum(fed_steps)} steps")
        trained = baselines.centralised(model, devices, sum(fed_steps), base_state, cfg, pad)
        central_state, budgets["centralised"] = trained.state, _budget(trained)
        budgets["local-only"], budgets["personalised"] = {}, {}
    raw: dict[str, dict[str, dict[str, Any]]] = {v: {} for v in variants}

    def score(variant: str, i: int, state: dict) -> None:
        raw[variant][names[i]] = score_variant(
            model,
            tokenizer,
            state,
            questions[i],
            devices[i],
            max_new_tokens=ev.max_new_tokens,
            batch_size=ev.batch_size,
            loss_batch_size=cfg.train.batch_size,
            precision=cfg.train.precision,
            max_prompt_tokens=data.max_length,
        )
        r = raw[variant][names[i]]
        mean = sum(r["rouge_l"]) / max(len(r["rouge_l"]), 1)
        progress(f"[{variant}] {names[i]} ({i + 1}/{n}): ROUGE-L {mean:.3f}, held-out loss {r['eval_loss']:.4f}")

    for i in range(n):
        score("base", i, base_state)
        score("global", i, global_state)
        if not with_baselines:
            continue
        local = baselines.local_only(model, devices[i], fed_steps[i], base_state, cfg, pad)
        budgets["local-only"][names[i]] = _budget(local)
        score("local-only", i, local.state)
        assert central_state is not None
        score("centralised", i, central_state)
        personal = baselines.personalised(model, devices[i], personal_steps, global_state, cfg, pad)
        budgets["personalised"][names[i]] = _budget(personal)
        score("personalised", i, personal.state)

    results: dict[str, Any] = {
        "run": str(run_dir),
        "base": cfg.model.base,
        "data": data.source,
        "devices": names,
        "variants": variants,
        "settings": {
            "max_new_tokens": ev.max_new_tokens,
            "batch_size": ev.batch_size,
            "personal_steps": personal_steps,
            "bootstrap": ev.bootstrap,
            "confidence": ev.confidence,
            "precision": cfg.train.precision,
            "max_questions": data.max_eval_examples,
            "seed": cfg.seed,
        },
        "budgets": budgets,
        "scores": {
            v: {"devices": {d: _cell([raw[v][d]], cfg) for d in names}, "overall": _cell(list(raw[v].values()), cfg)}
            for v in variants
        },
        "answers": {
            d: {
                "questions": [q.prompt[-1]["content"] for q in questions[i]],
                "references": [q.reference for q in questions[i]],
                "by_variant": {v: raw[v][d]["answers"] for v in variants},
            }
            for i, d in enumerate(names)
        },
    }
    results["verdict"] = verdict(results)
    results["seconds"] = time.perf_counter() - start_time
    return results
