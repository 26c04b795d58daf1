"""Record keys, message types and file names: the names both sides must agree on.

A downlink (server -> device) message carries:
    ``config``  ConfigRecord: round, target version, the run config (JSON), device root
    ``update.<version>`` ArrayRecords: encoded global updates the device applies in order
    ``full``    ArrayRecord (optional): the whole global adapter in fp16, replacing its copy
An uplink (device -> server) reply carries:
    ``delta``   ArrayRecord: the encoded adapter delta (train replies only)
    ``metrics`` MetricRecord: round, held version, examples, loss, tokens, seconds (wall, CPU, sync)
    ``device``  ConfigRecord: the device's stable id and its signature of the reply
"""

from __future__ import annotations

# Message content keys.
CONFIG = "config"
FULL = "full"
UPDATE_PREFIX = "update."
DELTA = "delta"
METRICS = "metrics"
DEVICE = "device"

# ConfigRecord keys (downlink).
ROUND = "round"
VERSION = "version"
RUN_CONFIG_JSON = "run-config"
DEVICE_ROOT = "device-root"

# MetricRecord keys (uplink).
HELD_VERSION = "held-version"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
EVAL_LOSS = "eval-loss"
NUM_TOKENS = "num-tokens"
SECONDS = "seconds"  # wall seconds of the local steps (train) or the held-out loop (evaluate)
CPU_SECONDS = "cpu-seconds"  # the same in the device process's CPU time
SYNC_SECONDS = "sync-seconds"  # wall seconds from message to synced adapter (data, model, downlink)
SYNC_CPU_SECONDS = "sync-cpu-seconds"

# Encoded-tensor key suffixes: "<tensor name>:<part>".
PART_SEP = ":"
BITS = "bits"
SCALES = "scales"
VALUES = "values"

# Before sampling from unnamed nodes: each names its device id (signed), so that sampling,
# evaluation samples and dropouts follow device ids from the first round (node ids are random).
IDENTIFY = "query.identify"  # config: round, run config; reply: metrics (round), device record

# Secure aggregation (server/secagg.py, client/secagg.py): four message types, one record.
SECAGG = "secagg"  # ConfigRecord in every stage's message and reply
SECAGG_MASKED = "secagg-masked"  # ArrayRecord: the masked input, k bits per parameter, packed
SECAGG_PUBLIC = "secagg-public"  # ArrayRecord (keys stage): the two public keys, signed with the reply
SECAGG_KEYS = "train.secagg_keys"  # 1: downlink + train; reply: metrics and two public keys
SECAGG_SHARE = "train.secagg_share"  # 2: roster; reply: encrypted shares per neighbour, commitment
SECAGG_MASK = "train.secagg_mask"  # 3: shares for this device; reply: the masked input
SECAGG_UNMASK = "train.secagg_unmask"  # 4: survivors, dropped; reply: their shares
SA_COHORT = "cohort"
SA_NODES = "nodes"
SA_C_PK = "c-pk"
SA_S_PK = "s-pk"
SA_DST = "dst"
SA_SRC = "src"
SA_CIPHERTEXTS = "ciphertexts"
SA_COMMITMENT = "commitment"
SA_SHARED = "shared"
SA_SURVIVORS = "survivors"
SA_DROPPED = "dropped"
SA_SEED_SHARES = "seed-shares"
SA_KEY_SHARES = "key-shares"
SA_ADVERT_SIG = "advert-signature"  # keys reply: the device's signature of its advertisement
SA_SIGNER = "signer"  # keys reply: SHA-256 of the signing public key (DER), to find it in a registry
SA_ADVERT_SIGS = "advert-signatures"  # share message: every roster entry's advertisement signature
SA_SIGNERS = "signers"  # share message: every roster entry's signer
SA_SESSION = "secagg-session"  # device context state: the session (JSON bytes)
SA_INPUT = "secagg-input"  # device context state: the integer input (ArrayRecord)
SA_RECORD_ENV = "EDGETUNE_TEST_SECAGG_RECORD"  # tests only: folder a device writes its integer inputs to
SA_HOLD_ENV = "EDGETUNE_TEST_SECAGG_HOLD"  # tests only: file a device writes, then holds, on the unmask message

# ConfigRecord keys (uplink ``device`` record): the device's id and its signature of the reply.
SIGNATURE = "signature"  # bytes: edgetune.signing over run, round, device, metrics, payload bytes

# Node config keys a SuperNode can set (simulation fills partition-id itself).
PARTITION_ID = "partition-id"
STORAGE_DIR = "storage-dir"
DATA_PATH = "data-path"
DEVICE_ID = "device-id"
TRAIN_ENGINE = "train-engine"  # pytorch | onnxruntime (overrides train.engine)
SIGNING_KEY = "signing-key"  # path of the device's private key (the one registered with the server)
PEER_KEYS = "peer-keys"  # path: the registered devices' public keys (*.pub file or folder), for SecAgg rosters

# Run folder layout.
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
PENDING_FILE = "metrics.pending.json"
CHECKPOINT_DIR = "checkpoints"
UPDATES_DIR = "updates"
DEVICES_DIR = "devices"
ADAPTER_DIR = "adapter"
STATUS_FILE = "status.json"
UPLINKS_FILE = "uplinks.jsonl"  # what left each device, one line per reply (server/uplinks.py)
CANARIES_FILE = "canaries.json"  # an audit run's secrets, for the report only (server/audit)
REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
EVAL_JSON = "eval.json"  # edgetune eval: every score, budget and answer (simulations/evaluate_run.py)
EVAL_TEXT = "eval.txt"  # edgetune eval: the verdict and the per-device table
EVAL_PLOT = "eval.png"

# Device storage layout.
HELD_ADAPTER_FILE = "global_adapter.safetensors"
RESIDUAL_FILE = "residual.safetensors"
ORT_ARTIFACTS_DIR = "ort-training"  # <storage>/ort-training/<key>/: ONNX Runtime training artefacts

# Device RAG index (<device storage>/rag/; never sent anywhere). The manifest is written last
# and names the generation of the chunk and embedding files it belongs to.
RAG_DIR = "rag"
RAG_MANIFEST_FILE = "manifest.json"
RAG_CHUNKS_PREFIX = "chunks-"  # chunks-<generation>.jsonl: one chunk per line, row order
RAG_EMBEDDINGS_PREFIX = "embeddings-"  # embeddings-<generation>.npy: (N, 384) float32, unit rows

# Real devices (edgetune server / device join / run). The server's state folder holds the
# TLS folder, Flower's SuperLink database (registered device keys, runs) and its log.
SERVER_TLS_DIR = "tls"
SUPERLINK_DB_FILE = "superlink.db"
SUPERLINK_LOG_FILE = "superlink.log"
SUPERNODE_LOG_FILE = "supernode.log"  # in the device's storage folder
DEVICE_RUNS_DIR = "runs"  # <device storage>/runs/<run key>/: one run's held adapter and residual
DEVICE_PRIVATE_KEY_SUFFIX = ".key"  # OpenSSH EC P-384 private key, mode 0600
DEVICE_PUBLIC_KEY_SUFFIX = ".pub"  # OpenSSH public key: the file the server registers

__all__ = [k for k in dir() if k.isupper()]
