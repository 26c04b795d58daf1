"""Who may speak for a device id: reply signatures and the node each device id is bound to.

Two checks, both turning a reply into a logged :class:`Rejection`, never an exception:

    signature   (in validation, before anything is decoded) the reply must be signed by the
                key of the device it names (``edgetune/signing.py``): in simulation the key
                derived from (run seed, device id); on real devices the key the SuperLink
                registered for the node that sent it. A deployment without registered keys
                (no device authentication) cannot check signatures, and says so once.
    binding     the first node whose valid reply names a device id holds it; a second node
                naming the same id while the first is still connected is rejected and
                logged (never silently preferred). A device that reconnects under a new node
                id, its old node gone, takes its id with it.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from edgetune.config import RunConfig
from edgetune.server.validate import EvalReply, Rejection, TrainReply, Verifier
from edgetune.signing import PublicKey, load_public_key_bytes, run_tag, simulation_key

__all__ = ["Identities", "make_verifier"]

log = logging.getLogger("edgetune.server")
Reply = TypeVar("Reply", TrainReply, EvalReply)


def _registered_keys(grid: Any) -> dict[int, PublicKey]:
    """node id -> the public key the SuperLink registered for it (empty without device auth)."""
    get_nodes = getattr(grid, "get_nodes", None)
    if get_nodes is None:
        return {}
    try:
        nodes = list(get_nodes())
    except Exception as err:  # noqa: BLE001 - a Grid that cannot list nodes has no keys to offer
        log.warning("cannot read the registered device keys (%s: %s)", type(err).__name__, err)
        return {}
    keys = {}
    for info in nodes:
        key = load_public_key_bytes(bytes(getattr(info, "public_key", b"") or b""))
        if key is not None:
            keys[int(info.node_id)] = key
    return keys


def make_verifier(grid: Any, cfg: RunConfig, run_config_json: str, simulated: bool) -> Verifier | None:
    """The signature check for this run, or None where no device key can be known."""
    run = run_tag(run_config_json)
    if simulated:
        derived: dict[str, PublicKey] = {}

        def simulated_key(node: int, device: str) -> PublicKey:
            if device not in derived:
                derived[device] = simulation_key(cfg.seed, device).public_key()
            return derived[device]

        return Verifier(run, simulated_key)
    registered = _registered_keys(grid)
    if not registered:
        log.warning("replies are not signature-checked: the SuperLink registers no device keys (no device auth)")
        return None

    def registered_key(node: int, device: str) -> PublicKey | None:
        if node not in registered:  # a device that joined later
            registered.update(_registered_keys(grid))
        return registered.get(node)

    return Verifier(run, registered_key)


class Identities:
    """Device id -> the node that speaks for it, bound by the first valid reply."""

    def __init__(self, grid: Any) -> None:
        self.grid = grid
        self.bound: dict[str, int] = {}

    def _connected(self, node: int) -> bool:
        try:
            return node in set(self.grid.get_node_ids())
        except Exception:  # noqa: BLE001 - if the Grid cannot say, keep the binding (safe side)
            return True

    def check(self, reply: Reply | Rejection) -> Reply | Rejection:
        """``reply`` itself, or a Rejection when its node claims a device id another node holds."""
        if isinstance(reply, Rejection):
            return reply
        holder = self.bound.get(reply.device_id)
        if holder is not None and holder != reply.node_id and self._connected(holder):
            return Rejection(
                reply.node_id,
                f"device id {reply.device_id!r} is held by node {holder}; node {reply.node_id} claims it too",
            )
        self.bound[reply.device_id] = reply.node_id
        return reply
