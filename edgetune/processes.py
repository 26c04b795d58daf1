"""Flower's own executables as child processes: start them, watch their logs, stop them with their children.

``edgetune server`` and ``edgetune device join`` run ``flower-superlink`` / ``flower-supernode``
in the foreground. Flower starts helpers of its own (``flower-superexec``, then one
``flwr-serverapp`` / ``flwr-clientapp`` per run or message), some in new sessions, so a
process group does not hold them all: :func:`stop_tree` stops a process *and every
descendant it has at that moment*, politely first (SIGTERM), then SIGKILL.

Ctrl-C and SIGTERM, the same in every long job (``simulate``, ``run``, ``server``,
``device join``): :func:`stop_on_signals` turns the first one into a stop request the job
checks, and the second into "give up waiting" (:func:`stop_tree` then kills at once). The
job ends with one line and :data:`EXIT_INTERRUPTED`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

__all__ = [
    "EXIT_INTERRUPTED",
    "STOP_GRACE",
    "flower_env",
    "flower_executable",
    "forward_signals",
    "pump_lines",
    "start",
    "stop_on_signals",
    "stop_tree",
]

EXIT_INTERRUPTED = 130  # the shell's code for "stopped by a signal" (128 + SIGINT)
STOP_GRACE = 5.0  # seconds a child stopped after a signal gets before SIGKILL: the job ends within 10 s


def flower_executable(name: str) -> str:
    """Path of a Flower console script installed beside this Python (``flower-superlink`` ...).

    Raises:
        FileNotFoundError: Flower is not installed in this environment.
    """
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; is flwr installed in this environment?")
    return str(path)


def flower_env() -> dict[str, str]:
    """The environment for Flower's processes: this environment's bin first, no phoning home.

    Flower starts its helpers by bare name (``flower-superexec``), so they must be on PATH;
    its telemetry and update check would try the network on every start.
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1  # noqa: N806 - the name in <sys/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start(command: list[str]) -> subprocess.Popen[str]:
    """Start ``command`` in a session of its own (so a terminal's Ctrl-C reaches only us).

    Its output (stdout and stderr together) is a text pipe to read with :func:`pump_lines`.
    On Linux it is also told to stop when this process dies, however it dies: a killed
    ``edgetune server`` must not leave a SuperLink holding its ports.
    """
    return subprocess.Popen(
        command,
        preexec_fn=_die_with_parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=flower_env(),
        start_new_session=True,
    )


def pump_lines(proc: subprocess.Popen[str], log_file: Path, on_line: Callable[[str], None]) -> threading.Thread:
    """Copy ``proc``'s output to ``log_file`` line by line and hand each line to ``on_line`` (a thread)."""

    def pump() -> None:
        assert proc.stdout is not None
        with log_file.open("a", encoding="utf-8") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                on_line(line.rstrip("\n"))

    thread = threading.Thread(target=pump, name=f"pump-{proc.pid}", daemon=True)
    thread.start()
    return thread


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_tree(proc: subprocess.Popen[str], timeout: float = 10.0, hurry: threading.Event | None = None) -> None:
    """Stop ``proc`` and all its descendants: SIGTERM, wait up to ``timeout`` s, then SIGKILL.

    The descendants are listed before the parent is signalled: once it is gone, its
    children are re-parented and could no longer be found from it. Once ``hurry`` is set
    (a second Ctrl-C), the wait ends at once and whatever is left is killed.
    """
    family = [*_descendants(proc.pid)]
    try:
        family.insert(0, psutil.Process(proc.pid))
    except psutil.NoSuchProcess:
        pass
    for p in family:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + timeout
    alive = family
    while alive and time.monotonic() < deadline and not (hurry is not None and hurry.is_set()):
        _, alive = psutil.wait_procs(alive, timeout=0.1)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent above
        pass


@contextmanager
def forward_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM call ``on_signal(signum)`` instead of killing this process."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, _frame: on_signal(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def stop_on_signals(stop: threading.Event, hurry: threading.Event | None = None) -> Iterator[None]:
    """The first SIGINT or SIGTERM sets ``stop``; a second one gives up waiting at once.

    Giving up sets ``hurry`` when one is given (the job then stops its children without
    waiting: :func:`stop_tree`), else raises KeyboardInterrupt in the main thread. Only the
    main thread can install handlers; elsewhere this does nothing.

    Example:
        >>> stop = threading.Event()
        >>> with stop_on_signals(stop):
        ...     os.kill(os.getpid(), signal.SIGTERM)
        >>> stop.is_set()
        True
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(_signum: int) -> None:
        if not stop.is_set():
            stop.set()  # the job notices at its next check and ends with one line
        elif hurry is not None:
            hurry.set()
        else:
            raise KeyboardInterrupt  # the second signal: give up waiting

    with forward_signals(on_signal):
        yield
