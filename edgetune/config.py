"""The run configuration: one frozen dataclass tree, parsed once at the boundary.

Flower hands apps a flat run-config whose keys are ``section.dashed-name`` (that is how
``[tool.flwr.app.config]`` tables flatten). :func:`from_flat` turns such a mapping into a
:class:`RunConfig`, validating every value; :func:`to_flat` is its inverse. Defaults live
here and nowhere else.

Example:
    >>> cfg = from_flat({"federation.rounds": 2, "lora.rank": 4})
    >>> cfg.federation.rounds, cfg.lora.rank, cfg.lora.alpha
    (2, 4, 16.0)
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgetune import wire
from edgetune.types import (
    CODECS,
    ENGINES,
    PRECISIONS,
    Codec,
    DpAccountant,
    DpClipSite,
    DpSampling,
    Engine,
    Partition,
    TrainPrecision,
)

__all__ = [
    "AGGREGATORS",
    "AuditConfig",
    "CODECS",
    "ConfigError",
    "DataConfig",
    "DpConfig",
    "EvalConfig",
    "FederationConfig",
    "LoraConfig",
    "ModelConfig",
    "RagConfig",
    "RunConfig",
    "SecAggConfig",
    "TrainConfig",
    "ENGINES",
    "PRECISIONS",
    "RESUMABLE_KEYS",
    "from_flat",
    "parse_overrides",
    "read_run_config",
    "to_flat",
]

AGGREGATORS = ("mean", "median", "trimmed-mean", "norm-bound", "multi-krum", "centered-clip")
LORA_KINDS = ("lora", "dora", "binary")
BASE_QUANTIZE = ("none", "int8", "int4")

# Settings a run may change when it resumes: not part of its identity (the server's resume
# check and a device's per-run state folder both leave them out).
RESUMABLE_KEYS = frozenset(
    {
        "federation.rounds",
        "federation.reply-timeout",
        "dp.max-epsilon",
        "federation.eval-every",
        "federation.eval-devices",
        "federation.keep-checkpoints",
        "federation.checkpoint-every",
    }
)

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _check(ok: bool, key: str, value: object, need: str) -> None:
    if not ok:
        raise ConfigError(f"config {key}={value!r}: {need}")


def _check_choices(section: object, prefix: str) -> None:
    """Every ``Literal``-typed field of ``section`` holds one of its choices."""
    for name, kind in _field_types(type(section)).items():
        if typing.get_origin(kind) is Literal:
            choices = typing.get_args(kind)
            value = getattr(section, name)
            _check(value in choices, f"{prefix}.{name.replace('_', '-')}", value, f"one of {choices}")


@dataclass(frozen=True)
class ModelConfig:
    """Which base model every device fine-tunes."""

    base: str = "smollm2"
    """``smollm2`` (the embedded SmolLM2-135M-Instruct), ``tiny`` (random test Llama), or a
    local Hugging Face folder or ``.gguf`` file of a Llama-family causal LM."""
    quantize: Literal["none", "int8", "int4"] = "none"
    """Weight-only quantisation of the frozen base on the device (torchao): ``none`` (fp32),
    ``int8`` (per-channel int8) or ``int4`` (group-wise; needs CPU kernels that train through
    it, else the device fails in one line saying why). The adapter stays fp32."""

    def __post_init__(self) -> None:
        _check(self.quantize in BASE_QUANTIZE, "model.quantize", self.quantize, f"one of {BASE_QUANTIZE}")


@dataclass(frozen=True)
class LoraConfig:
    """The adapter: x -> W0 x + (alpha / rank) B A x on each targeted projection."""

    rank: int = 8
    """Inner dimension r of B (out, r) and A (r, in)."""
    alpha: float = 16.0
    """Scale numerator; the update is multiplied by alpha / rank."""
    targets: tuple[str, ...] = ALL_PROJECTIONS
    """Linear layers that get an adapter (module-name suffixes)."""
    train_a: bool = False
    """Both-factor mode: train and exchange A as well as B. Off by default: A stays frozen
    at its shared-seed value, which makes FedAvg over deltas exact and halves the bytes."""
    kind: Literal["lora", "dora", "binary"] = "lora"
    """``lora`` (plain), ``dora`` (PEFT ``use_dora``: a trained magnitude per output row that
    travels with B) or ``binary`` (each factor is ``sign(W) * s`` in the forward pass, trained
    through latent fp32 weights; the deployed adapter is 1 bit per parameter, docs/adapters.md)."""

    def __post_init__(self) -> None:
        _check(self.kind in LORA_KINDS, "lora.kind", self.kind, f"one of {LORA_KINDS}")
        _check(self.rank >= 1, "lora.rank", self.rank, "must be >= 1")
        _check(self.alpha > 0, "lora.alpha", self.alpha, "must be > 0")
        _check(len(self.targets) > 0, "lora.targets", self.targets, "name at least one layer")


@dataclass(frozen=True)
class DataConfig:
    """Where each device's examples come from and how they are cut."""

    source: str = "chatterbot"
    """``chatterbot`` (embedded chatterbot-corpus) or a JSONL file / folder of JSONL files;
    a folder holding one file per device gives device i its i-th file (sorted)."""
    partition: Partition = "lang-topic"
    """How the embedded corpus is split: ``lang-topic`` (natural non-IID: a device is one
    (language, topic) slice), ``iid`` or ``dirichlet``."""
    languages: tuple[str, ...] = ("english",)
    """chatterbot-corpus languages to draw slices from."""
    dirichlet_alpha: float = 0.5
    """Concentration for the ``dirichlet`` partition (smaller = more skewed)."""
    heldout_fraction: float = 0.2
    """Share of each device's conversations kept aside for evaluation."""
    max_length: int = 256
    """Tokens per example after the chat template (longer ones are truncated)."""
    max_eval_examples: int = 32
    """Held-out conversations each device evaluates per round (the first N of its split)."""
    packing: bool = False
    """Concatenate examples into blocks of ``max_length`` tokens."""

    def __post_init__(self) -> None:
        _check_choices(self, "data")
        _check(0 < self.heldout_fraction < 1, "data.heldout-fraction", self.heldout_fraction, "in (0, 1)")
        _check(self.max_length >= 8, "data.max-length", self.max_length, "must be >= 8")
        _check(self.max_eval_examples >= 1, "data.max-eval-examples", self.max_eval_examples, "must be >= 1")
        _check(self.dirichlet_alpha > 0, "data.dirichlet-alpha", self.dirichlet_alpha, "must be > 0")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each device, per round."""

    local_steps: int = 8
    """Optimizer steps K per device per round."""
    batch_size: int = 8
    """Conversations per step."""
    learning_rate: float = 2e-3
    """AdamW learning rate for the adapter parameters."""
    max_grad_norm: float = 0.0
    """Clip the adapter gradient's L2 norm to this before every step (Hugging Face's
    ``Trainer`` clips at 1.0); 0 means no clipping. PyTorch engine only."""
    precision: TrainPrecision = "auto"
    """``auto`` (bf16 autocast where the CPU has bf16 matrix units, AMX or AVX512-BF16, about
    2x faster there; fp32 elsewhere, where bf16 is several times slower; resolved by each
    device for itself, ``edgetune/precision.py``), ``bf16`` or ``fp32``."""
    checkpointing: Literal["auto", "on", "off"] = "auto"
    """Activation checkpointing: ``on`` keeps only each decoder layer's input in the forward
    pass and recomputes the rest in the backward pass (about a third more compute, far less
    memory; the same gradients); ``auto`` turns it on where the base is quantised
    (``model.quantize``: a mode for devices short of memory, as QLoRA does), resolved with
    the precision (``edgetune/precision.py``)."""
    compile: Literal["auto", "on", "off"] = "auto"
    """``torch.compile`` each decoder layer for the local steps (16-18% less CPU time per step
    on SmolLM2 in bf16, 8% in fp32, after 20-45 s of compiling once per device process; the
    held-out loop stays uncompiled). ``auto`` turns it on where that pays: a base larger than the
    embedded tiny one, at least 200 local steps per device over the run (rounds x
    local-steps), a plain LoRA adapter on an unquantised base, trained by PyTorch without
    activation checkpointing, on a device with a C++ compiler for inductor's kernels (each
    device resolves it for itself, with the precision, ``edgetune/precision.py``)."""
    engine: Engine = "pytorch"
    """What runs the local steps: ``pytorch`` or ``onnxruntime`` (ONNX Runtime training
    artefacts built once per device, always fp32). A SuperNode's ``train-engine`` node config
    overrides it for that device."""
    ort_devices: tuple[str, ...] = ()
    """Simulation only: partition ids (e.g. ``0,3``) that train with ``onnxruntime`` whatever
    ``engine`` says, so one run can mix engines."""

    @property
    def pytorch_only(self) -> bool:
        """Every device trains with PyTorch (none with ONNX Runtime by ``engine`` or ``ort_devices``)."""
        return self.engine == "pytorch" and not self.ort_devices

    def __post_init__(self) -> None:
        _check_choices(self, "train")
        _check(all(d.isdigit() for d in self.ort_devices), "train.ort-devices", self.ort_devices, "partition ids")
        _check(self.local_steps >= 1, "train.local-steps", self.local_steps, "must be >= 1")
        _check(self.batch_size >= 1, "train.batch-size", self.batch_size, "must be >= 1")
        _check(self.learning_rate > 0, "train.learning-rate", self.learning_rate, "must be > 0")
        _check(self.max_grad_norm >= 0, "train.max-grad-norm", self.max_grad_norm, "must be >= 0")
        _check(
            not self.max_grad_norm or self.pytorch_only,
            "train.max-grad-norm",
            self.max_grad_norm,
            "clips with train.engine=pytorch only (the ONNX Runtime artefacts hold their own AdamW step)",
        )


@dataclass(frozen=True)
class FederationConfig:
    """Rounds, devices and what travels between them."""

    rounds: int = 3
    """Training rounds R (round 0 is the evaluation of the initial adapter)."""
    num_devices: int = 8
    """Devices in the federation (virtual SuperNodes in simulation)."""
    devices_per_round: int = 0
    """Devices sampled for training each round (uniformly, seeded by run seed and round);
    0 means all of them."""
    codec: Codec = "1bit"
    """Exchange codec, both directions: ``1bit`` (sign bits + per-row scales, error
    feedback), ``2bit`` (a magnitude bit too, two levels per row; twice the bytes, a quarter
    of the squared error), ``fp16`` or ``fp32``."""
    min_replies: int = 1
    """Rounds with fewer valid replies keep the old global adapter."""
    reply_timeout: float = 600.0
    """Real deployments: seconds the server waits for replies in one round. A simulation
    never uses it to decide who is in a round (that would make results depend on how busy
    the machine is); it waits for every sampled device and takes dropouts from ``dropout``."""
    max_delta_rms: float = 0.0
    """Largest root-mean-square of a decoded train delta the server accepts; 0 derives it
    from the training settings, 3.2 * 3 * train.local-steps * train.learning-rate (no honest
    AdamW run moves an element further; ``server/validate.py``)."""
    aggregator: str = "mean"
    """How valid deltas are combined (``server/robust.py``): ``mean`` (FedAvg weighted by
    examples), ``median``, ``trimmed-mean``, ``norm-bound``, ``multi-krum`` or
    ``centered-clip``. Anything but ``mean`` is refused under DP."""
    byzantine_fraction: float = 0.2
    """f: the share of a round's replies assumed malicious (trimmed-mean, multi-krum)."""
    clip_multiple: float = 2.0
    """c: the clipping radius in units of the round's median norm (norm-bound) or median
    distance from the coordinate median (centered-clip)."""
    dropout: float = 0.0
    """Simulation only: the probability that a sampled device drops out of a training round,
    drawn from (run seed, round, device id) so that a rerun drops the same devices."""
    eval_every: int = 1
    """Evaluate the global adapter every k-th round (round 0 and the last round always)."""
    eval_devices: int = 0
    """Devices that evaluate when a round evaluates: a fixed seeded sample; 0 means all."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept in the run folder (the newest is the one a resume needs)."""
    checkpoint_every: int = 0
    """Also keep every k-th round's checkpoint as a snapshot (0: none); snapshots hold the
    adapter and server state but not the update chain (resume uses the newest)."""

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "federation.rounds", self.rounds, "must be >= 1")
        _check(self.num_devices >= 1, "federation.num-devices", self.num_devices, "must be >= 1")
        _check(
            0 <= self.devices_per_round <= self.num_devices,
            "federation.devices-per-round",
            self.devices_per_round,
            f"in [0, num-devices={self.num_devices}] (0: all)",
        )
        _check_choices(self, "federation")
        _check(self.min_replies >= 1, "federation.min-replies", self.min_replies, "must be >= 1")
        _check(self.reply_timeout > 0, "federation.reply-timeout", self.reply_timeout, "must be > 0")
        _check(0 <= self.dropout < 1, "federation.dropout", self.dropout, "in [0, 1)")
        _check(self.aggregator in AGGREGATORS, "federation.aggregator", self.aggregator, f"one of {AGGREGATORS}")
        fraction = self.byzantine_fraction
        _check(0 <= fraction < 0.5, "federation.byzantine-fraction", fraction, "in [0, 0.5)")
        _check(self.clip_multiple > 0, "federation.clip-multiple", self.clip_multiple, "must be > 0")
        _check(self.max_delta_rms >= 0, "federation.max-delta-rms", self.max_delta_rms, "must be >= 0 (0: derived)")
        _check(self.eval_every >= 1, "federation.eval-every", self.eval_every, "must be >= 1")
        _check(
            0 <= self.eval_devices <= self.num_devices,
            "federation.eval-devices",
            self.eval_devices,
            f"in [0, num-devices={self.num_devices}] (0: all)",
        )
        _check(self.keep_checkpoints >= 1, "federation.keep-checkpoints", self.keep_checkpoints, "must be >= 1")
        _check(self.checkpoint_every >= 0, "federation.checkpoint-every", self.checkpoint_every, ">= 0 (0: none)")

    @property
    def sampled(self) -> int:
        """Devices trained per round."""
        return self.devices_per_round or self.num_devices


