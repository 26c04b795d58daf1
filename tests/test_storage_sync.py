"""Tests for client/storage.py (held global adapter, error-feedback residuals) and
client/device.sync_global against the server's DeltaFedAvg: every way of catching up ends
bit-identical to the server's global adapter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from edgetune.adapters.codec import encode, expected_payload_bytes, full_codec, payload_bytes
from edgetune.adapters.delta import subtract, weighted_mean
from edgetune.adapters.lora import attach_lora
from edgetune.client.device import Downlink, SyncError, sync_global
from edgetune.client.storage import DeviceStorage
from edgetune.config import FederationConfig, LoraConfig, ModelConfig, RunConfig
from edgetune.server.strategy import DeltaFedAvg, bounded_chain
from edgetune.types import StateDict
from edgetune.wire import FULL, HELD_ADAPTER_FILE, RESIDUAL_FILE, UPDATE_PREFIX


def _randn(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _equal(a: StateDict, b: StateDict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- DeviceStorage -----------------------------------------------------------------------


def test_new_device_holds_nothing(tmp_path: Path) -> None:
    storage = DeviceStorage(tmp_path / "dev")
    assert storage.root.is_dir()
    assert storage.load_global() is None
    assert storage.residual_before(5) is None


def test_save_and_load_global_with_version(tmp_path: Path) -> None:
    storage = DeviceStorage(tmp_path)
    state = {"a": _randn((4, 2), 0), "b": _randn((2, 4), 1)}
    storage.save_global(state, 3)
    held, version = storage.load_global()
    assert version == 3 and _equal(held, state)
    storage.save_global({k: v * 2 for k, v in state.items()}, 4)
    held, version = DeviceStorage(tmp_path).load_global()  # a fresh handle on the same folder
    assert version == 4 and torch.equal(held["a"], state["a"] * 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [HELD_ADAPTER_FILE]


def test_residual_before_returns_the_latest_older_round(tmp_path: Path) -> None:
    storage = DeviceStorage(tmp_path)
    r1, r3 = {"B": torch.full((2, 2), 1.0)}, {"B": torch.full((2, 2), 3.0)}
    storage.save_residual(r1, 1)
    assert storage.residual_before(1) is None  # round 1 starts from zero
    assert _equal(storage.residual_before(2), r1)
    storage.save_residual(r3, 3)  # the device sat out round 2
    assert _equal(storage.residual_before(4), r3)
    assert _equal(storage.residual_before(3), r1)  # redoing round 3 reuses round 1's residual
    assert _equal(storage.residual_before(2), r1)
    assert storage.residual_before(1) is None
    prev = tmp_path / RESIDUAL_FILE.replace(".safetensors", ".prev.safetensors")
    assert prev.is_file() and sorted(p.name for p in tmp_path.iterdir()) == sorted([RESIDUAL_FILE, prev.name])


def test_redoing_a_round_after_a_crash_starts_from_the_same_residual(tmp_path: Path) -> None:
    storage = DeviceStorage(tmp_path)
    r1 = {"B": torch.full((3,), 1.0)}
    storage.save_residual(r1, 1)
    first = storage.residual_before(2)
    storage.save_residual({"B": torch.full((3,), 2.0)}, 2)
    # The server crashed before checkpointing round 2 and redoes it.
    again = storage.residual_before(2)
    assert _equal(again, first) and _equal(again, r1)
    storage.save_residual({"B": torch.full((3,), 2.5)}, 2)  # the redo overwrites round 2, keeps .prev
    assert _equal(storage.residual_before(2), r1)
    assert torch.equal(storage.residual_before(3)["B"], torch.full((3,), 2.5))


def test_storage_without_metadata_is_reported_corrupt(tmp_path: Path) -> None:
    save_file({"B": torch.zeros(2)}, tmp_path / HELD_ADAPTER_FILE)
    with pytest.raises(ValueError, match="version"):
        DeviceStorage(tmp_path).load_global()


# --- sync_global against the server ------------------------------------------------------


def _cfg(codec: str = "1bit", train_a: bool = False) -> RunConfig:
    return RunConfig(
        seed=3,
        lora=LoraConfig(rank=4, train_a=train_a),
        model=ModelConfig(base="tiny"),
        federation=FederationConfig(codec=codec),
    )


class _LoggedFedAvg(DeltaFedAvg):
    """A server that also keeps every update it broadcast (the real one keeps a bounded
    chain), so tests can hand devices chains the server itself would no longer send."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.history: dict[int, dict] = {}

    def apply_mean(self, mean: StateDict) -> dict:
        payload = super().apply_mean(mean)
        self.history[self.state.version] = payload
        return payload


