"""The federated run, driven over a Flower Grid: rounds, checkpoints, evaluation, resume.

Before round 0 (or a resume's re-evaluation), where a sample or dropout will be drawn, each
node not yet known names its device id (``wire.IDENTIFY``, signed): node ids are random.

Round ``t`` (1..R):
    1. sample ``devices_per_round`` devices (seeded by run seed and t, over stable device ids;
       under DP: Poisson or fixed-size from OS entropy, after checking the epsilon budget)
    2. send each its smallest exact downlink and the run config; wait for replies
    3. validate every reply, drop bad ones with a logged reason
    4. FedAvg over the valid deltas (if at least ``min_replies``), server error feedback;
       under DP: clip, noise and uniform mean first (``server/dp.py``), ledger in the checkpoint
    5. write the update and the checkpoint atomically; prune old checkpoints and updates
       (``federation.keep-checkpoints``, ``federation.checkpoint-every``)
    6. every ``federation.eval-every``-th round and the last, the devices (all, or a fixed
       sample of ``federation.eval-devices``) evaluate the new global adapter
Each round's time is split into sync, train, evaluate (device-reported), aggregate and io
(server), wall and CPU seconds (``RoundMetrics.wall_seconds`` / ``cpu_seconds``).
Round 0 evaluates the initial adapter. A resumed run first re-evaluates the checkpoint's
adapter (which also tells the server which device sits on which node, and completes that
round's metrics line if the crash came before it), then goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import RunNotRunningException
from tqdm import tqdm

from edgetune import wire
from edgetune.adapters.binary import binary_product_error
from edgetune.adapters.binary_io import save_binary_adapter
from edgetune.adapters.codec import Payload, raw_bytes
from edgetune.adapters.delta import lora_product_error
from edgetune.adapters.dora import dora_base, dora_weight_error
from edgetune.adapters.lora import adapter_shapes
from edgetune.adapters.peft_io import save_adapter
from edgetune.config import RESUMABLE_KEYS, ConfigError, RunConfig, dumps, from_flat, to_flat
from edgetune.fileio import atomic_write_text
from edgetune.models import model_skeleton, resolve_base
from edgetune.server.accounting import RoundEvent, epsilon, next_event
from edgetune.server.audit.canaries import ensure_canaries
from edgetune.server.checkpoint import latest_checkpoint, prune_run, save_checkpoint, save_update, write_interrupted
from edgetune.server.dp import mean_denominator, noise_generator, private_mean
from edgetune.server.identity import Identities, make_verifier
from edgetune.server.metrics import (
    RoundMetrics,
    add_phase,
    append_metrics,
    read_metrics,
    read_pending,
    short_round_note,
    timed_phase,
    truncate_metrics,
    write_pending,
)
from edgetune.server.robust import aggregate
from edgetune.server.rounds import Interrupted, dropouts, exchange
from edgetune.server.sampling import private_sample
from edgetune.server.secagg import secagg_round, skellam_event
from edgetune.server.strategy import DeltaFedAvg
from edgetune.server.uplinks import ALLOWED_VERDICT, describe_uplink, record_uplink
from edgetune.server.validate import (
    Rejection,
    TrainReply,
    Verifier,
    delta_rms_bound,
    validate_eval,
    validate_identity,
    validate_train,
)
from edgetune.types import StateDict

__all__ = ["FederationError", "run_federation"]

log = logging.getLogger("edgetune.server")


class FederationError(RuntimeError):
    """The run cannot go on (no devices connected, a config that does not match the run)."""


def _wait_for_nodes(grid: Grid, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} of {count} devices connected within {timeout:.0f}s")
        time.sleep(1.0)


class Federation:
    """One run's server side: a :class:`DeltaFedAvg` plus the Grid, run folder and metrics."""

    def __init__(
        self, grid: Grid, cfg: RunConfig, run_dir: Path, simulated: bool = False, stop: threading.Event | None = None
    ) -> None:
        self.grid, self.cfg, self.run_dir = grid, cfg, run_dir
        # Simulation: wait for every reply, dropouts from the seeded model (server/rounds.py).
        self.simulated = simulated
        self.stop = stop  # set by a signal: end at the next poll, status "interrupted"
        self.ids = Identities(grid)  # device id -> node (server/identity.py)
        self.verifier: Verifier | None = None  # set once the devices are connected
        self.named: dict[int, str] = {}  # node id -> the device id its identify reply named
        shapes = adapter_shapes(model_skeleton(cfg.model.base), cfg.lora)
        resumed = latest_checkpoint(run_dir)
        self.start_round = 1 if resumed is None else resumed[0] + 1
        # DoRA: version-0 magnitudes and the base weights its aggregation error needs.
        magnitudes, self.dora_w0 = dora_base(cfg.model.base, cfg.lora) if cfg.lora.kind == "dora" else (None, None)
        self.fed = DeltaFedAvg(shapes, cfg, None if resumed is None else resumed[1], magnitudes)
        self.fp32_bytes = raw_bytes(self.fed.sent_shapes)
        self.config_json = json.dumps(to_flat(cfg))
        self.valid_replies = 0
        # What the PEFT folder names as its base: the local model folder (None for tiny).
        folder = resolve_base(cfg.model.base)
        self.base_name = str(folder.resolve()) if folder is not None else None
        self.device_root = str((run_dir / wire.DEVICES_DIR).resolve())
        # DP noise: OS entropy, never the run seed (which anyone with the config knows).
        self.noise = noise_generator() if cfg.dp.enabled else None

    def _message(self, node: int, kind: str, round_: int) -> tuple[Message, int]:
        records, nbytes = self.fed.downlink(node)
        content = RecordDict(
            {
                wire.CONFIG: ConfigRecord(
                    {
                        wire.ROUND: round_,
                        wire.VERSION: self.fed.state.version,
                        wire.RUN_CONFIG_JSON: self.config_json,
                        wire.DEVICE_ROOT: self.device_root,
                    }
                )
            }
        )
        for key, payload in records.items():
            content[key] = ArrayRecord({k: Array(v) for k, v in payload.items()})
        return Message(content, dst_node_id=node, message_type=kind, group_id=str(round_)), nbytes

    def _send(self, nodes: list[int], kind: str, round_: int) -> tuple[list[Message], int]:
        sent = [self._message(n, kind, round_) for n in nodes]
        timeout = None if self.simulated else self.cfg.federation.reply_timeout
        replies = exchange(self.grid, [m for m, _ in sent], timeout, f"round {round_} {kind}", self.stop)
        return replies, sum(b for _, b in sent)

    def evaluate(self, round_: int, m: RoundMetrics, nodes: list[int]) -> None:
        replies, down = self._send(nodes, "evaluate", round_)
        m.bytes_down += down
        m.fp32_bytes_down += self.fp32_bytes * len(nodes)
        losses, tokens = [], []
        for reply in replies:
            record_uplink(self.run_dir, round_, "evaluate", reply)
            r = self.ids.check(validate_eval(reply, round_, self.fed.state.version, self.verifier))
            if isinstance(r, Rejection):
                log.warning("round %d: evaluate reply from node %d dropped: %s", round_, r.node_id, r.reason)
                m.rejected.append(f"evaluate, node {r.node_id}: {r.reason}")
                continue
            self.fed.record_device(r.node_id, r.device_id, int(r.metrics[wire.HELD_VERSION]))
            _add_device_phases(m, "evaluate", r.metrics)
            losses.append(float(r.metrics[wire.EVAL_LOSS]))
            tokens.append(float(r.metrics[wire.NUM_TOKENS]))
            m.per_device.setdefault(r.device_id, {})["eval_loss"] = losses[-1]
        if losses and sum(tokens) > 0:
            m.eval_loss = float(np.average(losses, weights=tokens))

    def _name(self, node: int) -> str:
        """The device id a valid reply bound to ``node``, else the one it named, else ``node-<id>``."""
        return self.fed.node_devices.get(node) or self.named.get(node) or f"node-{node}"

    def _identify(self, nodes: list[int], round_: int) -> None:
        """Ask each node not yet named for its device id (signed), where a sample or dropout needs it.

        Node ids are random (new ones on every simulation start), device ids are not: sampling
        by device id makes a rerun with the same seed train and evaluate the same devices. A
        device id named by two nodes names neither; a bad or missing reply leaves ``node-<id>``.
        """
        f = self.cfg.federation
        unnamed = [n for n in nodes if self._name(n) == f"node-{n}"]
        every = f.sampled >= len(nodes) and (f.eval_devices == 0 or f.eval_devices >= len(nodes))
        if not unnamed or (every and f.dropout == 0):  # no draw to make
            return
        config = ConfigRecord({wire.ROUND: round_, wire.RUN_CONFIG_JSON: self.config_json})
        messages = [
            Message(RecordDict({wire.CONFIG: config}), dst_node_id=n, message_type=wire.IDENTIFY, group_id=str(round_))
            for n in unnamed
        ]
        timeout = None if self.simulated else f.reply_timeout
        claims: dict[str, list[int]] = {}
        for reply in exchange(self.grid, messages, timeout, f"round {round_} identify", self.stop):
            device = validate_identity(reply, round_, self.verifier)
            flagged = describe_uplink(round_, "identify", reply)["verdict"] != ALLOWED_VERDICT
            # On record only then: uplinks.jsonl stays proportional to the devices that trained
            # or evaluated (the others said only their id, signed).
            if isinstance(device, Rejection) or flagged:
                record_uplink(self.run_dir, round_, "identify", reply)
            if isinstance(device, Rejection):
                log.warning("round %d: identify reply from node %d dropped: %s", round_, device.node_id, device.reason)
            else:
                claims.setdefault(device, []).append(reply.metadata.src_node_id)
        taken = {self._name(n) for n in nodes}
        for device, claimants in claims.items():
            if len(claimants) == 1 and device not in taken:
                self.named[claimants[0]] = device
            else:
                log.warning("round %d: device id %r named by nodes %s: left unnamed", round_, device, claimants)

    def _sample(self, round_: int, nodes: list[int]) -> list[int]:
        """Devices to train, seeded by (run seed, round) over stable device ids.

        Node ids change when a simulation restarts; device ids do not (:meth:`_identify`). A
        node without one is still eligible, under its node id.
        """
        by_device = {self._name(n): n for n in nodes}
        rng = np.random.default_rng([self.cfg.seed, round_])
        k = min(self.cfg.federation.sampled, len(by_device))
        return sorted(by_device[d] for d in rng.choice(sorted(by_device), size=k, replace=False))

    def _valid_train_replies(self, replies: list[Message], round_: int, m: RoundMetrics) -> list[TrainReply]:
        fed, max_examples = self.fed, self.cfg.train.local_steps * self.cfg.train.batch_size
        max_rms = delta_rms_bound(self.cfg)
        valid: list[TrainReply] = []
        for reply in replies:
            record_uplink(self.run_dir, round_, "train", reply)
            r = validate_train(
                reply, round_, fed.sent_shapes, fed.codec, max_examples, fed.state.version, max_rms, self.verifier
            )
            r = self.ids.check(r)
            if isinstance(r, Rejection):
                log.warning("round %d: train reply from node %d dropped: %s", round_, r.node_id, r.reason)
                m.rejected.append(f"train, node {r.node_id}: {r.reason}")
                continue
            valid.append(r)
            fed.record_device(r.node_id, r.device_id, int(r.metrics[wire.HELD_VERSION]))
            m.bytes_up += r.bytes
            m.fp32_bytes_up += self.fp32_bytes
            m.train_tokens += int(r.metrics.get(wire.NUM_TOKENS, 0))
            m.train_seconds += float(r.metrics.get(wire.SECONDS, 0.0))
            _add_device_phases(m, "train", r.metrics)
            m.per_device.setdefault(r.device_id, {})["train_loss"] = float(r.metrics[wire.TRAIN_LOSS])
        m.replies = len(valid)
        self.valid_replies += len(valid)
        return sorted(valid, key=lambda r: r.device_id)  # arrival order must not change the sums

    def plan_privacy(self, round_: int, population: int) -> tuple[RoundEvent, float]:
        """Round ``round_``'s DP event and the epsilon the run will have once it is composed."""
        event = next_event(self.cfg.dp, round_, population, self.cfg.federation.sampled)
        if self.cfg.secagg.enabled:  # distributed DP: the devices' Skellam noise
            event = skellam_event(event, self.cfg, self.fed.sent_shapes)
        return event, epsilon([*self.fed.state.privacy, event], self.cfg.dp.accountant, self.cfg.dp.delta)

    def _private_update(self, valid: list[TrainReply], m: RoundMetrics, event: RoundEvent) -> Payload | None:
        """Clip, noise and average under DP (``server/dp.py``); None when the round is skipped."""
        dp = self.cfg.dp
        denominator = mean_denominator(dp.sampling, len(valid), event.sample_size)
        assert self.noise is not None  # set whenever DP is on
        result = private_mean([r.delta for r in valid], dp, denominator, self.noise)
        m.dp_clipped_fraction, m.dp_noise_std, m.dp_skipped = result.clipped_fraction, result.noise_std, result.skipped
        if result.mean is None:
            log.warning("round %d: DP round skipped (%s); global adapter unchanged", m.round, result.skipped)
            return None
        return self.fed.apply_mean(result.mean)

    def _robust_update(self, valid: list[TrainReply], weights: list[float], m: RoundMetrics) -> Payload:
        """Combine the valid deltas as ``federation.aggregator`` says (``server/robust.py``)."""
        f = self.cfg.federation
        if f.aggregator == "mean":
            return self.fed.aggregate([r.delta for r in valid], weights)
        result = aggregate(f.aggregator, [r.delta for r in valid], weights, f.byzantine_fraction, f.clip_multiple)
        m.robust_rejected = [valid[i].device_id for i in result.rejected]
        m.robust_clipped = [valid[i].device_id for i in result.clipped]
        if m.robust_rejected or m.robust_clipped:
            log.warning(
                "round %d: %s rejected %s, clipped %s", m.round, f.aggregator, m.robust_rejected, m.robust_clipped
            )
        return self.fed.apply_mean(result.update)

    def train(self, round_: int, m: RoundMetrics, nodes: list[int], planned: tuple[RoundEvent, float] | None) -> None:
        """One training round; ``planned`` is this round's DP event and epsilon (None: DP off)."""
        if planned is None:
            chosen = self._sample(round_, nodes)
        else:
            chosen = private_sample(nodes, self.cfg.dp.sampling, planned[0].sample_size)
            # Composed whatever the round releases: a skipped round counts too (conservative).
            self.fed.state.privacy.append(dataclasses.replace(planned[0], sampled=len(chosen)))
            m.dp_epsilon = planned[1]
        m.dp_sampled = m.sampled = len(chosen)
        if self.simulated and self.cfg.federation.dropout > 0:
            names = {self._name(n): n for n in chosen}
            gone = dropouts(names, self.cfg.federation.dropout, self.cfg.seed, round_)
            m.dropped_out = sorted(gone)
            chosen = [n for d, n in sorted(names.items()) if d not in gone]
        if self.cfg.secagg.enabled:  # the server sees the sum only (server/secagg.py)
            secagg_round(self, round_, m, chosen, None if planned is None else planned[0])
            return
        replies, down = self._send(chosen, "train", round_) if chosen else ([], 0)
        m.bytes_down += down
        m.fp32_bytes_down += self.fp32_bytes * len(chosen)
        with timed_phase(m, "aggregate"):
            payload = self._aggregate(round_, m, replies, planned)
        if payload is not None:
            with timed_phase(m, "io"):
                save_update(self.run_dir, self.fed.state.version, payload)

    def _aggregate(
        self, round_: int, m: RoundMetrics, replies: list[Message], planned: tuple[RoundEvent, float] | None
    ) -> Payload | None:
        """Validate the train replies and aggregate them; the payload devices will apply, or None."""
        valid = self._valid_train_replies(replies, round_, m)
        if len(valid) < self.cfg.federation.min_replies:
            reason = f"{len(valid)} valid replies < federation.min-replies {self.cfg.federation.min_replies}"
            log.warning("round %d: %s; global adapter unchanged", round_, reason)
            m.dp_skipped = reason if planned is not None else None
            return None
        weights = [float(r.num_examples) for r in valid]
        m.train_loss = float(np.average([r.metrics[wire.TRAIN_LOSS] for r in valid], weights=weights))
        m.aggregation_error = self._aggregation_error([r.delta for r in valid], weights)
        if planned is None:
            return self._robust_update(valid, weights, m)
        return self._private_update(valid, m, planned[0])

    def _evaluates(self, round_: int) -> bool:
        """Whether round ``round_`` evaluates: every ``eval-every``-th and the last."""
        f = self.cfg.federation
        return round_ % f.eval_every == 0 or round_ == f.rounds

    def _eval_nodes(self, nodes: list[int]) -> list[int]:
        """All nodes, or a sample of ``eval-devices`` fixed for the run (seeded by the run seed,
        drawn over device ids as :meth:`_sample` draws)."""
        k = self.cfg.federation.eval_devices
        if k == 0 or k >= len(nodes):
            return nodes
        by_device = {self._name(n): n for n in nodes}
        picked = np.random.default_rng([self.cfg.seed, 1]).choice(sorted(by_device), size=k, replace=False)
        return sorted(by_device[d] for d in picked)

    def _save(self, round_: int) -> None:
        f = self.cfg.federation
        save_checkpoint(self.run_dir, round_, self.fed.state)
        save_adapter(self.run_dir / wire.ADAPTER_DIR, self.fed.state.adapter, self.cfg.lora, self.base_name)
        if self.cfg.lora.kind == "binary":  # the deployed form: sign bits + fp16 scales
            adapter_dir, state = self.run_dir / wire.ADAPTER_DIR, self.fed.state.adapter
            save_binary_adapter(adapter_dir, state, self.cfg.lora, self.base_name, self.cfg.seed)
        prune_run(self.run_dir, f.keep_checkpoints, f.checkpoint_every)

    def _aggregation_error(self, deltas: list[StateDict], weights: list[float]) -> float:
        """How far FedAvg of the parameters is from the average of the layers' weight updates."""
        if self.cfg.lora.kind == "binary":
            return binary_product_error(self.fed.state.adapter, deltas, weights)
        if self.dora_w0 is not None:
            scaling = self.cfg.lora.alpha / self.cfg.lora.rank
            return dora_weight_error(self.dora_w0, self.fed.state.adapter, deltas, weights, scaling)
        return lora_product_error(self.fed.state.adapter, deltas, weights)

    def run(self) -> str | None:
        """Run the remaining rounds; returns why the run stopped early (DP budget), else None."""
        cfg, run_dir = self.cfg, self.run_dir
        nodes = _wait_for_nodes(self.grid, cfg.federation.num_devices, cfg.federation.reply_timeout)
        self.verifier = make_verifier(self.grid, cfg, self.config_json, self.simulated)
        done = self.start_round - 1
        self._identify(nodes, done)
        truncate_metrics(run_dir, done)
        logged = any(m["round"] == done for m in read_metrics(run_dir))
        # A crash between checkpoint and metrics line: finish that round's line from the
        # training half saved before the checkpoint, with the re-evaluation below.
        pending = read_pending(run_dir, done) if not logged else None
        first = pending or RoundMetrics(round=done, version=self.fed.state.version)
        if cfg.dp.enabled and first.dp_epsilon is None:
            first.dp_epsilon = epsilon(self.fed.state.privacy, cfg.dp.accountant, cfg.dp.delta)
        self.evaluate(done, first, self._eval_nodes(nodes))
        if not logged:
            append_metrics(run_dir, first)
        bar = tqdm(
            range(self.start_round, cfg.federation.rounds + 1),
            desc="rounds",
            unit="round",
            initial=self.start_round - 1,
            total=cfg.federation.rounds,
        )
        bar.set_postfix(eval_loss=f"{first.eval_loss:.4f}" if first.eval_loss is not None else "-")
        for round_ in bar:
            if self.stop is not None and self.stop.is_set():
                bar.close()
                raise Interrupted(f"stopped before round {round_}")
            start, cpu_start = time.perf_counter(), time.process_time()
            planned = self.plan_privacy(round_, len(nodes)) if cfg.dp.enabled else None
            if planned is not None and 0 < cfg.dp.max_epsilon < planned[1]:
                reason = (
                    f"privacy budget: round {round_} would raise epsilon to {planned[1]:.3f} > "
                    f"dp.max-epsilon={cfg.dp.max_epsilon:g} (delta={cfg.dp.delta:g}); stopped after round {round_ - 1}"
                )
                log.warning(reason)
                bar.close()
                return reason
            m = RoundMetrics(round=round_, version=self.fed.state.version)
            self.train(round_, m, nodes, planned)
            m.version = self.fed.state.version
            with timed_phase(m, "io"):
                write_pending(run_dir, m)
                self._save(round_)
            if self._evaluates(round_):
                self.evaluate(round_, m, self._eval_nodes(nodes))
            m.seconds, m.server_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            append_metrics(run_dir, m)
            bar.set_postfix(eval_loss=f"{m.eval_loss:.4f}" if m.eval_loss is not None else "-", replies=m.replies)
            if m.replies < m.sampled:
                bar.write(f"round {round_}: {short_round_note(m)}")
        if self.valid_replies == 0 and self.start_round <= cfg.federation.rounds:
            raise FederationError(
                f"no device trained in rounds {self.start_round}..{cfg.federation.rounds} "
                f"(round {m.round}: {short_round_note(m)})"
            )
        return None


