"""Malicious devices against each aggregator: how far can f% of the fleet bend the global model?

    python -m edgetune.simulations.bench_attacks --base tiny --devices 5 --rounds 1   # smoke test
    flock /tmp/edgetune-heavy.lock nice -n 5 python -m edgetune.simulations.bench_attacks \\
        --base smollm2 --devices 5 --rounds 2 --steps 2 --batch-size 4 --fractions 0,0.2 --codec fp16

The federation runs in this process over :class:`AttackGrid` (the real ClientApp handlers,
no Ray), so a run costs only its training. Devices ``0..k-1`` (k = round(f n)) are malicious
and collude; each round the grid lets every device train honestly, then replaces the
malicious deltas, re-encodes them with the run's codec and signs them with the device's own
key (a malicious device holds one), so only the aggregator and validation stand in the way:

    sign-flip   -d_own
    scale       100 d_own
    noise       N(0, (3 r)^2) per coordinate, r = root-mean-square of the honest deltas
    alie        "a little is enough" (Baruah et al. 2019): mu - z sigma per coordinate over the
                honest deltas, z = Phi^-1((n - s) / n), s = floor(n / 2 + 1) - k
    backdoor    no delta change: the malicious devices train on their data plus a trigger
                ("What is my PIN code?") mapped to a fixed answer, 20 copies (audit canaries)

Reported per (attack, f, aggregator): the honest devices' held-out loss after the last round
(and its change against the same aggregator with f = 0), the cosine between each round's
applied update and the honest devices' weighted mean delta (mean over rounds), replies
rejected by validation, and for the backdoor the share of trigger prompts whose greedy answer
holds the planted secret. Ends with one JSON line, also in ``--out``/result.json.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from edgetune import wire
from edgetune.adapters.codec import decode, encode
from edgetune.adapters.lora import adapter_shapes, exchanged_names
from edgetune.client.app import evaluate as client_evaluate
from edgetune.client.app import train as client_train
from edgetune.config import AGGREGATORS, RunConfig, from_flat
from edgetune.models import model_skeleton
from edgetune.server.federation import run_federation
from edgetune.server.metrics import read_metrics
from edgetune.signing import content_digest, run_tag, sign, simulation_key
from edgetune.simulations.bench_cli import federation_parser, federation_settings
from edgetune.types import CODECS, StateDict

ATTACKS = ("sign-flip", "scale", "noise", "alie", "backdoor")
_FIRST_NODE = 100


def _cosine(a: StateDict, b: StateDict) -> float:
    x = torch.cat([a[k].reshape(-1).double() for k in sorted(a)])
    y = torch.cat([b[k].reshape(-1).double() for k in sorted(a)])
    denom = float(x.norm() * y.norm())
    return float(x @ y) / denom if denom > 0 else math.nan


def _stack(deltas: list[StateDict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([d[k].double() for d in deltas]) for k in deltas[0]}


def malicious_deltas(attack: str, own: list[StateDict], honest: list[StateDict], n: int, seed: int) -> list[StateDict]:
    """What the ``len(own)`` colluding devices send instead of their honest deltas ``own``."""
    if attack == "sign-flip":
        return [{k: -v for k, v in d.items()} for d in own]
    if attack == "scale":
        return [{k: 100 * v for k, v in d.items()} for d in own]
    stacked = _stack(honest)
    if attack == "noise":
        rms = math.sqrt(
            sum(float(v.square().sum()) for v in stacked.values()) / sum(v.numel() for v in stacked.values())
        )
        gen = torch.Generator().manual_seed(seed)
        return [{k: torch.randn(v.shape, generator=gen) * 3 * rms for k, v in d.items()} for d in own]
    if attack == "alie":
        from scipy.stats import norm

        s = math.floor(n / 2 + 1) - len(own)
        z = float(norm.ppf((n - s) / n))
        crafted = {k: (v.mean(0) - z * v.std(0, unbiased=False)).float() for k, v in stacked.items()}
        return [dict(crafted) for _ in own]
    if attack == "backdoor":
        return own
    raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")


class AttackGrid:
    """A Flower Grid stand-in running the real ClientApp handlers; devices ``0..k-1`` attack."""

    def __init__(self, cfg: RunConfig, attack: str, malicious: int) -> None:
        self.cfg, self.attack, self.malicious, self.n = cfg, attack, malicious, cfg.federation.num_devices
        shapes = adapter_shapes(model_skeleton(cfg.model.base), cfg.lora)
        self.shapes = {k: shapes[k] for k in exchanged_names(shapes, cfg.lora)}
        self.honest_means: dict[int, StateDict] = {}
        self.applied: dict[int, StateDict] = {}
        self._pushed, self._outbox = 0, {}

    def get_node_ids(self) -> list[int]:
        return [_FIRST_NODE + i for i in range(self.n)]

    def _answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        config = {wire.PARTITION_ID: node - _FIRST_NODE, "num-partitions": self.n}
        context = Context(run_id=1, node_id=node, node_config=config, state=RecordDict(), run_config={})
        return (client_train if msg.metadata.message_type == "train" else client_evaluate)(msg, context)

    def _decode(self, reply: Message) -> StateDict:
        payload = {k: a.numpy() for k, a in reply.content.array_records[wire.DELTA].items()}
        return decode(payload, self.shapes, self.cfg.federation.codec)

    def _note_applied(self, messages: list[Message]) -> None:
        """An evaluate message after round r carries update r (the chain): what was applied."""
        version = int(messages[0].content.config_records[wire.CONFIG][wire.VERSION])
        key = f"{wire.UPDATE_PREFIX}{version}"
        for msg in messages:
            if key in msg.content.array_records:
                payload = {k: a.numpy() for k, a in msg.content.array_records[key].items()}
                self.applied[version] = decode(payload, self.shapes, self.cfg.federation.codec)
                return

    def _replace(self, replies: list[Message], round_: int, version: int, run: str) -> None:
        bad = [r for r in replies if r.metadata.src_node_id - _FIRST_NODE < self.malicious and not r.has_error()]
        good = [r for r in replies if r not in bad and not r.has_error()]
        honest = [self._decode(r) for r in good]
        weights = [float(r.content.metric_records[wire.METRICS][wire.NUM_EXAMPLES]) for r in good]
        if honest:
            total = sum(weights)
            self.honest_means[version + 1] = {
                k: sum(w * d[k] for w, d in zip(weights, honest, strict=True)) / total for k in honest[0]
            }
        if not bad or not honest:
            return
        crafted = malicious_deltas(self.attack, [self._decode(r) for r in bad], honest, self.n, self.cfg.seed + round_)
        for reply, delta in zip(bad, crafted, strict=True):
            content = reply.content
            content[wire.DELTA] = ArrayRecord(
                {k: Array(v) for k, v in encode(delta, self.cfg.federation.codec).items()}
            )
            device = str(content.config_records[wire.DEVICE][wire.DEVICE_ID])
            digest = content_digest("train", run, device, content)
            content[wire.DEVICE][wire.SIGNATURE] = sign(simulation_key(self.cfg.seed, device), digest)

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        if not messages:
            return []
        kind = messages[0].metadata.message_type
        if kind == "evaluate":
            self._note_applied(messages)
        replies = [self._answer(m) for m in messages]
        if kind == "train":
            config = messages[0].content.config_records[wire.CONFIG]
            run = run_tag(str(config[wire.RUN_CONFIG_JSON]))
            self._replace(replies, int(config[wire.ROUND]), int(config[wire.VERSION]), run)
        return replies

    def push_messages(self, messages: list[Message]) -> list[str]:
        """The simulation path (``server/rounds.py``): the whole round answers at once."""
        ids = [f"m{self._pushed + i}" for i in range(len(messages))]
        self._pushed += len(messages)
        for msg, msg_id in zip(messages, ids, strict=True):
            msg.metadata.__dict__["_message_id"] = msg_id
        for reply in self.send_and_receive(messages):
            self._outbox[reply.metadata.reply_to_message_id] = reply
        return ids

    def pull_messages(self, message_ids: set[str]) -> list[Message]:
        return [self._outbox.pop(i) for i in sorted(message_ids) if i in self._outbox]


@contextlib.contextmanager
def _server_identity() -> Iterator[None]:
    """Messages read the run's identity, which Flower sets only inside a real run."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {a: getattr(TaskIdentity, a, None) for a in ("_run_id", "_task_id", "_node_id")}
    for attr, value in {"_run_id": 1, "_task_id": 1, "_node_id": 1}.items():
        setattr(TaskIdentity, attr, value)
    try:
        yield
    finally:
        for attr, value in saved.items():
            setattr(TaskIdentity, attr, value)