def _run_server(shapes: dict[str, tuple[int, ...]], cfg: RunConfig, rounds: int) -> tuple[DeltaFedAvg, list[StateDict]]:
    """A server that aggregates ``rounds`` rounds of three random deltas; returns the means too."""
    fed = _LoggedFedAvg(shapes, cfg)
    means = []
    for r in range(rounds):
        deltas = [{k: _randn(shapes[k], 100 * r + i, 0.01) for k in fed.names} for i in range(3)]
        weights = [1.0, 2.0, 4.0]
        means.append(weighted_mean(deltas, weights))
        fed.aggregate(deltas, weights)
    return fed, means


def _chain(fed: DeltaFedAvg, first: int = 1) -> dict[int, dict]:
    return {v: fed.history[v] for v in range(first, fed.state.version + 1)}


@pytest.fixture
def peft_model(tiny_model, lora_cfg: LoraConfig):
    return attach_lora(tiny_model, lora_cfg)


@pytest.mark.parametrize("codec", ["1bit", "fp16", "fp32"])
def test_chain_full_and_late_devices_end_bit_identical_to_the_server(
    tmp_path: Path, tiny_shapes, peft_model, codec: str
) -> None:
    cfg = _cfg(codec)
    fed, _ = _run_server(tiny_shapes, cfg, rounds=1)
    late = DeviceStorage(tmp_path / "late")
    sync_global(late, peft_model, cfg, Downlink(1, None, _chain(fed)))
    assert late.load_global()[1] == 1

    for _ in range(3):  # three more rounds the late device misses
        fed.aggregate([{k: _randn(tiny_shapes[k], 7 + fed.state.version, 0.01) for k in fed.names}], [1.0])
    server = fed.state.adapter
    assert fed.state.version == 4

    by_chain = sync_global(DeviceStorage(tmp_path / "chain"), peft_model, cfg, Downlink(4, None, _chain(fed)))
    full = encode(fed.sent_part(), full_codec(codec))
    by_full = sync_global(DeviceStorage(tmp_path / "full"), peft_model, cfg, Downlink(4, full, {}))
    by_late = sync_global(late, peft_model, cfg, Downlink(4, None, _chain(fed, first=2)))
    for state in (by_chain, by_full, by_late):
        assert _equal(state, server)
    for name in ("chain", "full", "late"):
        held, version = DeviceStorage(tmp_path / name).load_global()
        assert version == 4 and _equal(held, server)


def test_a_chain_from_version_zero_is_valid_for_any_device(tmp_path: Path, tiny_shapes, peft_model) -> None:
    cfg = _cfg()
    fed, _ = _run_server(tiny_shapes, cfg, rounds=2)
    storage = DeviceStorage(tmp_path)
    sync_global(storage, peft_model, cfg, Downlink(2, None, _chain(fed)))
    fed.aggregate([{k: _randn(tiny_shapes[k], 99, 0.01) for k in fed.names}], [1.0])
    # The server forgot which version this device holds and sends everything: it skips 1, 2.
    assert _equal(sync_global(storage, peft_model, cfg, Downlink(3, None, _chain(fed))), fed.state.adapter)
    # Nothing new: the held adapter is returned as is.
    assert _equal(sync_global(storage, peft_model, cfg, Downlink(3, None, {})), fed.state.adapter)