@dataclass(frozen=True)
class DpConfig:
    """User-level differential privacy: clip each device's delta, noise the sum, account.

    Under DP the server computes ``(sum_i clip(d_i, C) + N(0, (z C)^2 I)) / m`` with uniform
    weights, skips rounds below ``min_replies``, and reports epsilon at ``delta`` after each
    round (see ``server/dp.py``, ``server/accounting.py`` and ``docs/privacy-dp.md``).
    """

    enabled: bool = False
    """Turn DP on (off: plain FedAvg weighted by example counts)."""
    clip_norm: float = 10.0
    """C: L2 bound on each device's whole delta (all exchanged tensors together). The default
    sits at the measured norm of a decoded 1-bit SmolLM2 delta after one round of the default
    training (9.4-11.0 on four devices); it scales with local steps and learning rate."""
    noise_multiplier: float = 1.0
    """z: the noise on the sum has standard deviation z * C per coordinate."""
    clip_on: DpClipSite = "server"
    """``server`` (clip the decoded delta) or ``device`` (the device also clips before
    encoding, so less error feedback is wasted; the server still clips what it decodes)."""
    min_replies: int = 2
    """Quorum: a round with fewer valid replies is skipped (no update), never under-noised."""
    delta: float = 1e-5
    """Target delta of the (epsilon, delta) guarantee; keep it well below 1 / num-devices."""
    max_epsilon: float = 0.0
    """Stop the run before a round would push epsilon above this; 0 means no limit."""
    accountant: DpAccountant = "rdp"
    """``rdp`` (Renyi DP, both samplings) or ``pld`` (privacy-loss distributions, Poisson only)."""
    sampling: DpSampling = "poisson"
    """``poisson`` (each device joins a round independently with probability
    devices-per-round / num-devices) or ``fixed`` (exactly devices-per-round, without replacement)."""

    def __post_init__(self) -> None:
        _check(self.clip_norm > 0, "dp.clip-norm", self.clip_norm, "must be > 0")
        _check(self.noise_multiplier > 0, "dp.noise-multiplier", self.noise_multiplier, "must be > 0")
        _check_choices(self, "dp")
        _check(self.min_replies >= 1, "dp.min-replies", self.min_replies, "must be >= 1")
        _check(0 < self.delta < 1, "dp.delta", self.delta, "in (0, 1)")
        _check(self.max_epsilon >= 0, "dp.max-epsilon", self.max_epsilon, "must be >= 0 (0: no limit)")
        _check(
            not (self.accountant == "pld" and self.sampling == "fixed"),
            "dp.accountant",
            self.accountant,
            "pld supports dp.sampling=poisson only; use dp.accountant=rdp for fixed-size sampling",
        )


