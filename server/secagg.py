"""A training round run as secure aggregation over Flower's Grid: the server learns the sum only.

Four message stages (``edgetune/wire.py``: ``train.secagg_*``; the maths and the device's
session are in ``adapters/secagg_protocol.py`` and ``adapters/secagg_session.py``)::

    keys     the usual downlink + the cohort size n; devices train, keep their integer input
             in Z_(2^k) (``adapters/secagg_spec.py``), reply with metrics and public keys
    share    the roster of U1; replies: encrypted shares for each neighbour, seed commitment
    mask     each device its neighbours' ciphertexts; replies: masked inputs, k bits/parameter
    unmask   survivors and dropped; replies: the shares that remove the masks

A device that does not answer a stage, or answers it wrongly, has dropped at that stage. Below
the threshold t at any stage, or when a rebuilt secret fails its check, the round is skipped
with a logged reason (the global adapter is unchanged); never a wrong sum, never a crash.
The decoded mean goes on through the server's usual downlink codec (``DeltaFedAvg.apply_mean``).
Everything the round measured lands in ``RoundMetrics.secagg``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, RecordDict

from edgetune import wire
from edgetune.adapters.secagg_protocol import SecAggError
from edgetune.adapters.secagg_quant import unpack_bits
from edgetune.adapters.secagg_session import unmask_sum
from edgetune.adapters.secagg_spec import RoundSpec, decode_sum, round_spec
from edgetune.config import RunConfig
from edgetune.server.accounting import RoundEvent
from edgetune.server.checkpoint import save_update
from edgetune.server.dp import mean_denominator
from edgetune.server.metrics import RoundMetrics, add_phase, timed_phase
from edgetune.server.rounds import exchange, uniform
from edgetune.server.uplinks import record_uplink
from edgetune.server.validate import EvalReply, Rejection, validate_metrics

if TYPE_CHECKING:
    from edgetune.server.federation import Federation

__all__ = ["secagg_round", "skellam_event"]

log = logging.getLogger("edgetune.server")
STAGES = ("keys", "share", "mask", "unmask")


def _content_bytes(content: RecordDict) -> int:
    """Array bytes plus byte strings in config records (what a fair count of protocol traffic sees)."""
    total = sum(len(a.data) for r in content.array_records.values() for a in r.values())
    for record in content.config_records.values():
        for value in record.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) if isinstance(v, bytes) else 8 for v in value)
    return total


class _Round:
    """One secure-aggregation round's traffic, timings and dropouts."""

    def __init__(self, fed: Federation, round_: int, spec: RoundSpec) -> None:
        self.fed, self.round, self.spec = fed, round_, spec
        self.adverts: dict[int, tuple[bytes, bytes]] = {}  # node -> (signer, advertisement signature)
        self.errors: list[str] = []  # error replies, one line each (e.g. a device refusing the roster)
        self.report: dict[str, Any] = {
            "k": spec.k,
            "bits": spec.bits,
            "threshold": spec.threshold,
            "cohort": spec.cohort,
            "neighbours": fed.cfg.secagg.neighbours,
            "stage_bytes_up": {},
            "stage_bytes_down": {},
            "stage_seconds": {},
            "dropouts": {},
            "skipped": None,
        }

    def send(self, stage: str, messages: dict[int, Message], down_bytes: int = 0) -> dict[int, Message]:
        """Send one stage; the answers that are not errors, by node (the rest dropped out)."""
        start = time.perf_counter()
        sent = len(messages)
        p = self.fed.cfg.secagg.dropout
        if self.fed.simulated and p > 0 and stage != "keys":  # seeded: the same devices on every rerun
            device = self.fed.fed.node_devices
            seed = self.fed.cfg.seed
            gone = {n for n in messages if uniform("secagg", seed, self.round, stage, device.get(n, n)) < p}
            messages = {n: msg for n, msg in messages.items() if n not in gone}
        down = down_bytes + sum(_content_bytes(m.content) for m in messages.values())
        timeout = None if self.fed.simulated else self.fed.cfg.federation.reply_timeout
        replies = exchange(self.fed.grid, list(messages.values()), timeout, f"round {self.round} secagg {stage}")
        answered: dict[int, Message] = {}
        # The grid set each message's id when it pushed it; the SuperLink's own error reply
        # for an unavailable node names the SuperLink as its source, so go by the request.
        sent_to = {msg.metadata.message_id: n for n, msg in messages.items()}
        for reply in replies:
            record_uplink(self.fed.run_dir, self.round, f"secagg-{stage}", reply)
            node = reply.metadata.src_node_id
            if reply.has_error():
                node = sent_to.get(reply.metadata.reply_to_message_id, node)
            if node in messages and not reply.has_error() and wire.SECAGG in reply.content.config_records:
                answered[node] = reply
            elif reply.has_error():
                reason = " ".join(str(reply.error.reason).split())
                log.warning("round %d: secagg %s: node %d: %s", self.round, stage, node, reason)
                self.errors.append(f"secagg {stage}, node {node}: {reason}")
        self.report["stage_bytes_down"][stage] = down
        self.report["stage_bytes_up"][stage] = sum(_content_bytes(r.content) for r in answered.values())
        self.report["stage_seconds"][stage] = time.perf_counter() - start
        self.report["dropouts"][stage] = sent - len(answered)
        return answered

    def message(self, node: int, kind: str, record: dict[str, Any]) -> Message:
        content = RecordDict({wire.SECAGG: ConfigRecord({wire.ROUND: self.round, **record})})
        return Message(content, dst_node_id=node, message_type=kind, group_id=str(self.round))

    def need(self, count: int, stage: str) -> None:
        if count < self.spec.threshold:
            raise SecAggError(f"{count} devices after the {stage} stage < secagg threshold {self.spec.threshold}")


