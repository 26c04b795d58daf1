"""Secure aggregation over the Grid (``server/secagg.py``, ``client/secagg.py``): the server's
mean equals the decoded sum of the survivors' integer inputs exactly, with dropouts at each
stage; below the threshold the round is skipped; a crash mid-protocol resumes; options that
need individual updates are refused; and (e2e) the 2-round tiny Flower simulation."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from edgetune import wire
from edgetune.adapters.secagg_spec import decode_sum, round_spec
from edgetune.client import app as client_app
from edgetune.config import (
    ConfigError,
    DataConfig,
    FederationConfig,
    LoraConfig,
    ModelConfig,
    RunConfig,
    SecAggConfig,
    TrainConfig,
    from_flat,
)
from edgetune.server.federation import run_federation
from edgetune.server.metrics import read_metrics, summary_table
from edgetune.server.strategy import DeltaFedAvg
from edgetune.signing import advert_digest, key_id, sign

HANDLERS = {
    wire.SECAGG_KEYS: client_app.secagg_keys,
    wire.SECAGG_SHARE: client_app.secagg_share,
    wire.SECAGG_MASK: client_app.secagg_mask,
    wire.SECAGG_UNMASK: client_app.secagg_unmask,
    "evaluate": client_app.evaluate,
    wire.IDENTIFY: client_app.identify,
}


class Crash(RuntimeError):
    pass


class StagedGrid:
    """Messages go straight to the ClientApp handlers; each node keeps one Context for the run.

    ``drop`` maps a message type to partition ids that never answer it (from then on, in
    that round); ``crash`` names a message type at which the server dies once.
    """

    def __init__(self, n: int, drop: dict[str, set[int]] | None = None, crash: str | None = None) -> None:
        self.n, self.drop, self.crash = n, drop or {}, crash
        self.contexts = {100 + i: Context(1, 100 + i, {wire.PARTITION_ID: i}, RecordDict(), {}) for i in range(n)}
        self.inputs: dict[int, dict[int, np.ndarray]] = {}  # round -> node -> integer input
        self.outbox: dict[str, Message] = {}
        self.tamper_keys = False  # flip a bit of every advertised public key after signing
        self.sybil = False  # a malicious server adds a device of its own to the share stage's roster

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def push_messages(self, messages: list[Message]) -> list[str]:
        """The simulation engine's path (``server/rounds.py``): push, then pull the replies."""
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.outbox) + i}"
        ids = [m.metadata.message_id for m in messages]
        self.outbox.update(zip(ids, self.send_and_receive(messages), strict=True))
        return ids

    def pull_messages(self, message_ids: set[str]) -> list[Message]:
        return [self.outbox.pop(i) for i in sorted(message_ids) if i in self.outbox]

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list[Message]:
        kind = messages[0].metadata.message_type if messages else ""
        if kind == self.crash:
            self.crash = None
            raise Crash(f"server died at {kind}")
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node - 100 in self.drop.get(kind, set()):
                continue
            if kind == wire.SECAGG_SHARE and self.sybil:
                _add_sybil(msg)
            try:
                replies.append(HANDLERS[kind](msg, self.contexts[node]))
            except Exception as ex:  # noqa: BLE001 - what Flower's ClientApp runner does with it
                reason = str(type(ex)) + ":<'" + str(ex) + "'>"
                replies.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg))
                continue
            if kind == wire.SECAGG_KEYS and self.tamper_keys:
                array = replies[-1].content.array_records[wire.SECAGG_PUBLIC][wire.SA_C_PK]
                array.data = array.data[:-1] + bytes([array.data[-1] ^ 1])
            if kind == wire.SECAGG_KEYS:
                x = self.contexts[node].state.array_records[wire.SA_INPUT][wire.SA_INPUT].numpy()
                self.inputs.setdefault(int(msg.metadata.group_id), {})[node] = x.copy()
        return replies