@dataclass(frozen=True)
class AuditConfig:
    """Audit runs: secret canaries planted in chosen devices' training data (simulation only).

    With ``canaries`` > 0 the server draws ``2 * canaries`` random secrets from the operating
    system's entropy at the start of the run and writes them to the run folder
    (``canaries.json``); half are planted, half are kept as never-planted controls. Device i
    (partition id) for i < ``canary_devices`` trains on its share, each repeated
    ``canary_repeats`` times. ``edgetune audit`` measures their exposure in the final model.
    """

    canaries: int = 0
    """Canaries planted (and as many generated but never planted); 0 turns planting off."""
    canary_devices: int = 1
    """Devices (partition ids 0..k-1) that get the planted canaries, dealt round-robin."""
    canary_repeats: int = 20
    """Copies of each planted canary conversation in its device's training split."""

    def __post_init__(self) -> None:
        _check(self.canaries >= 0, "audit.canaries", self.canaries, "must be >= 0 (0: no canaries)")
        _check(self.canary_devices >= 1, "audit.canary-devices", self.canary_devices, "must be >= 1")
        _check(self.canary_repeats >= 1, "audit.canary-repeats", self.canary_repeats, "must be >= 1")


@dataclass(frozen=True)
class RagConfig:
    """The device's local retrieval index and retrieval-augmented training (``client/rag.py``)."""

    enabled: bool = False
    """Prefix every training and held-out example's question with the top-k chunks retrieved
    from the device's own index (a system "Context:" block; labels stay on the answer)."""
    top_k: int = 3
    """Chunks retrieved per question."""
    documents: str = "answers"
    """What a simulated device indexes on first use: ``answers`` (the assistant turns of its
    own training split; a training example never retrieves its own answer), ``pydoc``
    (Python's ``pydoc_data.topics`` dealt across devices), or a folder whose i-th sorted
    subfolder holds device i's documents. A real device uses the index ``edgetune rag build``
    made in its storage folder."""
    chunk_size: int = 512
    """Characters per chunk (chunks break at paragraph and heading boundaries where possible)."""
    chunk_overlap: int = 64
    """Characters a chunk repeats from the end of the one before it."""
    max_context_tokens: int = 192
    """Token cap on the context block; it also never takes tokens the answer needs within
    ``data.max-length``."""

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, "rag.top-k", self.top_k, "must be >= 1")
        _check(self.chunk_size >= 32, "rag.chunk-size", self.chunk_size, "must be >= 32")
        _check(
            0 <= self.chunk_overlap < self.chunk_size // 2,
            "rag.chunk-overlap",
            self.chunk_overlap,
            f"in [0, chunk-size/2={self.chunk_size // 2})",
        )
        _check(self.max_context_tokens >= 1, "rag.max-context-tokens", self.max_context_tokens, "must be >= 1")
        _check(bool(self.documents), "rag.documents", self.documents, "answers, pydoc or a folder")