def _add_device_phases(m: RoundMetrics, phase: str, metrics: dict[str, float]) -> None:
    """Add one reply's own timing (sync, then ``phase``) to round ``m``; absent keys count 0."""
    add_phase(m, "sync", float(metrics.get(wire.SYNC_SECONDS, 0.0)), float(metrics.get(wire.SYNC_CPU_SECONDS, 0.0)))
    add_phase(m, phase, float(metrics.get(wire.SECONDS, 0.0)), float(metrics.get(wire.CPU_SECONDS, 0.0)))


def run_federation(grid: Grid, cfg: RunConfig, simulated: bool = False, stop: threading.Event | None = None) -> None:
    """Run (or resume) the federation described by ``cfg`` in ``cfg.run_dir``.

    ``simulated``: the Grid is Flower's simulation engine, so replies are awaited without a
    wall-clock timeout and dropouts come from ``federation.dropout`` (``server/rounds.py``).
    ``stop``: once set, the run ends at the next poll with status ``interrupted`` and the last
    completed (checkpointed) round; ``--resume`` continues it exactly.

    Writes ``status.json`` (``completed``, with a ``reason`` when the DP budget stopped the
    run early, or ``failed`` with the error) so callers that cannot see this thread's
    exceptions (``flwr run``) can still tell how it ended.
    """
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    status = run_dir / wire.STATUS_FILE
    atomic_write_text(status, json.dumps({"status": "running"}))
    try:
        _check_resumable(run_dir, cfg)
        atomic_write_text(run_dir / wire.CONFIG_FILE, dumps(cfg))
        ensure_canaries(run_dir, cfg)  # audit runs only: secrets the devices plant, for the report
        stopped = Federation(grid, cfg, run_dir, simulated, stop).run()
    except Interrupted as err:
        write_interrupted(run_dir, str(err))  # the caller prints the one line
        return
    except (KeyboardInterrupt, SystemExit, RunNotRunningException) as err:
        # On real devices: `edgetune run` stopped the run (Flower's Grid then raises
        # RunNotRunningException, or has this process signal itself), or `edgetune server`
        # stopped the ServerApp's process (Flower's signal handler exits it). Either way the
        # run can be continued from its last checkpoint.
        write_interrupted(run_dir, f"stopped on the server ({type(err).__name__})")
        raise
    except BaseException as err:
        atomic_write_text(status, json.dumps({"status": "failed", "error": f"{type(err).__name__}: {err}"}))
        raise
    atomic_write_text(status, json.dumps({"status": "completed", **({"reason": stopped} if stopped else {})}))


def _check_resumable(run_dir: Path, cfg: RunConfig) -> None:
    """A run folder with checkpoints resumes only under the settings that made them."""
    saved = run_dir / wire.CONFIG_FILE
    if not (saved.is_file() and (run_dir / wire.CHECKPOINT_DIR).is_dir()):
        return
    old, new = json.loads(saved.read_text()), to_flat(cfg)
    with contextlib.suppress(ConfigError):  # a folder from an older edgetune: its missing keys took the defaults
        old = to_flat(from_flat(old))
    free = RESUMABLE_KEYS | {"run-dir"}  # the folder itself is this run's identity here
    changed = sorted(k for k in old.keys() | new.keys() if k not in free and old.get(k) != new.get(k))
    if changed:
        raise FederationError(
            f"run folder {run_dir} was made with other settings ({changed}); "
            "use a new --run-dir, or the same settings to resume"
        )
