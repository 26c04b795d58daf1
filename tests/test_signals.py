"""Ctrl-C and SIGTERM: the shared mechanism (edgetune/processes.py), then the real-device jobs on 127.0.0.1.

The end-to-end test (``-m e2e``) covers ``run``, ``device join`` and ``server``.

One plain-text federation: ``edgetune server``, one ``edgetune device join`` and an ``edgetune
run`` that asks for two devices, so its ServerApp (a real ``flwr-serverapp`` process, tiny
model) waits for the second one and no training time is spent. Then:

    run      SIGINT to its process group (a terminal's Ctrl-C): exit 130 within 10 s, one
             line, the run folder ``interrupted`` at round 0 (written by the ServerApp), the
             run's ServerApp process gone
    join     SIGINT, and a second one 0.3 s later (giving up waiting): exit 130 within 10 s,
             one line, no SuperNode (or process it started) left
    server   SIGTERM: exit 130 within 10 s, one line, no SuperLink, SuperExec or ServerApp
             process left

Every process is started in a session of its own and stopped by PID. The seconds from each
signal to ``status.json`` and to the process being gone are printed (``pytest -s``). About
60-90 s on the shared two-core machine, mostly Python process starts.
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
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from edgetune import wire
from edgetune.processes import stop_on_signals, stop_tree

START_TIMEOUT = 180  # seconds for a process to reach a stage; generous: the machine may be shared
STOP_LIMIT = 10.0  # the bound from signal to process gone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Job:
    """One ``edgetune`` command in its own session, output in a file, its family sampled."""

    def __init__(self, root: Path, name: str, *args: str) -> None:
        self.out = root / f"{name}.out"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgetune.cli", *args],
            stdout=self.out.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.family: dict[int, psutil.Process] = {}
        self._done = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._done.wait(0.2):
            try:
                root = psutil.Process(self.proc.pid)
                for p in [root, *root.children(recursive=True)]:
                    self.family.setdefault(p.pid, p)
            except psutil.NoSuchProcess:
                return

    def text(self) -> str:
        return self.out.read_text()

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while text not in self.text():
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {text!r} within {START_TIMEOUT}s:\n{self.text()[-3000:]}"
            time.sleep(0.2)

    def alive(self, name: str = "") -> list[str]:
        out = []
        for p in self.family.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and name in " ".join(p.cmdline()):
                    out.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
            except psutil.NoSuchProcess:
                continue
        return out

    def interrupt(self, sig: int, status: Path | None = None, twice: bool = False) -> tuple[str, float, float]:
        """Send ``sig`` to the job's process group; (output after it, s to status written, s to exit)."""
        before = len(self.text())
        old = status.read_text() if status is not None and status.is_file() else None
        sent = time.monotonic()
        os.killpg(self.proc.pid, sig)
        if twice:  # a moment later: two signals at once would reach the process as one
            time.sleep(0.3)
            os.killpg(self.proc.pid, sig)
        to_status = float("nan")
        while self.proc.poll() is None and time.monotonic() - sent < 60:
            if status is not None and to_status != to_status and status.is_file() and status.read_text() != old:
                to_status = time.monotonic() - sent
            time.sleep(0.02)
        took = time.monotonic() - sent
        self._done.set()
        if status is not None and to_status != to_status and status.read_text() != old:
            to_status = took
        return self.text()[before:], to_status, took

    def kill(self) -> None:
        self._done.set()
        for p in self.family.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


