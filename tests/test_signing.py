"""Signed replies (edgetune/signing.py, server/validate.py, server/identity.py).

A reply is signed by the device's key over run, round, device id, held version, every metric
and the exact payload bytes; the server checks the signature before decoding anything.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from edgetune import wire
from edgetune.adapters.codec import encode
from edgetune.server.identity import Identities
from edgetune.server.validate import Rejection, TrainReply, Verifier, validate_eval, validate_train
from edgetune.signing import content_digest, run_tag, sign, simulation_key

SEED, ROUND, VERSION = 11, 3, 2
RUN = run_tag('{"seed": 11}')
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
SHAPES = {B: (16, 4)}
VERIFIER = Verifier(RUN, lambda node, device: simulation_key(SEED, device).public_key())


def _instruction(kind: str, node: int = 5) -> Message:
    meta = Metadata(
        run_id=1,
        message_id="m",
        src_node_id=1,
        dst_node_id=node,
        reply_to_message_id="",
        group_id=str(ROUND),
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(RecordDict(), metadata=meta)


def _content(kind: str, device: str, round_: int = ROUND) -> RecordDict:
    metrics: dict[str, int | float] = {wire.ROUND: round_, wire.HELD_VERSION: VERSION, wire.NUM_TOKENS: 40}
    content = RecordDict({wire.DEVICE: ConfigRecord({wire.DEVICE_ID: device})})
    if kind == "train":
        metrics.update({wire.NUM_EXAMPLES: 4, wire.TRAIN_LOSS: 2.0})
        delta = {B: torch.from_numpy(np.random.default_rng(0).normal(0, 0.01, SHAPES[B]).astype(np.float32))}
        content[wire.DELTA] = ArrayRecord({k: Array(v) for k, v in encode(delta, "1bit").items()})
    else:
        metrics[wire.EVAL_LOSS] = 1.5
    content[wire.METRICS] = MetricRecord(metrics)
    return content


def _signed(kind: str, device: str = "sim-0", key_of: str | None = None, run: str = RUN, round_: int = ROUND):
    content = _content(kind, device, round_)
    digest = content_digest(kind, run, device, content)
    content[wire.DEVICE][wire.SIGNATURE] = sign(simulation_key(SEED, key_of or device), digest)
    return content


def _train(content: RecordDict, node: int = 5) -> TrainReply | Rejection:
    msg = Message(content, reply_to=_instruction("train", node))
    return validate_train(msg, ROUND, SHAPES, "1bit", 8, VERSION, 1.0, VERIFIER)


def test_a_signed_reply_is_accepted_and_an_unsigned_one_rejected() -> None:
    assert isinstance(_train(_signed("train")), TrainReply)
    unsigned = _train(_content("train", "sim-0"))
    assert isinstance(unsigned, Rejection) and unsigned.reason == "bad signature: the reply is not signed"
    msg = Message(_signed("evaluate"), reply_to=_instruction("evaluate"))
    assert not isinstance(validate_eval(msg, ROUND, VERSION, VERIFIER), Rejection)


def test_a_flipped_byte_anywhere_is_rejected() -> None:
    original = _signed("train")
    flips = 0
    for key in original[wire.DELTA]:
        data = original[wire.DELTA][key].data
        for pos in range(len(data)):  # every byte of every array, npy header included
            content = _signed("train")
            array = content[wire.DELTA][key]
            flipped = data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1 :]
            content[wire.DELTA][key] = Array(array.dtype, array.shape, array.stype, flipped)
            result = _train(content)
            assert isinstance(result, Rejection) and result.reason.startswith("bad signature"), (key, pos)
            flips += 1
    for metric in (wire.NUM_EXAMPLES, wire.TRAIN_LOSS, wire.NUM_TOKENS, wire.HELD_VERSION):
        content = _signed("train")
        value = content[wire.METRICS][metric]
        content[wire.METRICS][metric] = value + 1 if isinstance(value, int) else value * (1 + 2**-40)
        result = _train(content)
        assert isinstance(result, Rejection) and result.reason.startswith("bad signature"), metric
    content = _signed("train")
    signature = content[wire.DEVICE][wire.SIGNATURE]
    content[wire.DEVICE][wire.SIGNATURE] = bytes([signature[0] ^ 0x80]) + signature[1:]
    assert isinstance(_train(content), Rejection)
    assert flips > 20


def test_a_spoofed_device_id_is_rejected() -> None:
    # Node 9 says it is sim-0 but holds only sim-1's key.
    result = _train(_signed("train", device="sim-0", key_of="sim-1"), node=9)
    assert isinstance(result, Rejection) and "not signed with the key of device 'sim-0'" in result.reason


def test_a_second_node_claiming_a_device_id_is_rejected_while_the_first_is_connected() -> None:
    class Grid:
        nodes = [5, 9]

        def get_node_ids(self) -> list[int]:
            return list(self.nodes)

    grid = Grid()
    ids = Identities(grid)
    assert isinstance(ids.check(_train(_signed("train"), node=5)), TrainReply)
    clash = ids.check(_train(_signed("train"), node=9))  # a valid signature, replayed from another node
    assert isinstance(clash, Rejection) and clash.reason == "device id 'sim-0' is held by node 5; node 9 claims it too"
    assert isinstance(ids.check(_train(_signed("train"), node=5)), TrainReply)  # the holder goes on
    grid.nodes = [9]  # node 5 gone: the device reconnected as node 9
    assert isinstance(ids.check(_train(_signed("train"), node=9)), TrainReply)


def test_a_reply_replayed_from_an_earlier_round_or_another_run_is_rejected() -> None:
    earlier = _signed("train", round_=ROUND - 1)
    as_is = _train(earlier)
    assert isinstance(as_is, Rejection) and as_is.reason == f"reply is for round {ROUND - 1}, not {ROUND}"
    earlier[wire.METRICS][wire.ROUND] = ROUND  # relabelled for this round: the signature no longer fits
    relabelled = _train(earlier)
    assert isinstance(relabelled, Rejection) and relabelled.reason.startswith("bad signature")
    other_run = _train(_signed("train", run=run_tag('{"seed": 12}')))
    assert isinstance(other_run, Rejection) and other_run.reason.startswith("bad signature")


def test_an_evaluate_signature_does_not_pass_for_a_train_reply() -> None:
    content = _content("train", "sim-0")
    content[wire.DEVICE][wire.SIGNATURE] = sign(
        simulation_key(SEED, "sim-0"), content_digest("evaluate", RUN, "sim-0", content)
    )
    assert isinstance(_train(content), Rejection)


@pytest.mark.parametrize("device", ["sim-0", "sim-1", "phone 7"])
def test_simulation_keys_are_per_device_and_repeatable(device: str) -> None:
    a, b = simulation_key(SEED, device), simulation_key(SEED, device)
    assert a.private_bytes_raw() == b.private_bytes_raw()
    assert a.private_bytes_raw() != simulation_key(SEED, device + "x").private_bytes_raw()
    assert a.private_bytes_raw() != simulation_key(SEED + 1, device).private_bytes_raw()


def test_real_device_signs_with_its_registered_key_and_the_server_checks_the_superlink_copy(tmp_path) -> None:
    """The OpenSSH EC key of ``edgetune device key`` signs; the server verifies with the PEM the
    SuperLink registered for the sending node (Flower's ``public_key_to_bytes``)."""
    from types import SimpleNamespace

    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    from edgetune.config import RunConfig
    from edgetune.devicekeys import generate_device_key
    from edgetune.server.identity import make_verifier
    from edgetune.signing import load_signing_key

    private, _ = generate_device_key(tmp_path, "phone")
    other, _ = generate_device_key(tmp_path, "other")
    key = load_signing_key(str(private))
    registered = {
        5: public_key_to_bytes(key.public_key()),
        9: public_key_to_bytes(load_signing_key(str(other)).public_key()),
    }

    class Grid:
        def get_nodes(self) -> list[SimpleNamespace]:
            return [SimpleNamespace(node_id=n, public_key=pem) for n, pem in registered.items()]

    config_json = '{"seed": 11}'
    verifier = make_verifier(Grid(), RunConfig(), config_json, simulated=False)
    assert verifier is not None
    content = _content("train", "phone-1")
    content[wire.DEVICE][wire.SIGNATURE] = sign(key, content_digest("train", run_tag(config_json), "phone-1", content))
    ok = validate_train(
        Message(content, reply_to=_instruction("train", 5)), ROUND, SHAPES, "1bit", 8, VERSION, 1.0, verifier
    )
    assert isinstance(ok, TrainReply)
    # The same signed reply from node 9 (another registered key) does not verify.
    moved = validate_train(
        Message(content, reply_to=_instruction("train", 9)), ROUND, SHAPES, "1bit", 8, VERSION, 1.0, verifier
    )
    assert isinstance(moved, Rejection) and moved.reason.startswith("bad signature")
    # A node the SuperLink never registered has no key to check against.
    unknown = validate_train(
        Message(content, reply_to=_instruction("train", 7)), ROUND, SHAPES, "1bit", 8, VERSION, 1.0, verifier
    )
    assert isinstance(unknown, Rejection) and "no key known" in unknown.reason


def test_without_registered_keys_replies_are_not_checked(caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    from edgetune.config import RunConfig
    from edgetune.server.identity import make_verifier

    class Grid:
        def get_nodes(self) -> list[SimpleNamespace]:
            return [SimpleNamespace(node_id=5, public_key=b"")]

    assert make_verifier(Grid(), RunConfig(), "{}", simulated=False) is None
    assert "not signature-checked" in caplog.text