def _keys_stage(r: _Round, chosen: list[int], m: RoundMetrics) -> dict[int, tuple[bytes, bytes]]:
    fed, cfg = r.fed, r.fed.cfg
    messages, down = {}, 0
    for node in chosen:
        msg, nbytes = fed._message(node, wire.SECAGG_KEYS, r.round)
        msg.content[wire.SECAGG] = ConfigRecord({wire.ROUND: r.round, wire.SA_COHORT: len(chosen)})
        messages[node], down = msg, down + nbytes
    roster, weights, losses = {}, [], []
    max_examples = cfg.train.local_steps * cfg.train.batch_size
    for node, reply in r.send("keys", messages, down).items():
        try:
            # Signed like a train reply (metrics and public keys), and the device id bound to its node.
            version = fed.fed.state.version
            needed = (wire.NUM_EXAMPLES, wire.TRAIN_LOSS)
            device, metrics = validate_metrics(reply, r.round, needed, version, fed.verifier, wire.SECAGG_KEYS)
            bound = fed.ids.check(EvalReply(node, device, metrics))
            if isinstance(bound, Rejection):
                raise ValueError(bound.reason)
            public = reply.content.array_records[wire.SECAGG_PUBLIC]
            keys = (public[wire.SA_C_PK].numpy().tobytes(), public[wire.SA_S_PK].numpy().tobytes())
            if any(len(k) != 32 for k in keys) or not 1 <= int(metrics[wire.NUM_EXAMPLES]) <= max_examples:
                raise ValueError("public keys must be 32 bytes and num-examples within the round's steps")
        except (ValueError, TypeError, KeyError) as err:
            log.warning("round %d: secagg keys reply from node %d dropped: %s", r.round, node, err)
            m.rejected.append(f"secagg keys, node {node}: {err}")
            continue
        roster[node] = keys
        sa = reply.content.config_records.get(wire.SECAGG, {})
        r.adverts[node] = (bytes(sa.get(wire.SA_SIGNER, b"")), bytes(sa.get(wire.SA_ADVERT_SIG, b"")))  # type: ignore[arg-type]
        fed.fed.record_device(node, device, int(metrics[wire.HELD_VERSION]))
        weights.append(float(metrics[wire.NUM_EXAMPLES]))
        losses.append(float(metrics[wire.TRAIN_LOSS]))
        m.train_tokens += int(metrics.get(wire.NUM_TOKENS, 0))
        m.train_seconds += float(metrics.get(wire.SECONDS, 0.0))
        # The device's own timing, as for a plain train reply: sync, then train and encode.
        add_phase(m, "sync", float(metrics.get(wire.SYNC_SECONDS, 0.0)), float(metrics.get(wire.SYNC_CPU_SECONDS, 0.0)))
        add_phase(m, "train", float(metrics.get(wire.SECONDS, 0.0)), float(metrics.get(wire.CPU_SECONDS, 0.0)))
    m.replies = len(roster)
    fed.valid_replies += len(roster)
    if weights:
        m.train_loss = float(sum(w * x for w, x in zip(weights, losses, strict=True)) / sum(weights))
    return roster


