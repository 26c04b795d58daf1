"""The device's side of secure aggregation: one function per stage, over Flower records.

    start    (stage 1, after local training) encode delta + residual as an integer vector
             in Z_(2^k) (``adapters/secagg_spec.py``), keep the new residual, draw the round's
             keys; reply with the two public keys, signed with the device's key like any reply,
             and a signature of the advertisement alone that other devices can check
    share    check every roster entry against the registry of device keys
             (``client/secagg_registry.py``), then encrypted Shamir shares for every
             neighbour, and the seed commitment
    mask     decrypt what the neighbours sent, reply with the masked input (k bits/parameter)
    unmask   the shares the server needs to remove the masks, then forget the round

Between stages the device keeps its session (``adapters/secagg_session.DeviceSession``) and
integer input in the node's Flower context state, which the SuperNode (or the simulation)
keeps for the run, in memory: never on disk, never sent. A message for another round, or
one that breaks the protocol, raises :class:`SecAggError` and Flower answers it with an
error reply, which the server counts as a dropout.
"""

from __future__ import annotations

import os

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from edgetune import wire
from edgetune.adapters.delta import add
from edgetune.adapters.secagg_protocol import SecAggError
from edgetune.adapters.secagg_quant import pack_bits
from edgetune.adapters.secagg_session import DeviceSession
from edgetune.adapters.secagg_spec import encode_input, round_spec
from edgetune.client.secagg_probe import hold_before_unmask, record_input
from edgetune.client.secagg_registry import check_roster, device_registry
from edgetune.client.storage import DeviceStorage
from edgetune.config import RunConfig
from edgetune.signing import PrivateKey, advert_digest, key_id, sign
from edgetune.types import StateDict

__all__ = ["mask", "share", "start", "unmask"]


def _load(context: Context, msg: Message) -> tuple[DeviceSession, ConfigRecord]:
    state = context.state.config_records.get(wire.SECAGG)
    if state is None:
        raise SecAggError("no secure-aggregation round in progress on this device")
    session = DeviceSession.from_bytes(bytes(state[wire.SA_SESSION]))  # type: ignore[arg-type]
    sent = int(msg.content.config_records[wire.SECAGG][wire.ROUND])  # type: ignore[arg-type]
    if sent != session.round:
        raise SecAggError(f"message is for round {sent}, the device is in round {session.round}")
    return session, state


def _save(context: Context, session: DeviceSession, state: ConfigRecord) -> None:
    state[wire.SA_SESSION] = session.to_bytes()
    context.state[wire.SECAGG] = state


def start(
    context: Context,
    msg: Message,
    cfg: RunConfig,
    storage: DeviceStorage,
    delta: StateDict,
    round_: int,
    signer: tuple[PrivateKey | None, str] = (None, ""),
) -> tuple[ConfigRecord, ArrayRecord]:
    """Stage 1: integer input and residual from ``delta``, fresh keys.

    ``signer`` is (the device's key, the run tag): the advertisement is signed with it for
    the other devices to check. Returns the reply's ``secagg`` record and its public keys as
    an array record, which the device's reply signature covers for the server.
    """
    cohort = int(msg.content.config_records[wire.SECAGG][wire.SA_COHORT])  # type: ignore[arg-type]
    spec = round_spec(cfg, {k: tuple(v.shape) for k, v in delta.items()}, cohort)
    before = storage.residual_before(round_)
    corrected = delta if before is None else add(delta, before)
    # Rounding and DP noise must stay secret: OS entropy, never the (public) run seed.
    rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
    x, residual = encode_input(corrected, spec, rng)
    storage.save_residual(residual, round_)
    record_input(round_, x)  # tests only (client/secagg_probe.py); inert otherwise
    session = DeviceSession.start(context.node_id, round_, spec.threshold)
    context.state[wire.SA_INPUT] = ArrayRecord({wire.SA_INPUT: Array(x)})
    key, run = signer
    state = ConfigRecord(
        {
            wire.SA_SESSION: b"",
            "k": spec.k,
            "degree": cfg.secagg.neighbours,
            "run": run,
            "seed": cfg.seed,
            "devices": cfg.federation.num_devices,
        }
    )
    _save(context, session, state)
    c_pk, s_pk = session.advertise()
    keys = {wire.SA_C_PK: c_pk, wire.SA_S_PK: s_pk}
    public = ArrayRecord({k: Array(np.frombuffer(v, dtype=np.uint8).copy()) for k, v in keys.items()})
    record = ConfigRecord({wire.ROUND: round_})
    if key is not None:
        record[wire.SA_ADVERT_SIG] = sign(key, advert_digest(run, round_, context.node_id, c_pk, s_pk))
        record[wire.SA_SIGNER] = key_id(key.public_key())
    return record, public