def _add_sybil(msg: Message) -> None:
    """A malicious server's invented device (node 999): fresh keys, signed by a key of its own."""
    record = msg.content.config_records[wire.SECAGG]
    fake = ed25519.Ed25519PrivateKey.generate()
    c_pk, s_pk = (x25519.X25519PrivateKey.generate().public_key().public_bytes_raw() for _ in range(2))
    run = "the server may claim any run"
    for name, value in (
        (wire.SA_NODES, 999),
        (wire.SA_C_PK, c_pk),
        (wire.SA_S_PK, s_pk),
        (wire.SA_SIGNERS, key_id(fake.public_key())),
        (wire.SA_ADVERT_SIGS, sign(fake, advert_digest(run, int(record[wire.ROUND]), 999, c_pk, s_pk))),  # type: ignore[arg-type]
    ):
        record[name] = [*record[name], value]  # type: ignore[misc]


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture
def applied(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """A spy on the real ``apply_mean``: the means the server applied, in order."""
    seen: list[dict[str, torch.Tensor]] = []
    real = DeltaFedAvg.apply_mean

    def spy(self: DeltaFedAvg, mean: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
        seen.append(mean)
        return real(self, mean)

    monkeypatch.setattr(DeltaFedAvg, "apply_mean", spy)
    return seen


def _config(run_dir: Path, rounds: int = 1, n: int = 4, **secagg: object) -> RunConfig:
    return RunConfig(
        seed=7,
        run_dir=str(run_dir),
        model=ModelConfig(base="tiny"),
        lora=LoraConfig(rank=4),
        data=DataConfig(max_length=128, max_eval_examples=2),
        train=TrainConfig(local_steps=1, batch_size=2, precision="fp32"),
        federation=FederationConfig(rounds=rounds, num_devices=n),
        secagg=SecAggConfig(**{"enabled": True, "threshold": 2, **secagg}),  # type: ignore[arg-type]
    )


def _expected_mean(cfg: RunConfig, grid: StagedGrid, round_: int, counted: list[int]) -> dict[str, torch.Tensor]:
    from edgetune.adapters.lora import adapter_shapes, exchanged_names
    from edgetune.models import model_skeleton

    shapes = adapter_shapes(model_skeleton("tiny"), cfg.lora)
    sent = {k: shapes[k] for k in exchanged_names(shapes, cfg.lora)}
    spec = round_spec(cfg, sent, cfg.federation.sampled)
    total = sum(grid.inputs[round_][100 + i].astype(np.int64) for i in counted) % (1 << spec.k)
    return decode_sum(np.asarray(total, dtype=np.uint64), spec, len(counted), len(counted))


@pytest.mark.parametrize(
    ("drop", "counted"),
    [
        ({}, [0, 1, 2, 3]),
        ({wire.SECAGG_SHARE: {1}}, [0, 2, 3]),  # dropped before sharing: not in the sum
        ({wire.SECAGG_MASK: {1}}, [0, 2, 3]),  # after sharing: its pairwise masks are removed
        ({wire.SECAGG_UNMASK: {1}}, [0, 1, 2, 3]),  # after masking: its input counts
    ],
)
def test_round_mean_is_the_exact_decoded_sum(tmp_path, server_identity, applied, drop, counted) -> None:
    cfg = _config(tmp_path / "run")
    grid = StagedGrid(4, drop)
    run_federation(grid, cfg)  # type: ignore[arg-type]
    assert len(applied) == 1
    expected = _expected_mean(cfg, grid, 1, counted)
    for k in expected:
        assert torch.equal(applied[0][k], expected[k]), k
    row = read_metrics(Path(cfg.run_dir))[1]
    sa = row["secagg"]
    assert sa["k"] == 1 + 3 and sa["skipped"] is None and sa["survivors"] == len(counted)
    assert sum(sa["dropouts"].values()) == (1 if drop else 0)
    assert set(sa["stage_seconds"]) == {"keys", "share", "mask", "unmask"}
    assert row["wall_seconds"]["train"] > 0 and "aggregate" in row["wall_seconds"]
    d = sum(math.prod(v) for v in _sent_shapes(cfg).values())
    packed = math.ceil(d * sa["k"] / 8)  # k bits per parameter, plus the .npy header of each array
    assert 0 <= sa["stage_bytes_up"]["mask"] - sa["survivors"] * packed <= sa["survivors"] * 128
    assert sa["k"] < sa["bits_up_per_param"] < sa["k"] + 4  # plus keys, signatures, shares (tiny d: 4096)
    assert "sa bits/p" in summary_table(read_metrics(Path(cfg.run_dir))).splitlines()[0]


def test_below_threshold_the_round_is_skipped(tmp_path, server_identity, applied) -> None:
    cfg = _config(tmp_path / "run", n=3, threshold=3)
    run_federation(StagedGrid(3, {wire.SECAGG_MASK: {0}}), cfg)  # type: ignore[arg-type]
    assert applied == []
    row = read_metrics(Path(cfg.run_dir))[1]
    assert row["version"] == 0 and "2 devices after the mask stage < secagg threshold 3" in row["secagg"]["skipped"]
    assert json.loads((Path(cfg.run_dir) / wire.STATUS_FILE).read_text()) == {"status": "completed"}


def test_secagg_plus_neighbours_and_a_crash_mid_protocol_resume(tmp_path, server_identity, applied) -> None:
    # A ring of 4 neighbours among 6: a dropped device's key has 4 holders, t = 3 of them.
    cfg = _config(tmp_path / "run", rounds=2, n=6, neighbours=4, threshold=3)
    with pytest.raises(Crash):
        run_federation(StagedGrid(6, crash=wire.SECAGG_MASK), cfg)  # type: ignore[arg-type]
    assert applied == []
    grid = StagedGrid(6, {wire.SECAGG_MASK: {4}})
    run_federation(grid, cfg)  # type: ignore[arg-type]
    rows = read_metrics(Path(cfg.run_dir))
    assert [m["round"] for m in rows] == [0, 1, 2] and rows[-1]["version"] == 2
    expected = _expected_mean(cfg, grid, 2, [0, 1, 2, 3, 5])
    assert all(torch.equal(applied[-1][k], expected[k]) for k in expected)


def test_options_that_need_individual_updates_are_refused() -> None:
    base = {"secagg.enabled": True, "federation.num-devices": 4}
    with pytest.raises(ConfigError, match="dp.clip-on='server'"):
        from_flat({**base, "dp.enabled": True})
    with pytest.raises(ConfigError, match="dp.accountant"):
        from_flat({**base, "dp.enabled": True, "dp.clip-on": "device", "dp.accountant": "pld"})
    with pytest.raises(ConfigError, match="secagg.threshold"):
        from_flat({**base, "secagg.threshold": 5})
    with pytest.raises(ConfigError, match="federation.aggregator='median'"):
        from_flat({**base, "federation.aggregator": "median"})
    with pytest.raises(ConfigError, match="secagg.bits"):
        from_flat({**base, "dp.enabled": True, "dp.clip-on": "device"})  # 1 bit cannot carry the noise
    cfg = from_flat({**base, "dp.enabled": True, "dp.clip-on": "device", "secagg.bits": 16})
    assert dataclasses.asdict(cfg.secagg)["bits"] == 16


@pytest.mark.e2e
def test_two_round_flower_simulation_with_secagg(tmp_path: Path) -> None:
    from edgetune.simulations.simulate import simulate

    cfg = dataclasses.replace(_config(tmp_path / "run", rounds=2, n=3), data=DataConfig(max_length=128))
    simulate(cfg)
    rows = read_metrics(Path(cfg.run_dir))
    assert [m["round"] for m in rows] == [0, 1, 2] and rows[-1]["version"] == 2
    for m in rows[1:]:
        sa = m["secagg"]
        assert sa["skipped"] is None and sa["survivors"] == 3 and sa["k"] == 1 + 2
        assert m["replies"] == 3 and m["train_loss"] is not None


def test_distributed_dp_round_accounts_skellam_and_reports_the_wrap_bound(tmp_path, server_identity, applied) -> None:
    from edgetune.config import DpConfig
    from edgetune.server.accounting import next_event
    from edgetune.server.secagg import skellam_event

    cfg = dataclasses.replace(
        _config(tmp_path / "run", rounds=2, n=3, bits=16),
        dp=DpConfig(
            enabled=True, clip_on="device", clip_norm=0.05, noise_multiplier=1.0, min_replies=1, sampling="fixed"
        ),
    )
    grid = StagedGrid(3)
    run_federation(grid, cfg)  # type: ignore[arg-type]
    rows = read_metrics(Path(cfg.run_dir))
    shapes = _sent_shapes(cfg)
    events = [skellam_event(next_event(cfg.dp, t, 3, 3), cfg, shapes) for t in (1, 2)]
    from edgetune.server.accounting import epsilon

    assert [m["dp_epsilon"] for m in rows] == [epsilon(events[:t], "rdp", cfg.dp.delta) for t in (0, 1, 2)]
    sa = rows[1]["secagg"]
    assert sa["wrap_bound"] <= 1e-9 and sa["k"] > 16 and sa["survivors"] == 3
    # The released mean is exactly the sum of the devices' noised integer inputs over s * m.
    spec = round_spec(cfg, shapes, 3)
    assert spec.plan is not None
    total = sum(grid.inputs[1][100 + i].astype(np.int64) for i in range(3)) % (1 << spec.k)
    total = np.where(total >= 1 << (spec.k - 1), total - (1 << spec.k), total)
    std = math.sqrt(3 * spec.plan.device_variance) / (spec.plan.scale * 3)
    assert rows[1]["dp_noise_std"] == pytest.approx(std)
    got = np.concatenate([applied[0][k].numpy().reshape(-1) for k in sorted(applied[0])])
    assert np.abs(got - total / (spec.plan.scale * 3)).max() < 1e-6  # float32 rounding only


def _sent_shapes(cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    from edgetune.adapters.lora import adapter_shapes, exchanged_names
    from edgetune.models import model_skeleton

    shapes = adapter_shapes(model_skeleton("tiny"), cfg.lora)
    return {k: shapes[k] for k in exchanged_names(shapes, cfg.lora)}


def test_audit_record_shows_only_protocol_traffic(tmp_path, server_identity) -> None:
    """What the server saw with SecAgg on: keys, ciphertexts, masked inputs, shares; nothing flagged."""
    from edgetune.server.uplinks import read_uplinks

    cfg = _config(tmp_path / "run", n=3)
    run_federation(StagedGrid(3), cfg)  # type: ignore[arg-type]
    lines = [u for u in read_uplinks(Path(cfg.run_dir)) if u["kind"].startswith("secagg-")]
    assert {u["kind"] for u in lines} == {"secagg-keys", "secagg-share", "secagg-mask", "secagg-unmask"}
    assert all(u["verdict"] == "only adapter deltas and numeric metrics" for u in lines), [
        u["offending"] for u in lines
    ]
    masked = [u for u in lines if u["kind"] == "secagg-mask"]
    assert all(r["items"][0]["dtype"] == "uint8" for u in masked for r in u["records"] if r["type"] == "array")


def test_seeded_dropouts_in_simulation_and_signed_key_advertisements(tmp_path, server_identity, applied) -> None:
    from edgetune.server.rounds import uniform

    cfg = _config(tmp_path / "run", rounds=2, n=6, threshold=3, dropout=0.1)
    grid = StagedGrid(6)
    run_federation(grid, cfg, simulated=True)  # type: ignore[arg-type]
    rows = read_metrics(Path(cfg.run_dir))
    for t in (1, 2):
        gone = {
            stage: {i for i in range(6) if uniform("secagg", cfg.seed, t, stage, f"sim-{i}") < 0.1}
            for stage in ("share", "mask", "unmask")
        }
        out_before_mask = gone["share"] | gone["mask"]
        counted = [i for i in range(6) if i not in out_before_mask]
        sa = rows[t]["secagg"]
        assert sa["survivors"] == len(counted) and sa["skipped"] is None
        assert sa["dropouts"]["share"] == len(gone["share"])
        expected = _expected_mean(cfg, grid, t, counted)
        assert all(torch.equal(applied[t - 1][k], expected[k]) for k in expected)
    # Seed 7 drops a device at each stage of round 1 (before share, before mask, before unmask).
    assert [rows[1]["secagg"]["dropouts"][s] for s in ("keys", "share", "mask", "unmask")] == [0, 1, 1, 1]

    # A key advertisement altered after the device signed it is refused: no device takes part.
    cfg = _config(tmp_path / "tampered", n=3)
    grid = StagedGrid(3)
    grid.tamper_keys = True
    with pytest.raises(Exception, match="no device trained"):
        run_federation(grid, cfg, simulated=True)  # type: ignore[arg-type]
    assert any("bad signature" in r for r in read_metrics(Path(cfg.run_dir))[1]["rejected"])


def test_devices_refuse_a_roster_with_a_device_the_server_invented(tmp_path, server_identity, applied, caplog) -> None:
    """The server adds a Sybil to the share stage's roster: every honest device checks the
    roster against its registry (simulated devices' derived keys), refuses with one line, and
    drops; the round is skipped with a logged reason, the global adapter unchanged."""
    cfg = _config(tmp_path / "run", n=3)
    grid = StagedGrid(3)
    grid.sybil = True
    with caplog.at_level("WARNING", logger="edgetune.server"):
        run_federation(grid, cfg, simulated=True)  # type: ignore[arg-type]
    assert applied == []
    row = read_metrics(Path(cfg.run_dir))[1]
    assert row["version"] == 0 and row["secagg"]["dropouts"]["share"] == 3
    assert "0 devices after the share stage < secagg threshold 2" in row["secagg"]["skipped"]
    refusals = [r.getMessage() for r in caplog.records if "secagg share" in r.getMessage()]
    assert len(refusals) == 3
    reason = "refusing round 1: node 999's key advertisement is not signed by a registered device"
    assert all(reason in m for m in refusals)
    assert sum(reason in r for r in row["rejected"]) == 3  # and in metrics.jsonl, one line each