def _one_line(after: str, start: str) -> None:
    lines = [line for line in after.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(start), after
    assert "Traceback" not in after


def _wait_running(run_dir: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    status = run_dir / wire.STATUS_FILE
    while not (status.is_file() and json.loads(status.read_text())["status"] == "running"):
        assert time.monotonic() < deadline, f"{status}: the ServerApp did not start"
        time.sleep(0.2)


@pytest.fixture()
def root(tmp_path: Path) -> Iterator[Path]:
    old_home = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(tmp_path / "flwr-home")  # children inherit it; installed bundles go here
    try:
        yield tmp_path
    finally:
        if old_home is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = old_home


def test_first_signal_asks_to_stop_and_the_second_to_hurry() -> None:
    stop, hurry = threading.Event(), threading.Event()
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(stop, hurry):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.is_set() and not hurry.is_set()
        os.kill(os.getpid(), signal.SIGINT)
        assert hurry.is_set()
    assert signal.getsignal(signal.SIGTERM) is before
    stop.clear()
    with pytest.raises(KeyboardInterrupt), stop_on_signals(stop):  # no hurry: the second signal raises
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)


def test_stop_tree_kills_a_family_that_ignores_sigterm_at_once_when_hurried() -> None:
    # A shell and its child that both ignore SIGTERM (an ignored signal stays ignored across exec).
    proc = subprocess.Popen(["sh", "-c", 'trap "" TERM; sleep 60 & sleep 60'], text=True, start_new_session=True)
    deadline = time.monotonic() + 10
    while len(psutil.Process(proc.pid).children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    hurry = threading.Event()
    hurry.set()
    start = time.monotonic()
    stop_tree(proc, timeout=30, hurry=hurry)  # without hurry: 30 s of SIGTERM ignored, then SIGKILL
    assert time.monotonic() - start < 5
    assert len(family) == 3 and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family)


@pytest.mark.e2e
def test_run_join_and_server_stop_on_the_first_signal(root: Path) -> None:
    fleet, control = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    data = root / "dev.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}?", "response": f"a{i}."}) + "\n" for i in range(8)))
    server_args = ["server", "--insecure-plaintext", "--state-dir", str(root / "state"), "--listen", fleet]
    device_args = ["device", "join", "--insecure-plaintext", "--server", fleet, "--data", str(data)]
    run_args = ["run", "--insecure-plaintext", "--server", control, "--devices", "2", "--rounds", "2", "--base", "tiny"]
    jobs: list[_Job] = []
    try:
        server = _Job(root, "server", *server_args, "--control", control)
        jobs.append(server)
        server.wait_for("ready:")
        # edgetune run: its ServerApp waits for a second device; Ctrl-C stops the run on the server.
        run_dir = root / "run-1"
        jobs.append(run := _Job(root, "run-1", *run_args, "--run-dir", str(run_dir)))
        jobs.append(device := _Job(root, "device", *device_args, "--storage", str(root / "device")))
        device.wait_for("connected to the server as node")
        _wait_running(run_dir)
        serverapps = server.alive("flwr-serverapp")
        after, to_status, took = run.interrupt(signal.SIGINT, run_dir / wire.STATUS_FILE)
        print(f"\nrun: SIGINT -> status.json {to_status:.2f} s, process gone {took:.2f} s")
        assert run.proc.returncode == 130 and took < STOP_LIMIT, (took, after)
        _one_line(after, "edgetune: interrupted; round 0 is the last completed")
        status = json.loads((run_dir / wire.STATUS_FILE).read_text())
        assert status["status"] == "interrupted" and status["last_round"] == 0, status
        waited = time.monotonic()
        while server.alive("flwr-serverapp") and time.monotonic() - waited < STOP_LIMIT:
            time.sleep(0.1)
        print(f"run: its ServerApp process gone {took + time.monotonic() - waited:.2f} s after the signal")
        assert serverapps and server.alive("flwr-serverapp") == []

        # edgetune device join: two Ctrl-C at once, the second gives up waiting.
        after, _, took = device.interrupt(signal.SIGINT, twice=True)
        print(f"device join: 2 x SIGINT -> process gone {took:.2f} s")
        assert device.proc.returncode == 130 and took < STOP_LIMIT, (took, after)
        _one_line(after, "edgetune: interrupted; device device left the federation")
        assert len(device.family) > 1 and device.alive() == []

        # edgetune server: SIGTERM stops the SuperLink and every process it started.
        after, _, took = server.interrupt(signal.SIGTERM)
        print(f"server: SIGTERM -> process gone {took:.2f} s")
        assert server.proc.returncode == 130 and took < STOP_LIMIT, (took, after)
        _one_line(after, "edgetune: interrupted; server stopped")
        assert len(server.family) > 2 and server.alive() == []  # SuperLink, SuperExec, the ServerApp, ...
    finally:
        for job in jobs:
            job.kill()
