"""Tests for the privacy audit: uplink records and verdicts, exposure and membership-inference
maths on hand-made numbers, the guarantee against dp-accounting, canaries, report.json, and
(e2e) a tiny audit simulation whose report renders in headless Chromium.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from edgetune import wire
from edgetune.adapters.codec import encode
from edgetune.config import ConfigError, from_flat, to_flat
from edgetune.datasets.devices import canary_file_for, planted_canaries
from edgetune.server.audit.canaries import ensure_canaries, read_canaries
from edgetune.server.audit.exposure import exposure, exposure_summary
from edgetune.server.audit.guarantee import empirical_bound, rederive_epsilon
from edgetune.server.audit.membership import bound_check, clopper_pearson, roc_auc, roc_points, tpr_at_fpr
from edgetune.server.audit.report import build_report, write_report
from edgetune.server.uplinks import ALLOWED_VERDICT, describe_uplink, read_uplinks, record_uplink

B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


# ---- uplinks ----------------------------------------------------------------------------


def _instruction(kind: str) -> Message:
    meta = Metadata(
        run_id=1,
        message_id="m",
        src_node_id=1,
        dst_node_id=5,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=kind,
    )
    return Message(RecordDict(), metadata=meta)


def _train_reply(**extra: object) -> Message:
    delta = encode({B: torch.randn(16, 4, generator=torch.Generator().manual_seed(0))}, "1bit")
    content = RecordDict(
        {
            wire.METRICS: MetricRecord(
                {wire.ROUND: 1, wire.HELD_VERSION: 0, wire.NUM_EXAMPLES: 4, wire.TRAIN_LOSS: 2.0}
            ),
            wire.DEVICE: ConfigRecord({wire.DEVICE_ID: "sim-0"}),
            wire.DELTA: ArrayRecord({k: Array(v) for k, v in delta.items()}),
        }
    )
    for key, record in extra.items():
        content[key] = record
    return Message(content, reply_to=_instruction("train"))


def test_train_reply_is_recorded_with_shapes_bytes_and_clean_verdict(tmp_path: Path) -> None:
    line = record_uplink(tmp_path, 1, "train", _train_reply())
    assert read_uplinks(tmp_path) == [line]
    assert (line["round"], line["kind"], line["device"], line["node"]) == (1, "train", "sim-0", 5)
    assert line["verdict"] == ALLOWED_VERDICT and line["offending"] == []
    delta = next(r for r in line["records"] if r["record"] == wire.DELTA)
    items = {i["name"]: i for i in delta["items"]}
    assert set(items) == {f"{B}:bits", f"{B}:scales"}
    assert items[f"{B}:bits"]["dtype"] == "uint8" and items[f"{B}:bits"]["shape"] == [16 * 4 // 8]  # packed bits
    assert line["bytes"] == sum(i["bytes"] for i in items.values()) > 0
    assert {r["record"]: r.get("keys") for r in line["records"] if r["type"] != "array"}[wire.DEVICE] == ["device-id"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"notes": ConfigRecord({"text": "my PIN is 1234"})}, "config record 'notes'"),
        ({wire.DEVICE: ConfigRecord({wire.DEVICE_ID: "sim-0", "hostname": "alice-phone"})}, "['hostname']"),
        ({"embeddings": ArrayRecord({"x": Array(np.zeros(3, dtype=np.float32))})}, "array record 'embeddings'"),
        ({wire.METRICS: MetricRecord({wire.ROUND: 1, "pin": 1234})}, "'pin' is not a known metric"),
        ({wire.METRICS: MetricRecord({wire.ROUND: 1, wire.TRAIN_LOSS: [1.0, 2.0]})}, "is a list"),
    ],
)
def test_smuggled_content_is_flagged(extra: dict, needle: str) -> None:
    line = describe_uplink(1, "train", _train_reply(**extra))
    assert line["verdict"] == "flagged"
    assert any(needle in o for o in line["offending"]), line["offending"]


def test_error_reply_and_delta_in_evaluate_are_flagged() -> None:
    error = Message(Error(code=0, reason="Traceback: secret text"), reply_to=_instruction("train"))
    line = describe_uplink(2, "train", error)
    assert line["verdict"] == "flagged" and line["device"] == "node-5"
    assert "error text (22 characters)" in line["offending"][0]
    assert describe_uplink(2, "evaluate", _train_reply())["verdict"] == "flagged"


# ---- exposure and membership maths --------------------------------------------------------


def test_exposure_hand_computed() -> None:
    refs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # M = 7: log2(M + 1) = 3
    assert exposure(0.5, refs) == 3.0  # rank 1
    assert exposure(2.5, refs) == pytest.approx(3 - math.log2(3))  # rank 3
    assert exposure(9.0, refs) == 0.0  # rank 8 of 8
    s = exposure_summary([3.0, 3.0], [1.0, 0.0], references=7, epsilon=None, delta=0.0)
    assert (s["planted_mean"], s["unplanted_mean"], s["auc_planted_vs_unplanted"]) == (3.0, 0.5, 1.0)
    assert s["memorisation_detected"] and s["bound"] is None


def test_roc_auc_and_tpr_at_fpr_hand_computed() -> None:
    members, outsiders = [0.9, 0.8, 0.7, 0.3], [0.6, 0.4, 0.2, 0.1]
    # pairs member > non-member: 0.9, 0.8, 0.7 beat all 4 (12), 0.3 beats 0.2 and 0.1 (2): 14 / 16
    assert roc_auc(members, outsiders) == pytest.approx(14 / 16)
    assert roc_auc([1.0], [1.0]) == 0.5  # a tie counts half
    assert tpr_at_fpr(members, outsiders, 0.0) == 0.75  # threshold 0.7: no false positive
    assert tpr_at_fpr(members, outsiders, 0.25) == 0.75  # threshold 0.6 adds a false positive only
    assert tpr_at_fpr(members, outsiders, 0.5) == 1.0  # threshold 0.3
    fpr, tpr, _ = roc_points(members, outsiders)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


def test_clopper_pearson_and_bound_check() -> None:
    lo, hi = clopper_pearson(np.array([0, 10]), 10, 0.95)
    assert lo[0] == 0.0 and hi[1] == 1.0
    assert hi[0] == pytest.approx(1 - 0.05 ** (1 / 10))  # 0 of 10: upper bound solves (1-p)^10 = 0.05
    assert lo[1] == pytest.approx(0.05 ** (1 / 10))
    rng = np.random.default_rng(0)
    same = bound_check(rng.normal(size=500), rng.normal(size=500), epsilon=0.5, delta=1e-5)
    assert not same["contradicts"] and same["empirical_epsilon_lower_bound"] < 0.5
    apart = bound_check(rng.normal(8, 1, 500), rng.normal(0, 1, 500), epsilon=1.0, delta=1e-5)
    assert apart["contradicts"] and apart["empirical_epsilon_lower_bound"] > 1.0
    assert not bound_check(rng.normal(8, 1, 500), rng.normal(0, 1, 500), epsilon=50.0, delta=1e-5)["contradicts"]


# ---- the guarantee -------------------------------------------------------------------------


def test_rederived_epsilon_matches_dp_accounting_directly() -> None:
    acc = RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(1.5)), 4)
    assert rederive_epsilon("poisson", "rdp", 8, 2, 1.5, 4, 1e-5) == pytest.approx(acc.get_epsilon(1e-5))
    assert rederive_epsilon("fixed", "rdp", 8, 2, 1.5, 0, 1e-5) == 0.0
    bound = empirical_bound("poisson", 1.0, 1e-5)
    assert bound["epsilon"] == 2.0 and bound["delta"] == pytest.approx((1 + math.e) * 1e-5)
    assert empirical_bound("fixed", 1.0, 1e-5)["epsilon"] == 1.0


def _fake_run(run_dir: Path, dp: bool) -> dict:
    """A finished 2-round run folder written by hand (no simulation)."""
    flat = to_flat(
        from_flat(
            {
                "run-dir": str(run_dir),
                "model.base": "tiny",
                "federation.num-devices": 4,
                "federation.devices-per-round": 2,
                "dp.enabled": dp,
                "dp.noise-multiplier": 1.5,
            }
        )
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / wire.CONFIG_FILE).write_text(json.dumps(flat))
    eps = [rederive_epsilon("poisson", "rdp", 4, 2, 1.5, r, 1e-5) for r in (1, 2)]
    rows = [{"round": 0, "eval_loss": 3.0}] + [
        {"round": r, "eval_loss": 2.0, "dp_epsilon": eps[r - 1] if dp else None, "dp_clipped_fraction": 0.5}
        for r in (1, 2)
    ]
    (run_dir / wire.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    record_uplink(run_dir, 1, "train", _train_reply())
    record_uplink(run_dir, 1, "train", _train_reply(notes=ConfigRecord({"text": "hello"})))
    return flat


def test_report_json_without_empirical_tests(tmp_path: Path) -> None:
    _fake_run(tmp_path / "run", dp=True)
    report = build_report(tmp_path / "run")
    html_path, json_path = write_report(report, tmp_path / "out")
    saved = json.loads(json_path.read_text())
    g = saved["guarantee"]
    assert g["enabled"] and g["rounds"] == 2 and g["epsilon_matches"]
    assert g["epsilon"] == pytest.approx(rederive_epsilon("poisson", "rdp", 4, 2, 1.5, 2, 1e-5))
    assert g["per_round"]["clipped_fraction"] == [0.5, 0.5] and g["sampling_probability"] == 0.5
    assert g["relation"].startswith("user-level")
    up = saved["uplinks"]
    assert (up["replies"], up["flagged"], up["verdict"]) == (2, 1, "flagged")
    assert "config record 'notes'" in up["offending"][0]
    assert saved["empirical"] is None and saved["control"] is None
    assert any(s.startswith("Guarantee: (") for s in saved["summary"])
    assert any("1 of 2 replies" in s for s in saved["summary"])
    html = html_path.read_text()
    assert "<details>" in html and 'src="data:image/png;base64,' in html
    off = build_report(_fake_run(tmp_path / "off", dp=False) and tmp_path / "off")
    assert off["guarantee"]["enabled"] is False
    assert any("no formal differential-privacy guarantee" in s for s in off["summary"])


# ---- canaries -------------------------------------------------------------------------------


def test_canaries_are_random_planted_round_robin_and_repeated(tmp_path: Path) -> None:
    cfg = from_flat(
        {"federation.num-devices": 3, "audit.canaries": 4, "audit.canary-devices": 2, "audit.canary-repeats": 3}
    )
    first = ensure_canaries(tmp_path / "a", cfg) if (tmp_path / "a").mkdir() is None else None
    assert first is not None and read_canaries(tmp_path / "a") == first
    assert ensure_canaries(tmp_path / "a", cfg) == first  # a resumed run keeps its secrets
    (tmp_path / "b").mkdir()
    other = ensure_canaries(tmp_path / "b", dataclasses.replace(cfg, seed=1))
    (tmp_path / "c").mkdir()
    assert ensure_canaries(tmp_path / "c", cfg) == first  # the run seed fixes the draw, on any machine
    secrets_a = [c["secret"] for c in first.planted + first.unplanted]
    assert len(set(secrets_a)) == 8 and all(len(s) == 8 and s.isdigit() for s in secrets_a)
    assert set(secrets_a).isdisjoint(c["secret"] for c in other.planted + other.unplanted)  # another seed
    assert [c["device"] for c in first.planted] == [0, 1, 0, 1]
    path = canary_file_for(cfg, str(tmp_path / "a" / wire.DEVICES_DIR))
    mine = planted_canaries(path, 0)
    assert len(mine) == 2 * 3 and mine[0][1]["content"].endswith(f"{first.planted[0]['secret']}.")
    assert planted_canaries(path, 2) == [] and planted_canaries("", 0) == []
    with pytest.raises(ConfigError, match="audit.canary-devices=4"):
        ensure_canaries(
            tmp_path, from_flat({"federation.num-devices": 3, "audit.canaries": 1, "audit.canary-devices": 4})
        )


# ---- end to end: tiny audit run, report, headless Chromium --------------------------------


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _png_is_blank(data: bytes) -> bool:
    """True for a (near) one-colour image: its decoded scanlines hold only a few byte values
    (a white 1200x1600 page: 4; a rendered report: all 256)."""
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return len(set(zlib.decompress(idat))) < 32


@pytest.fixture(scope="module")
def audit_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny audit simulation (DP off, exact fp32 exchange, one device whose 40 short
    conversations sit beside 2 canaries x 30 copies) and its report with the empirical tests."""
    from edgetune.simulations.simulate import simulate

    root = tmp_path_factory.mktemp("audit")
    data = root / "device.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}."}) + "\n" for i in range(40))
    )
    run = root / "run"
    flat = {
        "run-dir": str(run),
        "seed": 3,
        "model.base": "tiny",
        "lora.rank": 4,
        "data.source": str(data),
        "data.max-length": 128,
        "train.local-steps": 40,
        "train.batch-size": 8,
        "train.learning-rate": 5e-2,
        "federation.rounds": 2,
        "federation.num-devices": 1,
        "federation.codec": "fp32",
        "audit.canaries": 2,
        "audit.canary-repeats": 30,
    }
    simulate(from_flat(flat))
    report = build_report(run, empirical=True, references=64, max_examples=40, reps=200)
    html_path, _ = write_report(report, run)
    return {"run": run, "report": report, "html": html_path}


