"""Atomic file I/O: the one writer behind every file edgetune writes.

:func:`atomic_write` is the mechanism (temp file in the same folder, write, fsync, rename over
the target, fsync the folder), so a crash or a signal leaves either the old file or the new one,
never half a file, and a rename that returned survives a power cut. The other writers only
produce bytes for it. Reads that name the file when it is missing or corrupt sit beside them.

Example:
    >>> atomic_write_text(Path("run/status.json"), '{"status": "running"}')
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from safetensors import SafetensorError
from safetensors.torch import load_file, save

from edgetune.types import StateDict

__all__ = ["atomic_copy", "atomic_save", "atomic_write", "atomic_write_text", "fsync_dir", "load_tensors"]


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` with ``data`` (bytes, or a function that writes to the open file) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace a UTF-8 text file atomically."""
    atomic_write(path, text.encode("utf-8"))


def atomic_copy(src: Path, dest: Path) -> None:
    """Copy ``src`` over ``dest`` atomically (large files are streamed, not read into memory)."""

    def copy(fh: BinaryIO) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, fh, length=1 << 20)

    atomic_write(dest, copy)


def atomic_save(tensors: StateDict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically."""
    atomic_write(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def load_tensors(path: Path) -> StateDict:
    """Read a safetensors file, naming the file when it is missing or corrupt.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable safetensors file.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"corrupt safetensors file {path}: {err}") from err
