"""A simulation's inputs, checked in the CLI process before Ray or Flower start.

A bad ``--data`` or ``--base`` used to surface only inside Ray actors, as pages of tracebacks
per device, and a ``--devices`` larger than the data allows as one error line per device per
second. :func:`check_inputs` loads what every device will load, in this process, and returns
the first problem as one line (``file:line: problem`` for data), or None when all is well:

    base model   a known name, a Hugging Face folder of a causal LM, or a ``.gguf`` file
    data         every device's conversations: the file(s) exist, every line parses and has
                 the right fields, and every device gets enough conversations
    devices      the data can fill ``federation.num-devices`` devices

Example:
    >>> from edgetune.config import from_flat
    >>> check_inputs(from_flat({"model.base": "tiny", "federation.num-devices": 2}))
"""

from __future__ import annotations

from edgetune.chat import DataError
from edgetune.config import RunConfig
from edgetune.datasets.devices import device_conversations
from edgetune.models import ModelError, resolve_base

__all__ = ["check_inputs"]


def check_inputs(cfg: RunConfig) -> str | None:
    """The first problem with ``cfg``'s base model, data or device count, or None."""
    try:
        resolve_base(cfg.model.base)
    except (ModelError, OSError, ValueError) as err:
        return f"--base {cfg.model.base}: {err}"
    n = cfg.federation.num_devices
    for index in range(n):
        try:
            device_conversations(cfg.data, "", index, n, cfg.seed)
        except DataError as err:
            return f"--data: {err}"
        except (ValueError, OSError) as err:
            return f"--data {cfg.data.source} for --devices {n} (device {index}): {err}"
    return None
