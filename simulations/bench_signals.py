"""Ctrl-C and SIGTERM on real devices: seconds to ``status.json`` and to the process gone, and resume.

On 127.0.0.1 with TLS and device keys, every job a separate ``edgetune`` process in a session
of its own (stopped by PID, as a terminal's Ctrl-C reaches a process group)::

    1. edgetune server, N x edgetune device join
    2. edgetune run, uninterrupted (--rounds R)
    3. edgetune run again in a new run folder; SIGINT as soon as round 1 is in metrics.jsonl
       (round 2 is under way); then the same command again: its adapter against step 2's
    4. device join: SIGTERM to the first device
    5. a run that waits for one device more than there are; SIGTERM to the server (its
       ServerApp marks that run's folder); SIGINT to that run's follower; SIGTERM to the
       other devices
    6. no process any job started (or any process those started) is left

    python -m edgetune.simulations.bench_signals --base tiny --devices 2 --rounds 3

Prints a table and one JSON line (also written to ``--out``/result.json).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from edgetune import wire
from edgetune.simulations.bench_cli import federation_parser, federation_settings

__all__ = ["main"]

TINY_SETTINGS = {"lora.rank": 4, "data.max-length": 128, "train.batch-size": 4}  # as tests/test_deployment.py
WAIT = 600.0  # seconds any stage may take on a shared machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Jobs:
    """``edgetune`` processes, each in its own session with its output in a file; their families sampled."""

    def __init__(self, out: Path) -> None:
        self.out, self.procs, self.seen = out, {}, {}
        self._done = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._done.wait(0.2):
            for proc in list(self.procs.values()):
                try:
                    root = psutil.Process(proc.pid)
                    for p in [root, *root.children(recursive=True)]:
                        self.seen.setdefault(p.pid, p)
                except psutil.NoSuchProcess:
                    continue

    def start(self, name: str, *args: str) -> subprocess.Popen[str]:
        log = (self.out / f"{name}.out").open("w")
        cmd = [sys.executable, "-m", "edgetune.cli", *args]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.procs[name] = proc
        return proc

    def wait_for(self, name: str, text: str) -> None:
        deadline = time.monotonic() + WAIT
        while text not in (self.out / f"{name}.out").read_text():
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no {text!r}; see {self.out / f'{name}.out'}")
            time.sleep(0.1)

    def alive(self) -> list[str]:
        out = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(" ".join(p.cmdline())[:100])
            except psutil.NoSuchProcess:
                continue
        return out

    def close(self) -> None:
        self._done.set()
        for p in self.seen.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def _signal(proc: subprocess.Popen[str], sig: int, status: Path | None = None) -> dict:
    """Send ``sig`` to ``proc``'s process group; seconds to ``status`` changing and to the process gone."""
    old = status.read_text() if status is not None and status.is_file() else None
    sent = time.monotonic()
    os.killpg(proc.pid, sig)
    to_status = None
    while proc.poll() is None and time.monotonic() - sent < WAIT:
        if status is not None and to_status is None and status.is_file() and status.read_text() != old:
            to_status = time.monotonic() - sent
        time.sleep(0.01)
    gone = time.monotonic() - sent
    body = json.loads(status.read_text()) if status is not None and status.is_file() else {}
    if status is not None and to_status is None and status.read_text() != old:
        to_status = gone
    return {
        "exit": proc.returncode,
        "status_s": None if to_status is None else round(to_status, 2),
        "gone_s": round(gone, 2),
        "status": body.get("status"),
        "last_round": body.get("last_round"),
    }


def _rounds(run_dir: Path) -> list[int]:
    try:
        return [json.loads(line)["round"] for line in (run_dir / wire.METRICS_FILE).read_text().splitlines()]
    except (OSError, ValueError):
        return []


def _adapter(run_dir: Path):
    from safetensors.torch import load_file

    return load_file(str(run_dir / wire.ADAPTER_DIR / "adapter_model.safetensors"))


