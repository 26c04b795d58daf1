"""The command line: help, config errors and refusals that need no simulation."""

from __future__ import annotations

import json
import subprocess
import sys
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
        (["simulate", "--codec", "3bit"], "federation.codec='3bit'"),
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


# ---- inputs checked before Ray starts ---------------------------------------------------------


def _bad_data(tmp: Path, case: str) -> tuple[Path, str]:
    """A bad --data file and the start of the one line that must name it."""
    path = tmp / f"{case}.jsonl"
    good = json.dumps({"prompt": "What is 2 plus 2?", "response": "4."}) + "\n"
    if case == "missing":
        return path, f"{path}: data file not found"
    if case == "broken-line":
        path.write_text(good * 3 + '{"prompt": "a", "response": \n')
        return path, f"{path}:4: invalid JSON"
    if case == "wrong-fields":
        path.write_text(good + json.dumps({"prompt": "a", "answer": "b"}) + "\n")
        return path, f"{path}:2: keys ['answer', 'prompt']"
    if case == "empty":
        path.write_text("\n")
        return path, f"{path}: file holds no conversations"
    if case == "not-utf8":
        path.write_bytes(good.encode() + b'{"prompt": "\xff", "response": "b"}\n')
        return path, f"{path}:2: not valid UTF-8"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "broken-line", "wrong-fields", "empty", "not-utf8"])
def test_bad_data_exits_2_with_one_line_before_ray_starts(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    data, expected = _bad_data(tmp_path, case)
    argv = ["simulate", "--base", "tiny", "--devices", "2", "--data", str(data), "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edgetune: --data: {expected}"), lines
    err = lines[0]
    assert "Traceback" not in err and not ray.is_initialized()
    assert not (tmp_path / "run" / wire.STATUS_FILE).exists()  # nothing started


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--devices", "10000"], "--data chatterbot for --devices 10000 (device 0): 21 slices cannot fill 10000"),
        (["--base", "EMPTY"], "has no config.json: not a Hugging Face model folder"),
        (["--base", "NOWHERE"], "no such file or folder"),
    ],
)
def test_bad_base_or_device_count_exits_2_at_once(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "EMPTY").mkdir()
    flags = [str(tmp_path / f) if f in ("EMPTY", "NOWHERE") else f for f in flags]
    argv = ["simulate", "--base", "tiny", *flags, "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_run_refuses_a_base_that_is_no_model_before_submitting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "EMPTY").mkdir()
    assert main(["run", "--base", str(tmp_path / "EMPTY"), "--insecure-plaintext"]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_importing_the_device_and_server_code_prints_nothing() -> None:
    """A quiet console: optional dependencies' import-time warnings (torchao's CUDA kernels on a
    CPU-only torch, torch's pytree deprecation notes, the second as torch.export's copies of a
    pytree spec raise it) stay out of every process, Ray actors too."""
    code = (
        "import edgetune.client.app, edgetune.server.app, torchao.quantization, copy\n"
        "from torch.utils._pytree import LeafSpec\n"
        "copy.deepcopy(LeafSpec())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout == "" and done.stderr == ""