@pytest.mark.e2e
def test_tiny_audit_run_detects_memorised_canaries(audit_run: dict) -> None:
    report = audit_run["report"]
    canaries = report["empirical"]["canaries"]["summary"]
    assert canaries["planted_mean"] > canaries["unplanted_mean"] + 2, canaries
    assert canaries["memorisation_detected"]
    assert report["uplinks"]["verdict"] == ALLOWED_VERDICT and report["uplinks"]["replies"] == 2 + 3  # train + evaluate
    membership = report["empirical"]["membership"]
    assert membership["loss"]["members"] >= 20 and 0.0 <= membership["calibrated"]["auc"] <= 1.0
    assert not report["guarantee"]["enabled"]


@pytest.mark.e2e
def test_report_renders_in_headless_chromium(audit_run: dict, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is missing: run ./install.sh as root, or apt-get install -y chromium"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    url = audit_run["html"].resolve().as_uri()
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert '<section id="summary"><h2>Summary</h2>' in dom
    assert dom.count('src="data:image/png;base64,') >= 2  # canary exposure and ROC
    shot = tmp_path / "shot.png"
    size = ["--window-size=1200,1600", f"--screenshot={shot}"]
    subprocess.run([chromium, *flags, *size, url], capture_output=True, timeout=120, check=True)
    data = shot.read_bytes()
    assert _png_size(data) == (1200, 1600)
    assert not _png_is_blank(data)


# ---- command line ---------------------------------------------------------------------------


def test_audit_command_writes_the_report_and_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from edgetune.cli import main

    _fake_run(tmp_path / "run", dp=True)
    assert main(["audit", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / wire.REPORT_HTML).is_file() and (tmp_path / "out" / wire.REPORT_JSON).is_file()
    assert "Guarantee: (" in capsys.readouterr().out
    assert main(["audit", str(tmp_path / "nothing")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["audit", str(tmp_path / "run"), "--set", "dp.enabled=true"]) == 2
    assert main(["audit", str(tmp_path / "run"), "--control"]) == 2
    assert "needs --launch" in capsys.readouterr().err
