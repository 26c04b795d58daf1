"""Device storage: what a device keeps between rounds, on disk, in one folder.

    global_adapter.safetensors   the global adapter at the version it holds (metadata: version)
    residual.safetensors         error-feedback residual after its latest round (metadata: round)
    residual.prev.safetensors    the one before, so a round the server redoes after a crash
                                 starts from the same residual as the first time

Every write is atomic, so a device killed mid-write keeps its previous state.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError, safe_open

from edgetune.fileio import atomic_save, load_tensors
from edgetune.types import StateDict
from edgetune.wire import HELD_ADAPTER_FILE, RESIDUAL_FILE

__all__ = ["DeviceStorage"]

_PREV = RESIDUAL_FILE.replace(".safetensors", ".prev.safetensors")


def _meta_int(path: Path, key: str) -> int:
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"corrupt device storage file {path}: {err}") from err
    if key not in meta:
        raise ValueError(f"{path} lacks its {key!r} metadata: device storage is corrupt")
    return int(meta[key])


class DeviceStorage:
    """One device's folder (created on first use)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def load_global(self) -> tuple[StateDict, int] | None:
        """The held global adapter and its version, or ``None`` if the device is new."""
        path = self.root / HELD_ADAPTER_FILE
        if not path.is_file():
            return None
        return load_tensors(path), _meta_int(path, "version")

    def save_global(self, state: StateDict, version: int) -> None:
        atomic_save(state, self.root / HELD_ADAPTER_FILE, metadata={"version": str(version)})

    def residual_before(self, round_: int) -> StateDict | None:
        """The residual produced by the latest round *before* ``round_`` (None: start at 0)."""
        for name in (RESIDUAL_FILE, _PREV):
            path = self.root / name
            if path.is_file() and _meta_int(path, "round") < round_:
                return load_tensors(path)
        return None

    def save_residual(self, residual: StateDict, round_: int) -> None:
        """Keep ``residual`` as round ``round_``'s; the older one moves to ``.prev``."""
        current = self.root / RESIDUAL_FILE
        if current.is_file() and _meta_int(current, "round") < round_:
            current.replace(self.root / _PREV)
        atomic_save(residual, current, metadata={"round": str(round_)})