@dataclass(frozen=True)
class EvalConfig:
    """Answer-quality evaluation of a finished run (``edgetune eval``; ``docs/evaluation.md``)."""

    enabled: bool = False
    """``edgetune simulate`` evaluates the run when it completes (as ``edgetune eval RUN``)."""
    baselines: bool = False
    """Also train and evaluate local-only, centralised and personalised baselines."""
    max_new_tokens: int = 48
    """Greedy answer length bound, in tokens."""
    batch_size: int = 16
    """Questions per ``generate`` call (left-padded)."""
    personal_steps: int = 0
    """Local steps of the personalised baseline on top of the global adapter; 0: the run's
    ``train.local-steps`` (one round's worth)."""
    bootstrap: int = 1000
    """Bootstrap resamples per confidence interval."""
    confidence: float = 0.95
    """Confidence level of the intervals."""

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "eval.max-new-tokens", self.max_new_tokens, "must be >= 1")
        _check(self.batch_size >= 1, "eval.batch-size", self.batch_size, "must be >= 1")
        _check(self.personal_steps >= 0, "eval.personal-steps", self.personal_steps, "must be >= 0 (0: local-steps)")
        _check(self.bootstrap >= 1, "eval.bootstrap", self.bootstrap, "must be >= 1")
        _check(0 < self.confidence < 1, "eval.confidence", self.confidence, "in (0, 1)")


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (``server/secagg.py``, ``adapters/secagg_*.py``; docs/privacy-dp.md).

    The server learns only the sum of the sampled devices' integer-quantised deltas, taken
    modulo 2^k with k = bits + ceil(log2(n + 1)) (plus noise headroom under DP). With
    ``dp.enabled`` too, every device adds Skellam noise (distributed DP) and clips on the
    device; options that need individual updates are refused.
    """

    enabled: bool = False
    """Run every training round as the four secure-aggregation stages."""
    threshold: int = 0
    """t: devices needed to finish a round (Shamir t-of-n); 0 means floor(n / 2) + 1 of the
    n devices sampled. Below t survivors the round is skipped, never summed wrongly."""
    neighbours: int = 0
    """SecAgg+ (Bell et al. 2020): each device masks with this many neighbours on a random
    ring; 0 means every other device (the original SecAgg). A device's secrets are shared
    among its neighbours (and itself), so keep threshold <= neighbours to survive dropouts."""
    bits: int = 1
    """b: quantisation bits per parameter (1: unbiased sign-like). With dp.enabled, the signed
    bits of each device's integer input (>= 2; the noise needs the finer grid, e.g. 16)."""
    range: float = 0.0
    """c: per-coordinate clipping range of the b-bit grid, shared by the round; 0 means
    train.learning-rate * train.local-steps (an Adam step moves a weight by about lr)."""
    dropout: float = 0.0
    """Simulation only: the chance that a device drops out before each of the share, mask and
    unmask stages (drawn from run seed, round, stage and device id), to exercise recovery."""

    def __post_init__(self) -> None:
        _check(self.threshold == 0 or self.threshold >= 2, "secagg.threshold", self.threshold, ">= 2 (0: auto)")
        _check(self.neighbours >= 0, "secagg.neighbours", self.neighbours, "must be >= 0 (0: all)")
        _check(1 <= self.bits <= 24, "secagg.bits", self.bits, "in [1, 24]")
        _check(self.range >= 0, "secagg.range", self.range, "must be >= 0 (0: auto)")
        _check(0 <= self.dropout < 1, "secagg.dropout", self.dropout, "in [0, 1)")


