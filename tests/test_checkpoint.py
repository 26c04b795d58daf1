"""Tests for server/checkpoint.py: a saved round resumes to an equal ServerState, and the
newest round wins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgetune.config import FederationConfig, LoraConfig, ModelConfig, RunConfig, to_flat
from edgetune.server.checkpoint import dir_bytes, latest_checkpoint, prune_run, save_checkpoint, save_update
from edgetune.server.federation import FederationError, _check_resumable
from edgetune.server.strategy import DeltaFedAvg, ServerState
from edgetune.wire import CHECKPOINT_DIR, CONFIG_FILE, UPDATES_DIR


def _server(shapes: dict[str, tuple[int, ...]], codec: str = "1bit") -> DeltaFedAvg:
    cfg = RunConfig(lora=LoraConfig(rank=4), model=ModelConfig(base="tiny"), federation=FederationConfig(codec=codec))
    return DeltaFedAvg(shapes, cfg)


def _round(fed: DeltaFedAvg, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    deltas = [{k: torch.randn(fed.sent_shapes[k], generator=gen) * 0.01 for k in fed.names} for _ in range(2)]
    fed.aggregate(deltas, [1.0, 3.0])


def _save_round(run_dir: Path, round_: int, fed: DeltaFedAvg) -> None:
    save_update(run_dir, fed.state.version, fed.state.updates[fed.state.version])
    save_checkpoint(run_dir, round_, fed.state)


def _assert_same_state(a: ServerState, b: ServerState) -> None:
    assert a.version == b.version
    assert a.held == b.held
    for mine, theirs in ((a.adapter, b.adapter), (a.residual, b.residual)):
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert a.updates.keys() == b.updates.keys()
    for v in a.updates:
        assert a.updates[v].keys() == b.updates[v].keys()
        for k in a.updates[v]:
            assert a.updates[v][k].dtype == b.updates[v][k].dtype
            np.testing.assert_array_equal(a.updates[v][k], b.updates[v][k])


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / CHECKPOINT_DIR).mkdir()
    assert latest_checkpoint(tmp_path) is None


@pytest.mark.parametrize("codec", ["1bit", "fp16", "fp32"])
def test_checkpoint_round_trip(tmp_path: Path, tiny_shapes, codec: str) -> None:
    fed = _server(tiny_shapes, codec)
    for r in range(1, 4):
        _round(fed, r)
        fed.record_device(node_id=r, device_id=f"dev-{r}", version=fed.state.version - 1)
        _save_round(tmp_path, r, fed)
    loaded = latest_checkpoint(tmp_path)
    assert loaded is not None
    round_, state = loaded
    assert round_ == 3
    assert state.held == {"dev-1": 0, "dev-2": 1, "dev-3": 2}
    _assert_same_state(state, fed.state)
    assert sorted(p.name for p in (tmp_path / UPDATES_DIR).iterdir()) == [
        "v0001.safetensors",
        "v0002.safetensors",
        "v0003.safetensors",
    ]


def test_resumed_server_continues_identically(tmp_path: Path, tiny_shapes) -> None:
    fed = _server(tiny_shapes)
    for r in (1, 2):
        _round(fed, r)
        _save_round(tmp_path, r, fed)
    _, state = latest_checkpoint(tmp_path)
    resumed = DeltaFedAvg(tiny_shapes, fed.cfg, state)
    _round(fed, 3)
    _round(resumed, 3)
    _assert_same_state(resumed.state, fed.state)


def test_latest_picks_the_newest_round(tmp_path: Path, tiny_shapes) -> None:
    fed = _server(tiny_shapes)
    _round(fed, 1)
    _save_round(tmp_path, 1, fed)
    save_checkpoint(tmp_path, 2, fed.state)  # a round whose replies were all dropped: same version
    _round(fed, 3)
    _save_round(tmp_path, 3, fed)
    round_, state = latest_checkpoint(tmp_path)
    assert round_ == 3 and state.version == 2
    _assert_same_state(state, fed.state)


def test_latest_picks_the_newest_round_past_9999(tmp_path: Path, tiny_shapes) -> None:
    fed = _server(tiny_shapes)
    save_checkpoint(tmp_path, 9999, fed.state)
    save_checkpoint(tmp_path, 10000, fed.state)
    assert latest_checkpoint(tmp_path)[0] == 10000


def test_unreadable_newest_checkpoint_raises_naming_it(tmp_path: Path, tiny_shapes) -> None:
    fed = _server(tiny_shapes)
    save_checkpoint(tmp_path, 1, fed.state)
    (tmp_path / CHECKPOINT_DIR / "round_0002.safetensors").write_bytes(b"half a file")
    with pytest.raises(ValueError, match="round_0002"):
        latest_checkpoint(tmp_path)


def test_missing_update_raises(tmp_path: Path, tiny_shapes) -> None:
    fed = _server(tiny_shapes)
    _round(fed, 1)
    save_checkpoint(tmp_path, 1, fed.state)  # the update file was never written
    with pytest.raises(FileNotFoundError, match="v0001"):
        latest_checkpoint(tmp_path)


def _saved_run(tmp_path: Path, flat: dict) -> Path:
    (tmp_path / CHECKPOINT_DIR).mkdir()
    (tmp_path / CONFIG_FILE).write_text(json.dumps(flat))
    return tmp_path


def test_resume_accepts_a_folder_from_before_new_config_sections(tmp_path: Path) -> None:
    cfg = RunConfig(run_dir=str(tmp_path))
    older = {k: v for k, v in to_flat(cfg).items() if not k.startswith("rag.")}  # written before rag.* existed
    _check_resumable(_saved_run(tmp_path, older), cfg)


def test_resume_refuses_changed_settings_naming_them(tmp_path: Path) -> None:
    cfg = RunConfig(run_dir=str(tmp_path))
    changed = {**to_flat(cfg), "lora.rank": 4}
    with pytest.raises(FederationError, match="lora.rank"):
        _check_resumable(_saved_run(tmp_path, changed), cfg)


def test_prune_keeps_the_newest_and_every_kth_and_the_run_still_resumes(tmp_path: Path, tiny_shapes) -> None:
    fed = _server(tiny_shapes, codec="fp16")  # fp16: one update is as big as the full adapter
    for r in range(1, 11):
        _round(fed, r)
        _save_round(tmp_path, r, fed)
        prune_run(tmp_path, keep=2, every=4)
    kept = sorted(p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir())
    assert kept == [f"round_{r:04d}.safetensors" for r in (4, 8, 9, 10)]
    # Round 9's chain starts at v9 (one fp16 update costs as much as the full adapter).
    assert sorted(p.name for p in (tmp_path / UPDATES_DIR).iterdir()) == ["v0009.safetensors", "v0010.safetensors"]
    round_, state = latest_checkpoint(tmp_path)
    assert round_ == 10 and sorted(state.updates) == [10]
    _assert_same_state(state, fed.state)


def test_prune_with_keep_one_leaves_one_checkpoint_and_its_chain(tmp_path: Path, tiny_shapes) -> None:
    fed = _server(tiny_shapes)  # 1-bit: a chain of several updates is cheaper than the full adapter
    for r in range(1, 6):
        _round(fed, r)
        _save_round(tmp_path, r, fed)
        removed = prune_run(tmp_path, keep=1)
        assert all(p.parent.name == CHECKPOINT_DIR for p in removed)  # five 1-bit updates: all still needed
    assert [p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir()] == ["round_0005.safetensors"]
    assert len(list((tmp_path / UPDATES_DIR).iterdir())) == 5
    assert dir_bytes(tmp_path) == sum(p.stat().st_size for p in tmp_path.rglob("*.safetensors"))
    _assert_same_state(latest_checkpoint(tmp_path)[1], fed.state)