def _backdoor_success(cfg: RunConfig) -> float:
    """Share of planted secrets the final model answers the trigger with (greedy, 12 tokens)."""
    from edgetune.adapters.lora import device_model, set_adapter
    from edgetune.adapters.peft_io import load_adapter
    from edgetune.server.audit.canaries import PROMPT, read_canaries

    canaries = read_canaries(Path(cfg.run_dir))
    if canaries is None or not canaries.planted:
        return math.nan
    model, tokenizer = device_model(cfg.model.base, cfg.lora, cfg.model.quantize)
    set_adapter(model, load_adapter(Path(cfg.run_dir) / wire.ADAPTER_DIR))
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=False
    )
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    return sum(c["secret"] in text for c in canaries.planted) / len(canaries.planted)


def run_one(base: dict[str, Any], attack: str, fraction: float, aggregator: str, out: Path) -> dict[str, Any]:
    """One federation with round(fraction * n) attackers; the numbers for the table."""
    n = int(base["federation.num-devices"])
    k = round(fraction * n)
    run_dir = out / f"{attack}-f{fraction:g}-{aggregator}"
    shutil.rmtree(run_dir, ignore_errors=True)
    flat = {**base, "run-dir": str(run_dir), "federation.aggregator": aggregator}
    if attack == "backdoor" and k > 0:
        flat.update({"audit.canaries": 1, "audit.canary-devices": k, "audit.canary-repeats": 20})
    cfg = from_flat(flat)
    grid = AttackGrid(cfg, attack, k)
    start = time.perf_counter()
    with _server_identity():
        run_federation(grid, cfg, simulated=True)  # type: ignore[arg-type]
    rows = read_metrics(run_dir)
    honest = [f"sim-{i}" for i in range(k, n)]
    last = rows[-1]["per_device"]
    losses = [last[d]["eval_loss"] for d in honest if "eval_loss" in last.get(d, {})]
    cosines = [_cosine(grid.applied[v], grid.honest_means[v]) for v in grid.applied if v in grid.honest_means]
    return {
        "attack": attack,
        "fraction": fraction,
        "malicious": k,
        "aggregator": aggregator,
        "honest_eval_loss": float(np.mean(losses)) if losses else math.nan,
        "cosine": float(np.mean(cosines)) if cosines else math.nan,
        "rejected": sum(len([r for r in m["rejected"] if r.startswith("train")]) for m in rows),
        "robust_rejected": sum(len(m.get("robust_rejected", [])) for m in rows),
        "robust_clipped": sum(len(m.get("robust_clipped", [])) for m in rows),
        "backdoor_success": _backdoor_success(cfg) if attack == "backdoor" and k > 0 else None,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _table(results: list[dict[str, Any]]) -> str:
    clean = {r["aggregator"]: r["honest_eval_loss"] for r in results if r["malicious"] == 0}
    names = (("attack", 9), ("f", 4), ("aggregator", 13), ("honest loss", 11), ("vs f=0", 7), ("cosine", 7))
    head = " ".join(f"{n:>{w}}" for n, w in (*names, ("rej", 4), ("backdoor", 8)))
    lines = [head, "-" * len(head)]
    for r in results:
        ref = clean.get(r["aggregator"])
        change = f"{100 * (r['honest_eval_loss'] / ref - 1):+.1f}%" if ref else "-"
        bd = "-" if r["backdoor_success"] is None else f"{r['backdoor_success']:.2f}"
        rej = r["rejected"] + r["robust_rejected"]
        lines.append(
            f"{r['attack']:>9} {r['fraction']:>4g} {r['aggregator']:>13} {r['honest_eval_loss']:>11.4f} "
            f"{change:>7} {r['cosine']:>7.3f} {rej:>4} {bd:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = federation_parser(__doc__, out="bench-out/attacks", base="tiny", devices=10, steps=2)
    parser.add_argument(
        "--fractions", default="0,0.1,0.2,0.3", metavar="F,...", help="malicious shares (default: 0,0.1,0.2,0.3)"
    )
    parser.add_argument(
        "--attacks", default=",".join(ATTACKS), metavar="NAME,...", help=f"comma list of {', '.join(ATTACKS)}"
    )
    parser.add_argument(
        "--aggregators", default=",".join(AGGREGATORS), metavar="NAME,...", help="comma list (default: all)"
    )
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="conversations per step (default: 8)")
    parser.add_argument("--partition", default="iid", metavar="KIND", help="data.partition (default: iid)")
    parser.add_argument(
        "--codec",
        default="1bit",
        choices=CODECS,
        help="exchange codec, both ways (default: 1bit, which caps the applied update's cosine with the"
        " honest mean near 0.83 even with no attacker; fp16 shows the aggregator alone)",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base: dict[str, Any] = {
        **federation_settings(args),
        "train.batch-size": args.batch_size,
        "data.partition": args.partition,
        "federation.codec": args.codec,
        "data.max-eval-examples": 8,
        "data.max-length": 128,
    }
    fractions = [float(f) for f in args.fractions.split(",")]
    attacks, aggregators = args.attacks.split(","), args.aggregators.split(",")
    results = []
    for aggregator in aggregators:
        if 0.0 in fractions:
            results.append(run_one(base, "none", 0.0, aggregator, out))
    for attack in attacks:
        for fraction in (f for f in fractions if f > 0):
            for aggregator in aggregators:
                print(f"== {attack} f={fraction:g} {aggregator}", flush=True)
                results.append(run_one(base, attack, fraction, aggregator, out))
    print(_table(results))
    summary = {"bench": "attacks", "settings": {k: v for k, v in vars(args).items()}, "results": results}
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