@dataclass(frozen=True)
class RunConfig:
    """Everything one federated run needs."""

    seed: int = 0
    """Seeds the shared LoRA A init, device sampling, data splits and shuffles."""
    run_dir: str = "runs/default"
    """Run folder: config, checkpoints, metrics, global adapter, plots, device storage."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    rag: RagConfig = field(default_factory=RagConfig)
    dp: DpConfig = field(default_factory=DpConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)

    def __post_init__(self) -> None:
        robust = self.federation.aggregator
        _check(
            not (self.dp.enabled and robust != "mean"),
            "federation.aggregator",
            robust,
            "must be mean under dp.enabled (DP's clipping and noise are calibrated to the plain mean)",
        )
        _check_secagg(self)
        _check_adapter_kind(self)


def _check_adapter_kind(cfg: RunConfig) -> None:
    """Combinations of ``lora.kind`` and the device's engine and base that cannot train."""
    kind = cfg.lora.kind
    _check(
        kind == "lora" or cfg.train.pytorch_only,
        "lora.kind",
        kind,
        "trains with train.engine=pytorch only (the ONNX Runtime artefacts hold plain LoRA)",
    )
    _check(
        not (kind == "dora" and cfg.model.quantize != "none"),
        "lora.kind",
        kind,
        f"needs an unquantised base (DoRA takes row norms of the base weights; model.quantize={cfg.model.quantize})",
    )
    _check(
        not (kind == "binary" and cfg.federation.codec in ("1bit", "2bit")),
        "lora.kind",
        kind,
        "needs federation.codec=fp16 or fp32: a 1-bit-coded latent B has one magnitude per column, so its"
        " signs after a round are decided column by column (measured: divergence; docs/adapters.md; 2-bit,"
        " with two, is untested)",
    )