def _measure(args, out: Path, jobs: _Jobs) -> dict:
    import torch

    fleet, control = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    names = [f"dev-{i}" for i in range(args.devices)]
    keys, ca = out / "keys", out / "state" / wire.SERVER_TLS_DIR / "ca.pem"
    for name in names:
        subprocess.run(
            [sys.executable, "-m", "edgetune.cli", "device", "keygen", "--out", str(keys), "--name", name],
            check=True,
            capture_output=True,
        )
    allow = [a for n in names for a in ("--allow-device", str(keys / f"{n}.pub"))]
    server = jobs.start(
        "server", "server", "--state-dir", str(out / "state"), "--listen", fleet, "--control", control, *allow
    )
    jobs.wait_for("server", "ready:")
    for i, name in enumerate(names):
        data = out / f"{name}.jsonl"
        rows = [
            {"prompt": f"device {i} question {j}?", "response": f"device {i} answer number {j}."} for j in range(24)
        ]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        jobs.start(
            name,
            "device",
            "join",
            "--server",
            fleet,
            "--data",
            str(data),
            "--storage",
            str(out / f"st-{name}"),
            "--key",
            str(keys / f"{name}.key"),
            "--ca",
            str(ca),
        )
    for name in names:
        jobs.wait_for(name, "connected to the server as node")
    flat = {**federation_settings(args), **(TINY_SETTINGS if args.base == "tiny" else {})}
    flat.pop("federation.num-devices", None)
    run = ["run", "--server", control, "--ca", str(ca), *[a for k, v in flat.items() for a in ("--set", f"{k}={v}")]]
    run += ["--devices", str(args.devices)]
    started = time.monotonic()
    full = jobs.start("full", *run, "--run-dir", str(out / "full"))
    if full.wait(timeout=WAIT) != 0:
        raise RuntimeError(f"the uninterrupted run failed; see {out / 'full.out'}")
    result: dict = {"uninterrupted_run_s": round(time.monotonic() - started, 1)}
    resumed = out / "resumed"
    first = jobs.start("interrupted", *run, "--run-dir", str(resumed))
    deadline = time.monotonic() + WAIT
    while 1 not in _rounds(resumed) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    result["run_sigint_in_round_2"] = _signal(first, signal.SIGINT, resumed / wire.STATUS_FILE)
    again = jobs.start("resumed", *run, "--run-dir", str(resumed))
    if again.wait(timeout=WAIT) != 0:
        raise RuntimeError(f"the resumed run failed; see {out / 'resumed.out'}")
    want, got = _adapter(out / "full"), _adapter(resumed)
    result["resumed_adapter_equal"] = want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    result["join_sigterm"] = _signal(jobs.procs[names[0]], signal.SIGTERM)
    waiting = out / "waiting"
    follower = jobs.start(
        "waiting", *run[:-2], "--devices", str(args.devices + 1), "--run-dir", str(waiting), "--server-wait", "60"
    )
    deadline = time.monotonic() + WAIT
    while '"running"' not in _read(waiting / wire.STATUS_FILE) and time.monotonic() < deadline:
        time.sleep(0.1)
    result["server_sigterm_run_waiting"] = _signal(server, signal.SIGTERM, waiting / wire.STATUS_FILE)
    jobs.wait_for("waiting", "does not answer")
    result["run_sigint_server_gone"] = _signal(follower, signal.SIGINT)
    for name in names[1:]:
        result[f"join_sigterm_{name}_server_gone"] = _signal(jobs.procs[name], signal.SIGTERM)
    time.sleep(1)
    result["left_behind"] = jobs.alive()
    result["processes_seen"] = len(jobs.seen)
    return result


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = federation_parser(__doc__, out="bench-out/signals", base="tiny", devices=2, rounds=3, steps=2)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["FLWR_HOME"] = str(out / "flwr-home")  # the jobs inherit it: installed bundles go here
    jobs = _Jobs(out)
    try:
        result = _measure(args, out, jobs)
    finally:
        jobs.close()
    result["settings"] = {"base": args.base, "devices": args.devices, "rounds": args.rounds, "steps": args.steps}
    print(f"{'job, signal':42} {'exit':>4} {'status.json s':>13} {'gone s':>7}  status")
    for key, row in result.items():
        if isinstance(row, dict) and "gone_s" in row:
            status = f"{row['status']} (last round {row['last_round']})" if row["status"] else "-"
            shown = "-" if row["status_s"] is None else f"{row['status_s']:.2f}"
            print(f"{key:42} {row['exit']:>4} {shown:>13} {row['gone_s']:>7.2f}  {status}")
    print(f"resumed adapter equals the uninterrupted run's: {result['resumed_adapter_equal']}")
    print(f"processes left behind: {len(result['left_behind'])} of {result['processes_seen']} seen")
    line = json.dumps(result)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(line)
    return 0 if result["resumed_adapter_equal"] and not result["left_behind"] else 1


if __name__ == "__main__":
    sys.exit(main())