def test_a_device_synced_every_round_tracks_the_server(tmp_path: Path, tiny_shapes, peft_model) -> None:
    cfg = _cfg()
    fed = DeltaFedAvg(tiny_shapes, cfg)
    storage = DeviceStorage(tmp_path)
    assert _equal(sync_global(storage, peft_model, cfg, Downlink(0, None, {})), fed.state.adapter)
    for r in range(4):
        fed.aggregate([{k: _randn(tiny_shapes[k], r, 0.01) for k in fed.names}], [1.0])
        down = Downlink(fed.state.version, None, {fed.state.version: fed.state.updates[fed.state.version]})
        assert _equal(sync_global(storage, peft_model, cfg, down), fed.state.adapter)


def test_server_downlink_payloads_bring_devices_to_the_global(tmp_path: Path, tiny_shapes, peft_model) -> None:
    cfg = _cfg()
    fed, _ = _run_server(tiny_shapes, cfg, rounds=3)
    fed.record_device(node_id=11, device_id="dev-a", version=2)
    storage = DeviceStorage(tmp_path / "a")
    sync_global(storage, peft_model, cfg, Downlink(2, None, {v: fed.history[v] for v in (1, 2)}))
    for node in (11, 12):  # a known device one version behind, and an unknown node
        records, nbytes = fed.downlink(node)
        full = records.get(FULL)
        updates = {int(k.removeprefix(UPDATE_PREFIX)): p for k, p in records.items() if k != FULL}
        root = tmp_path / ("a" if node == 11 else "new")
        state = sync_global(DeviceStorage(root), peft_model, cfg, Downlink(fed.state.version, full, updates))
        assert _equal(state, fed.state.adapter)
        assert nbytes > 0
    assert list(fed.downlink(11)[0]) == [f"{UPDATE_PREFIX}3"]  # one update is smaller than the full adapter


def test_both_factor_mode_syncs_a_too(tmp_path: Path, tiny_shapes, tiny_model) -> None:
    cfg = _cfg(train_a=True)
    model = attach_lora(tiny_model, cfg.lora)
    fed, _ = _run_server(tiny_shapes, cfg, rounds=2)
    assert any(".lora_A." in k for k in fed.names)
    by_chain = sync_global(DeviceStorage(tmp_path / "c"), model, cfg, Downlink(2, None, _chain(fed)))
    by_full = sync_global(
        DeviceStorage(tmp_path / "f"), model, cfg, Downlink(2, encode(fed.sent_part(), full_codec("1bit")), {})
    )
    assert _equal(by_chain, fed.state.adapter) and _equal(by_full, fed.state.adapter)


def test_a_gap_in_the_chain_raises_and_keeps_the_held_version(tmp_path: Path, tiny_shapes, peft_model) -> None:
    cfg = _cfg()
    fed, _ = _run_server(tiny_shapes, cfg, rounds=4)
    storage = DeviceStorage(tmp_path)
    sync_global(storage, peft_model, cfg, Downlink(1, None, {1: fed.history[1]}))
    with pytest.raises(SyncError, match="holds version 1.*next update sent is 3"):
        sync_global(storage, peft_model, cfg, Downlink(4, None, {3: fed.history[3], 4: fed.history[4]}))
    with pytest.raises(SyncError, match="server is at 4"):
        sync_global(storage, peft_model, cfg, Downlink(4, None, {}))
    with pytest.raises(SyncError):  # a new device sent only the tail of the chain
        sync_global(DeviceStorage(tmp_path / "new"), peft_model, cfg, Downlink(4, None, {4: fed.history[4]}))
    assert storage.load_global()[1] == 1