def _check_secagg(cfg: RunConfig) -> None:
    """With secure aggregation on, the server never sees one update: refuse what needs it."""
    sa, dp = cfg.secagg, cfg.dp
    if not sa.enabled:
        return
    n = cfg.federation.sampled
    robust = cfg.federation.aggregator
    _check(robust == "mean", "federation.aggregator", robust, "must be mean under secagg (it sees only the sum)")
    _check(n >= 2, "federation.devices-per-round", n, "secagg.enabled needs >= 2 devices per round")
    _check(sa.threshold <= n, "secagg.threshold", sa.threshold, f"<= devices per round ({n})")
    _check(
        sa.neighbours == 0 or sa.threshold <= sa.neighbours + 1,
        "secagg.threshold",
        sa.threshold,
        f"<= secagg.neighbours + 1 ({sa.neighbours + 1}): each secret is shared among a device's neighbours",
    )
    if dp.enabled:
        _check(
            dp.clip_on == "device",
            "dp.clip-on",
            dp.clip_on,
            "secagg hides each update: server clipping is off; use device",
        )
        _check(dp.accountant == "rdp", "dp.accountant", dp.accountant, "the Skellam mechanism is accounted with rdp")
        _check(sa.bits >= 2, "secagg.bits", sa.bits, "distributed DP needs >= 2 signed bits (e.g. 16)")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Convert a flat-config value (str, int, float, bool) to the field's type."""
    origin = typing.get_origin(kind)
    if origin is tuple:
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, list | tuple):
            items = [str(v) for v in value]
        else:
            raise ConfigError(f"config {key}={value!r}: expected a comma-separated list")
        return tuple(items)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "1", "yes", "on", "false", "0", "no", "off"}:
            return value.lower() in {"true", "1", "yes", "on"}
        raise ConfigError(f"config {key}={value!r}: expected true or false")
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"config {key}={value!r}: expected an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config {key}={value!r}: expected an integer") from None
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(f"config {key}={value!r}: one of {choices}")
        return value
    if kind is float:
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ConfigError(f"config {key}={value!r}: expected a finite number")
        return number
    return str(value)


