"""The command line: help, config errors and refusals that need no simulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgetune import wire
from edgetune.cli import main


def test_simulate_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--rounds", "--devices", "--codec", "--resume", "--set", "--base"):
        assert flag in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["simulate", "--codec", "2bit"], "federation.codec='2bit'"),
        (["simulate", "--rounds", "zero"], "federation.rounds='zero'"),
        (["simulate", "--set", "lora.rnak=4"], "unknown config key 'lora.rnak'"),
        (["simulate", "--set", "lora.rank"], "expected KEY=VALUE"),
    ],
)
def test_bad_values_exit_2_with_the_key_named(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_resume_needs_a_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--resume", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / wire.CHECKPOINT_DIR).mkdir()
    (tmp_path / wire.CONFIG_FILE).write_text(json.dumps({}))
    assert main(["simulate", "--run-dir", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.e2e
def test_simulate_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    argv = ["simulate", "--base", "tiny", "--rounds", "2", "--devices", "2", "--steps", "1", "--batch-size", "2"]
    argv += ["--set", "data.max-length=128", "--set", "lora.rank=2", "--run-dir", str(run)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "eval loss" in out and "fp32 up" in out  # the summary table
    for name in ("loss.png", "bytes.png", "metrics.jsonl", "config.json", "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    # Resuming a finished run with more rounds continues from its last checkpoint.
    assert main(["simulate", "--resume", str(run), "--rounds", "3"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