def share(msg: Message, context: Context) -> ConfigRecord:
    """Stage 2: the roster in, encrypted shares out."""
    session, state = _load(context, msg)
    sent = msg.content.config_records[wire.SECAGG]
    nodes = [int(n) for n in sent[wire.SA_NODES]]  # type: ignore[union-attr]
    c_pks, s_pks = list(sent[wire.SA_C_PK]), list(sent[wire.SA_S_PK])  # type: ignore[arg-type]
    if not len(nodes) == len(c_pks) == len(s_pks):
        raise SecAggError("roster lists differ in length")
    roster = {u: (bytes(c), bytes(s)) for u, c, s in zip(nodes, c_pks, s_pks, strict=True)}  # type: ignore[arg-type]
    registry = device_registry(context.node_config, int(state["seed"]), int(state["devices"]))  # type: ignore[arg-type]
    if registry is not None:  # never share secrets with a node the registry does not vouch for
        order = sorted(range(len(nodes)), key=nodes.__getitem__)
        signers, sigs = list(sent.get(wire.SA_SIGNERS, [])), list(sent.get(wire.SA_ADVERT_SIGS, []))  # type: ignore[arg-type]
        if len(signers) == len(sigs) == len(nodes):
            signers, sigs = [signers[i] for i in order], [sigs[i] for i in order]
        check_roster(registry, str(state["run"]), session.round, roster, signers, sigs)
    cts, commitment = session.share(roster, int(state["degree"]))  # type: ignore[arg-type]
    _save(context, session, state)
    dst = sorted(cts)
    return ConfigRecord(
        {
            wire.ROUND: session.round,
            wire.SA_DST: dst,
            wire.SA_CIPHERTEXTS: [cts[v] for v in dst],
            wire.SA_COMMITMENT: commitment,
        }
    )


def mask(msg: Message, context: Context) -> tuple[ConfigRecord, ArrayRecord]:
    """Stage 3: the neighbours' ciphertexts in, the packed masked input out."""
    session, state = _load(context, msg)
    sent = msg.content.config_records[wire.SECAGG]
    src = [int(v) for v in sent[wire.SA_SRC]]  # type: ignore[union-attr]
    cts = [bytes(c) for c in sent[wire.SA_CIPHERTEXTS]]  # type: ignore[union-attr]
    shared = [int(v) for v in sent[wire.SA_SHARED]]  # type: ignore[union-attr]
    k = int(state["k"])  # type: ignore[arg-type]
    x = context.state.array_records[wire.SA_INPUT][wire.SA_INPUT].numpy()
    y = session.mask(x, k, dict(zip(src, cts, strict=True)), shared)
    _save(context, session, state)
    return ConfigRecord({wire.ROUND: session.round}), ArrayRecord({wire.SECAGG_MASKED: Array(pack_bits(y, k))})


def unmask(msg: Message, context: Context) -> ConfigRecord:
    """Stage 4: survivors and dropped in, their shares out; the round's secrets are dropped."""
    session, state = _load(context, msg)
    sent = msg.content.config_records[wire.SECAGG]
    survivors = [int(v) for v in sent[wire.SA_SURVIVORS]]  # type: ignore[union-attr]
    dropped = [int(v) for v in sent[wire.SA_DROPPED]]  # type: ignore[union-attr]
    hold_before_unmask(context.node_id, session.round, survivors)  # tests only; inert otherwise
    seeds, keys = session.unmask(survivors, dropped)
    del context.state[wire.SECAGG], context.state[wire.SA_INPUT]
    return ConfigRecord(
        {
            wire.ROUND: session.round,
            wire.SA_SEED_SHARES + "-src": sorted(seeds),
            wire.SA_SEED_SHARES: [seeds[u] for u in sorted(seeds)],
            wire.SA_KEY_SHARES + "-src": sorted(keys),
            wire.SA_KEY_SHARES: [keys[u] for u in sorted(keys)],
        }
    )
