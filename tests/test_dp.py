"""User-level DP: clipping, noise, quorum, OS-entropy randomness, and DP federated runs.

The unit tests exercise ``server/dp.py``, ``server/sampling.py`` and the device-side clip in
``client/device.py``. The ``e2e`` tests run ``run_federation`` over an in-process grid that
hands each message straight to the ClientApp's handlers (no Ray: a few seconds, not tens),
on the tiny random Llama.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetune import wire
from edgetune.adapters.codec import decode
from edgetune.adapters.delta import global_norm
from edgetune.adapters.lora import adapter_shapes, init_adapter
from edgetune.adapters.peft_io import load_adapter
from edgetune.client.app import evaluate as client_evaluate
from edgetune.client.app import identify as client_identify
from edgetune.client.app import train as client_train
from edgetune.client.device import clip_for_uplink
from edgetune.config import DataConfig, DpConfig, FederationConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig
from edgetune.models import model_skeleton
from edgetune.server.accounting import epsilon, events_from_json, next_event
from edgetune.server.checkpoint import latest_checkpoint
from edgetune.server.dp import clip_delta, gaussian_noise, mean_denominator, noise_generator, private_mean
from edgetune.server.federation import run_federation
from edgetune.server.metrics import read_metrics, summary_table
from edgetune.server.sampling import fixed_sample, poisson_sample, private_sample

# ---------------------------------------------------------------------------- clipping


def _state(values: list[list[float]]) -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.tensor(v, dtype=torch.float32) for i, v in enumerate(values)}


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.lists(finite, min_size=1, max_size=20), min_size=1, max_size=4),
    clip_norm=st.floats(1e-4, 1e3),
)
def test_every_clipped_delta_has_norm_at_most_c(values: list[list[float]], clip_norm: float) -> None:
    delta = _state(values)
    clipped, was_clipped = clip_delta(delta, clip_norm)
    assert global_norm(clipped) <= clip_norm
    assert was_clipped == (global_norm(delta) > clip_norm)
    if not was_clipped:  # short deltas pass through unchanged
        assert all(torch.equal(clipped[k], delta[k].double()) for k in delta)
    else:  # long ones keep their direction
        ratio = [clipped[k] / delta[k].double() for k in delta]
        factors = torch.cat([r[torch.isfinite(r)] for r in ratio])
        assert torch.allclose(factors, factors[0].expand_as(factors))


def test_clip_is_user_level_over_all_tensors_together() -> None:
    clipped, was_clipped = clip_delta(_state([[3.0], [4.0]]), 1.0)  # each tensor alone is under 5
    assert was_clipped and clipped["t0"].item() == pytest.approx(0.6) and clipped["t1"].item() == pytest.approx(0.8)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(finite, min_size=8, max_size=64),
    residual_scale=st.floats(0, 10),
    clip_norm=st.floats(1e-3, 10),
    codec=st.sampled_from(["1bit", "2bit", "fp16"]),
)
def test_device_clipping_bounds_what_the_server_decodes(
    values: list[float], residual_scale: float, clip_norm: float, codec: str
) -> None:
    n = len(values) // 4 * 4
    delta = {"b": torch.tensor(values[:n]).reshape(4, -1)}
    residual = {"b": torch.ones_like(delta["b"]) * residual_scale}
    payload, new_residual = clip_for_uplink(delta, residual, clip_norm, codec)
    sent = decode(payload, {"b": tuple(delta["b"].shape)}, codec)
    assert global_norm(sent) <= clip_norm
    assert global_norm(new_residual) <= 2 * clip_norm * (1 + 1e-3)  # compression error only: bounded


# ---------------------------------------------------------------------------- noise and mean


def test_noise_std_on_the_mean_is_z_c_over_m() -> None:
    dp = DpConfig(enabled=True, clip_norm=0.5, noise_multiplier=1.3, min_replies=1)
    m, size = 5, 250_000
    zeros = [{"w": torch.zeros(size)} for _ in range(m)]
    gen = noise_generator()
    draws = [private_mean(zeros, dp, mean_denominator("fixed", m, 7.0), gen) for _ in range(8)]
    expected = 1.3 * 0.5 / m
    assert all(d.noise_std == pytest.approx(expected) for d in draws)
    measured = torch.cat([d.mean["w"].double() for d in draws if d.mean is not None]).std().item()
    assert abs(measured / expected - 1) < 0.02, (measured, expected)
    # Poisson sampling divides by the expected sample size, whatever the count that replied.
    poisson = private_mean(zeros, dp, mean_denominator("poisson", m, 8.0), gen)
    assert poisson.noise_std == pytest.approx(1.3 * 0.5 / 8.0)
    assert abs(poisson.mean["w"].double().std().item() / poisson.noise_std - 1) < 0.02


def test_private_mean_is_the_uniform_mean_of_clipped_deltas_plus_noise() -> None:
    dp = DpConfig(enabled=True, clip_norm=1.0, noise_multiplier=1e-9, min_replies=2)
    deltas = [{"w": torch.tensor([10.0, 0.0])}, {"w": torch.tensor([0.0, 0.5])}]
    out = private_mean(deltas, dp, 2.0, noise_generator())
    assert out.mean is not None and out.skipped is None
    assert torch.allclose(out.mean["w"], torch.tensor([0.5, 0.25]), atol=1e-6)  # (1, 0) and (0, .5), equal weights
    assert out.clipped_fraction == 0.5


def test_under_quorum_releases_nothing() -> None:
    dp = DpConfig(enabled=True, clip_norm=1.0, min_replies=3)
    out = private_mean([{"w": torch.ones(4)}, {"w": torch.zeros(4)}], dp, 2.0, noise_generator())
    assert out.mean is None and out.noise_std is None
    assert out.skipped == "2 valid replies < dp.min-replies 3"
    assert out.clipped_fraction == 0.5


def test_noise_comes_from_os_entropy_not_the_torch_seed() -> None:
    like = {"w": torch.zeros(1000)}
    torch.manual_seed(7)
    a = gaussian_noise(like, 1.0, noise_generator())
    torch.manual_seed(7)
    b = gaussian_noise(like, 1.0, noise_generator())
    assert not torch.equal(a["w"], b["w"])
    seeded = torch.Generator().manual_seed(7)  # what a seeded run would do: reproducible, hence guessable
    again = torch.Generator().manual_seed(7)
    assert torch.equal(gaussian_noise(like, 1.0, seeded)["w"], gaussian_noise(like, 1.0, again)["w"])


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="clip_norm must be > 0, got 0"):
        clip_delta({"w": torch.ones(1)}, 0.0)
    with pytest.raises(ValueError, match="unknown sampling 'uniform'"):
        mean_denominator("uniform", 1, 1.0)
    with pytest.raises(ValueError, match="denominator must be > 0"):
        private_mean([{"w": torch.ones(1)}], DpConfig(enabled=True, min_replies=1), 0.0, noise_generator())


# ---------------------------------------------------------------------------- sampling


def test_sampling_sizes_and_probabilities() -> None:
    nodes = list(range(100, 120))
    assert len(fixed_sample(nodes, 5)) == 5 and set(fixed_sample(nodes, 5)) <= set(nodes)
    assert poisson_sample(nodes, 0.0) == [] and poisson_sample(nodes, 1.0) == nodes
    counts = [len(poisson_sample(nodes, 0.25, random.Random(i))) for i in range(400)]
    assert abs(sum(counts) / len(counts) - 5.0) < 0.3  # E = q N = 5
    assert len(set(map(tuple, (private_sample(nodes, "fixed", 5) for _ in range(20))))) > 1  # not seeded
    with pytest.raises(ValueError, match="sample size must be in"):
        fixed_sample(nodes, 21)


# ---------------------------------------------------------------------------- federated runs


class LocalGrid:
    """A Flower Grid stand-in: each message goes straight to the ClientApp's handlers.

    Node ``100 + i`` is the simulated device with partition id ``i``. ``crash_after`` raises
    once that many train rounds have returned (the server 'dies' mid-round).
    """

    def __init__(self, num_devices: int, crash_after: int = 0) -> None:
        self.num_devices, self.crash_after, self.train_rounds = num_devices, crash_after, 0

    def get_node_ids(self) -> list[int]:
        return [100 + i for i in range(self.num_devices)]

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            config = {wire.PARTITION_ID: node - 100, "num-partitions": self.num_devices}
            context = Context(run_id=1, node_id=node, node_config=config, state=RecordDict(), run_config={})
            kind = msg.metadata.message_type
            handler = {"train": client_train, wire.IDENTIFY: client_identify}.get(kind, client_evaluate)
            replies.append(handler(msg, context))
        if messages and messages[0].metadata.message_type == "train":
            self.train_rounds += 1
            if self.train_rounds == self.crash_after:
                raise SimulatedCrash(f"server killed after the devices trained round {self.train_rounds}")
        return replies


class SimulatedCrash(RuntimeError):
    """The server 'dies' here."""


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages read the sending task's identity, which a SuperLink would set."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _dp_config(run_dir: Path, rounds: int, num_devices: int = 2, **dp: object) -> RunConfig:
    return RunConfig(
        seed=7,
        run_dir=str(run_dir),
        model=ModelConfig(base="tiny"),
        lora=LoraConfig(rank=4),
        data=DataConfig(max_length=128, max_eval_examples=4),
        train=TrainConfig(local_steps=1, batch_size=2, precision="fp32"),
        federation=FederationConfig(rounds=rounds, num_devices=num_devices),
        dp=DpConfig(**{"enabled": True, "clip_norm": 0.05, "noise_multiplier": 1.0, "min_replies": 1, **dp}),  # type: ignore[arg-type]
    )


def _expected_epsilons(cfg: RunConfig, rounds: int) -> list[float]:
    f, dp = cfg.federation, cfg.dp
    events = [next_event(dp, t, f.num_devices, f.sampled) for t in range(1, rounds + 1)]
    return [epsilon(events[:t], dp.accountant, dp.delta) for t in range(rounds + 1)]


def _status(cfg: RunConfig) -> dict[str, str]:
    return json.loads((Path(cfg.run_dir) / wire.STATUS_FILE).read_text())


@pytest.mark.e2e
def test_dp_run_crashes_and_resumes_with_the_same_epsilon(tmp_path: Path, server_identity: None) -> None:
    cfg = _dp_config(tmp_path / "run", rounds=3, sampling="fixed")
    with pytest.raises(SimulatedCrash):
        run_federation(LocalGrid(2, crash_after=2), cfg)  # type: ignore[arg-type]
    run_dir = Path(cfg.run_dir)
    before = [m["dp_epsilon"] for m in read_metrics(run_dir)]
    resumed = latest_checkpoint(run_dir)
    assert resumed is not None and resumed[0] == 1 and len(resumed[1].privacy) == 1  # round 2 never released

    run_federation(LocalGrid(2), cfg)  # type: ignore[arg-type]
    assert _status(cfg) == {"status": "completed"}
    rows = read_metrics(run_dir)
    assert [m["round"] for m in rows] == [0, 1, 2, 3]
    assert [m["dp_epsilon"] for m in rows] == _expected_epsilons(cfg, 3)  # exactly, not approximately
    assert [m["dp_epsilon"] for m in rows[: len(before)]] == before
    for m in rows[1:]:
        assert m["dp_sampled"] == 2 and m["dp_skipped"] is None
        assert m["dp_noise_std"] == pytest.approx(1.0 * 0.05 / 2)  # fixed-size: z C / replies
        assert 0.0 <= m["dp_clipped_fraction"] <= 1.0
    ledger = json.loads((run_dir / wire.CONFIG_FILE).read_text())
    assert ledger["dp.enabled"] is True and ledger["dp.sampling"] == "fixed"
    last = latest_checkpoint(run_dir)
    assert last is not None and [e.round for e in last[1].privacy] == [1, 2, 3]
    assert "epsilon" in summary_table(rows).splitlines()[0]


@pytest.mark.e2e
def test_under_quorum_rounds_are_skipped_and_the_budget_stops_the_run(tmp_path: Path, server_identity: None) -> None:
    probe = _dp_config(tmp_path / "probe", rounds=2, min_replies=3, clip_on="device")
    eps = _expected_epsilons(probe, 2)
    cfg = dataclasses.replace(probe, dp=dataclasses.replace(probe.dp, max_epsilon=(eps[1] + eps[2]) / 2))
    cfg = dataclasses.replace(cfg, run_dir=str(tmp_path / "run"))
    initial = init_adapter(adapter_shapes(model_skeleton("tiny"), cfg.lora), cfg.seed)

    run_federation(LocalGrid(2), cfg)  # type: ignore[arg-type]
    status = _status(cfg)
    assert status["status"] == "completed" and "would raise epsilon" in status["reason"]
    assert "stopped after round 1" in status["reason"]
    rows = read_metrics(Path(cfg.run_dir))
    assert [m["round"] for m in rows] == [0, 1]  # round 2 never ran
    skipped = rows[1]
    assert skipped["dp_skipped"] == "2 valid replies < dp.min-replies 3"
    assert skipped["version"] == 0 and skipped["replies"] == 2 and skipped["dp_noise_std"] is None
    assert skipped["dp_epsilon"] == eps[1]  # a skipped round still counts
    assert skipped["dp_clipped_fraction"] == 0.0  # the devices clipped what they sent to below C
    assert summary_table(rows).splitlines()[-1].endswith(f"{eps[1]:.3f}*")  # marked skipped
    held = load_adapter(Path(cfg.run_dir) / wire.ADAPTER_DIR)
    assert all(torch.equal(held[k], initial[k]) for k in initial)  # global unchanged
    ckpt = latest_checkpoint(Path(cfg.run_dir))
    assert ckpt is not None and events_from_json(json.dumps([dataclasses.asdict(e) for e in ckpt[1].privacy]))
    assert math.isfinite(eps[2]) and eps[2] > cfg.dp.max_epsilon