def from_flat(flat: Mapping[str, Any]) -> RunConfig:
    """Build a validated :class:`RunConfig` from ``section.dashed-key`` values.

    Unknown keys raise :class:`ConfigError` (a typo must not silently fall back to a default).
    """
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    hints = _field_types(RunConfig)
    for raw_key, value in flat.items():
        section, _, name = raw_key.rpartition(".")
        attr = name.replace("-", "_")
        if not section:
            if attr not in hints or dataclasses.is_dataclass(hints[attr]):
                raise ConfigError(f"unknown config key {raw_key!r}; known: {sorted(to_flat(RunConfig()))}")
            top[attr] = _coerce(raw_key, value, hints[attr])
            continue
        cls = hints.get(section.replace("-", "_"))
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ConfigError(f"unknown config section in {raw_key!r}")
        sub_hints = _field_types(cls)
        if attr not in sub_hints:
            raise ConfigError(f"unknown config key {raw_key!r}; known: {sorted(to_flat(RunConfig()))}")
        sections.setdefault(section, {})[attr] = _coerce(raw_key, value, sub_hints[attr])
    built = {name: hints[name](**values) for name, values in sections.items()}
    return RunConfig(**top, **built)


def to_flat(config: RunConfig) -> dict[str, bool | int | float | str]:
    """Inverse of :func:`from_flat`; tuples become comma-separated strings."""
    flat: dict[str, bool | int | float | str] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                item = getattr(value, sub.name)
                flat[f"{f.name}.{sub.name.replace('_', '-')}"] = ",".join(item) if isinstance(item, tuple) else item
        else:
            flat[f.name.replace("_", "-")] = value
    return flat


def dumps(config: RunConfig) -> str:
    """The resolved config as pretty JSON (what the run folder keeps)."""
    return json.dumps(to_flat(config), indent=2, sort_keys=True)


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` flags as a flat mapping (values stay strings; :func:`from_flat` types them).

    Example:
        >>> parse_overrides(["lora.rank=4", "train.learning-rate = 1e-3"])
        {'lora.rank': '4', 'train.learning-rate': '1e-3'}

    Raises:
        ConfigError: an item has no ``=``.
    """
    flat: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        flat[key.strip()] = value.strip()
    return flat


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The flat config a run folder was made with (its ``config.json``).

    Raises:
        ConfigError: ``run_dir`` is not a folder holding a readable ``config.json``.
    """
    path = Path(run_dir) / wire.CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {wire.CONFIG_FILE} there, so it is not a run folder")
    try:
        flat = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable ({err})") from None
    if not isinstance(flat, dict):
        raise ConfigError(f"{path}: expected a JSON object of config keys")
    return flat