def test_server_error_feedback_identity(tiny_shapes) -> None:
    """sum of round means == (global_T - global_0) + server residual_T, over the exchanged B."""
    cfg = _cfg()
    fed, means = _run_server(tiny_shapes, cfg, rounds=5)
    start = DeltaFedAvg(tiny_shapes, cfg).sent_part()
    moved = subtract(fed.sent_part(), start)
    for k in fed.names:
        total = sum(m[k].double() for m in means)
        torch.testing.assert_close(moved[k].double() + fed.state.residual[k].double(), total, rtol=0, atol=1e-6)
    # The A factors never move in the default mode.
    assert all(
        torch.equal(fed.state.adapter[k], DeltaFedAvg(tiny_shapes, cfg).state.adapter[k])
        for k in tiny_shapes
        if ".lora_A." in k
    )


@pytest.mark.parametrize(
    ("codec", "rounds", "expect_full"),
    [("fp16", 1, False), ("fp16", 2, True), ("1bit", 3, False), ("1bit", 40, True)],
)
def test_downlink_is_the_smaller_of_chain_and_full(codec: str, rounds: int, expect_full: bool, tiny_shapes) -> None:
    # fp16: one update is as big as the full fp16 adapter, two are bigger. 1-bit: an update
    # costs about 1/16 of the full fp16 adapter (tiny rows are short, so scales weigh more).
    fed, _ = _run_server(tiny_shapes, _cfg(codec), rounds)
    records, nbytes = fed.downlink(node_id=7)  # a node the server has not identified
    assert (FULL in records) is expect_full
    assert nbytes == sum(int(sum(a.nbytes for a in p.values())) for p in records.values())
    fed.record_device(7, "dev", fed.state.version)
    assert fed.downlink(node_id=7) == ({}, 0)  # an up-to-date device gets nothing


def test_bounded_chain_keeps_the_newest_updates_a_chain_cheaper_than_full_needs() -> None:
    updates = {v: {"x": np.zeros(10, np.uint8)} for v in range(1, 8)}  # 10 bytes each
    assert list(bounded_chain(updates, 35)) == [5, 6, 7]  # 30 <= 35 < 40
    assert list(bounded_chain(updates, 30)) == [5, 6, 7]  # ties keep the chain (downlink picks it too)
    assert list(bounded_chain(updates, 1000)) == list(range(1, 8))
    assert bounded_chain({}, 35) == {}


def test_server_memory_holds_a_bounded_chain_and_old_devices_get_the_full_adapter(
    tmp_path: Path, tiny_shapes, peft_model
) -> None:
    cfg = _cfg("1bit")
    fed, _ = _run_server(tiny_shapes, cfg, rounds=40)
    full_bytes = expected_payload_bytes(fed.sent_shapes, full_codec("1bit"))
    kept = sorted(fed.state.updates)
    assert kept[-1] == 40 and kept == list(range(kept[0], 41)) and kept[0] > 1  # a contiguous newest suffix
    assert sum(payload_bytes(p) for p in fed.state.updates.values()) <= full_bytes
    assert sum(payload_bytes(fed.history[v]) for v in range(kept[0] - 1, 41)) > full_bytes  # one more would not pay
    for held, expect_full in ((kept[0] - 2, True), (kept[0] - 1, False), (39, False)):
        fed.record_device(node_id=held + 100, device_id=f"dev-{held}", version=held)
        records, _ = fed.downlink(held + 100)
        assert (FULL in records) is expect_full
        if not expect_full:
            assert sorted(records) == sorted(f"{UPDATE_PREFIX}{v}" for v in range(held + 1, 41))
    # A device behind the kept chain, synced from the full adapter, ends on the server's adapter.
    records, _ = fed.downlink(kept[0] - 2 + 100)
    state = sync_global(DeviceStorage(tmp_path), peft_model, cfg, Downlink(40, records[FULL], {}))
    assert _equal(state, fed.state.adapter)