def _run_stages(r: _Round, roster: dict[int, tuple[bytes, bytes]]) -> tuple[Any, int]:
    """Stages 2-4 and the unmasking; returns ``(unmasked, survivors)`` or raises SecAggError."""
    r.need(len(roster), "keys")
    nodes = sorted(roster)
    record = {
        wire.SA_NODES: nodes,
        wire.SA_C_PK: [roster[u][0] for u in nodes],
        wire.SA_S_PK: [roster[u][1] for u in nodes],
        # Forwarded for the devices to check against their registry (client/secagg_registry.py).
        wire.SA_SIGNERS: [r.adverts.get(u, (b"", b""))[0] for u in nodes],
        wire.SA_ADVERT_SIGS: [r.adverts.get(u, (b"", b""))[1] for u in nodes],
    }
    replies = r.send("share", {u: r.message(u, wire.SECAGG_SHARE, record) for u in nodes})
    cts, commitments = {}, {}
    for u, reply in replies.items():
        rec = reply.content.config_records[wire.SECAGG]
        dst, blobs = [int(v) for v in rec[wire.SA_DST]], [bytes(c) for c in rec[wire.SA_CIPHERTEXTS]]  # type: ignore[union-attr]
        if len(dst) == len(blobs) and set(dst) <= set(nodes) - {u}:
            cts[u], commitments[u] = dict(zip(dst, blobs, strict=True)), bytes(rec[wire.SA_COMMITMENT])  # type: ignore[arg-type]
    shared = sorted(cts)
    r.need(len(shared), "share")
    messages = {}
    for u in shared:
        src = [v for v in shared if u in cts[v]]
        messages[u] = r.message(
            u,
            wire.SECAGG_MASK,
            {wire.SA_SRC: src, wire.SA_CIPHERTEXTS: [cts[v][u] for v in src], wire.SA_SHARED: shared},
        )
    masked = {}
    for u, reply in r.send("mask", messages).items():
        try:
            packed = reply.content.array_records[wire.SECAGG_MASKED][wire.SECAGG_MASKED].numpy()
            masked[u] = unpack_bits(packed, r.spec.k, r.spec.dim)
        except (KeyError, ValueError) as err:
            log.warning("round %d: secagg masked input from node %d dropped: %s", r.round, u, err)
    survivors = sorted(masked)
    r.need(len(survivors), "mask")
    dropped = sorted(set(shared) - set(survivors))
    record = {wire.SA_SURVIVORS: survivors, wire.SA_DROPPED: dropped}
    seed_shares: dict[int, list[bytes]] = {}
    key_shares: dict[int, list[bytes]] = {}
    for reply in r.send("unmask", {u: r.message(u, wire.SECAGG_UNMASK, record) for u in survivors}).values():
        rec = reply.content.config_records[wire.SECAGG]
        for name, into in ((wire.SA_SEED_SHARES, seed_shares), (wire.SA_KEY_SHARES, key_shares)):
            for src, share in zip(rec.get(name + "-src", []), rec.get(name, []), strict=False):  # type: ignore[arg-type]
                into.setdefault(int(src), []).append(bytes(share))
    start = time.perf_counter()
    degree = r.fed.cfg.secagg.neighbours
    result = unmask_sum(
        masked, roster, shared, commitments, seed_shares, key_shares, r.spec.threshold, degree, r.round, r.spec.k
    )
    r.report["stage_seconds"]["unmask"] += time.perf_counter() - start
    return result, len(survivors)


def skellam_event(event: RoundEvent, cfg: RunConfig, shapes: dict[str, tuple[int, ...]]) -> RoundEvent:
    """``event`` as a distributed-DP (Skellam) round: the integer sensitivities and the noise
    variance of the sum (``(z D2)^2``, whatever the cohort; see ``adapters/secagg_quant.DdpPlan``)."""
    plan = round_spec(cfg, shapes, max(cfg.federation.sampled, 2)).plan
    assert plan is not None  # dp.enabled
    return dataclasses.replace(event, mechanism="skellam", l1=plan.l1, l2=plan.l2, variance=plan.central_variance)


def secagg_round(fed: Federation, round_: int, m: RoundMetrics, chosen: list[int], event: RoundEvent | None) -> None:
    """Run training round ``round_`` for ``chosen`` as secure aggregation and apply its mean.

    ``event`` is the round's DP event under distributed DP (None: DP off); its sample size
    gives the Poisson denominator. Fills ``m`` (train loss, bytes, ``m.secagg``).
    """
    cfg = fed.cfg
    if len(chosen) < 2:
        m.secagg = {"skipped": f"{len(chosen)} devices sampled: secure aggregation needs >= 2"}
        log.warning("round %d: %s; global adapter unchanged", round_, m.secagg["skipped"])
        return
    r = _Round(fed, round_, round_spec(cfg, fed.fed.sent_shapes, len(chosen)))
    m.secagg = r.report
    if r.spec.plan is not None:
        r.report["wrap_bound"] = r.spec.plan.wrap_bound
    roster = _keys_stage(r, chosen, m)
    try:
        result, survivors = _run_stages(r, roster)
    except SecAggError as err:
        r.report["skipped"] = str(err)
        m.dp_skipped = str(err) if event is not None else None
        log.warning("round %d: secure aggregation skipped: %s; global adapter unchanged", round_, err)
        _account(r, m)
        return
    denominator = float(survivors)
    if event is not None:
        denominator = mean_denominator(cfg.dp.sampling, survivors, event.sample_size)
        plan = r.spec.plan
        assert plan is not None  # DP on means a Skellam plan
        m.dp_noise_std = math.sqrt(survivors * plan.device_variance) / (plan.scale * denominator)
    with timed_phase(m, "aggregate"):
        payload = fed.fed.apply_mean(decode_sum(result.total, r.spec, survivors, denominator))
    r.report["survivors"] = survivors
    with timed_phase(m, "io"):
        save_update(fed.run_dir, fed.fed.state.version, payload)
    _account(r, m)


def _account(r: _Round, m: RoundMetrics) -> None:
    """Bytes and bits per parameter each way from the stage counts; the stages' error replies."""
    m.rejected.extend(r.errors)
    up, down = sum(r.report["stage_bytes_up"].values()), sum(r.report["stage_bytes_down"].values())
    m.bytes_up += up
    m.bytes_down += down
    fp32 = r.spec.dim * 4
    m.fp32_bytes_up += fp32 * max(m.replies, 0)
    m.fp32_bytes_down += fp32 * r.spec.cohort
    senders = max(m.replies, 1)
    r.report["bits_up_per_param"] = 8 * up / (r.spec.dim * senders)
    r.report["bits_down_per_param"] = 8 * down / (r.spec.dim * r.spec.cohort)
