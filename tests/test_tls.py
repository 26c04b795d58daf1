"""Unit tests for the deployment's security material and command lines (no processes started).

TLS certificates (server/tls.py), device keys (edgetune/devicekeys.py), the SuperLink and
SuperNode command lines, the per-run device state folder, and the server's log reading.
"""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from edgetune.client.supernode import JoinOptions, node_config, run_state_dir, supernode_command
from edgetune.config import FederationConfig, RunConfig
from edgetune.devicekeys import (
    DeviceKeyError,
    check_private_key,
    fingerprint,
    generate_device_key,
    load_public_key,
    public_key_files,
    public_key_pem,
)
from edgetune.server.superlink import ServerOptions, describe_line, superlink_command
from edgetune.server.tls import certificate_hosts, ensure_certificates, user_certificates


def test_certificates_cover_default_and_given_hosts(tmp_path: Path) -> None:
    files = ensure_certificates(tmp_path, ["edge.example", "10.1.2.3"])
    assert files.created
    assert certificate_hosts(files.server_cert) == {"localhost", "127.0.0.1", "::1", "edge.example", "10.1.2.3"}
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    assert server.issuer == ca.subject
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (tmp_path / "ca.key", files.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_certificates_are_reused_and_reissued_only_for_new_hosts(tmp_path: Path) -> None:
    first = ensure_certificates(tmp_path, ["a.example"])
    ca_bytes, cert_bytes = first.ca_cert.read_bytes(), first.server_cert.read_bytes()
    again = ensure_certificates(tmp_path, ["a.example"])
    assert not again.created and again.server_cert.read_bytes() == cert_bytes
    wider = ensure_certificates(tmp_path, ["b.example"])
    assert wider.created
    assert wider.ca_cert.read_bytes() == ca_bytes  # devices keep trusting the same CA
    assert "b.example" in certificate_hosts(wider.server_cert)


def test_empty_host_and_missing_user_certificates_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty host"):
        ensure_certificates(tmp_path, [" "])
    with pytest.raises(FileNotFoundError, match="--cert"):
        user_certificates(__file__, str(tmp_path / "nope.pem"), __file__)


def test_device_key_round_trip(tmp_path: Path) -> None:
    private, public = generate_device_key(tmp_path, "phone1")
    assert private.name == "phone1.key" and public.name == "phone1.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    check_private_key(private)
    key = load_public_key(public)
    assert isinstance(key.curve, ec.SECP384R1)
    assert public_key_pem(key).startswith(b"-----BEGIN PUBLIC KEY-----")
    assert len(fingerprint(key)) == 16
    with pytest.raises(FileExistsError, match="phone1"):
        generate_device_key(tmp_path, "phone1")


def test_key_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key\n")
    with pytest.raises(DeviceKeyError, match="bad.pub"):
        load_public_key(bad)
    with pytest.raises(DeviceKeyError, match="no such private key"):
        check_private_key(tmp_path / "missing.key")
    with pytest.raises(DeviceKeyError, match="no such file or folder"):
        public_key_files([str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeviceKeyError, match=r"no \*\.pub files"):
        public_key_files([str(tmp_path / "empty")])


def test_public_key_files_expand_folders(tmp_path: Path) -> None:
    _, a = generate_device_key(tmp_path / "keys", "a")
    _, b = generate_device_key(tmp_path / "keys", "b")
    assert public_key_files([str(tmp_path / "keys"), str(a)]) == [a, b]


def test_superlink_command_has_tls_auth_and_database(tmp_path: Path) -> None:
    tls = ensure_certificates(tmp_path / "tls")
    cmd = superlink_command(ServerOptions(tmp_path, "0.0.0.0:9092", "127.0.0.1:9093", tls))
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--ssl-ca-certfile") + 1] == str(tls.ca_cert.resolve())
    assert cmd[cmd.index("--database") + 1] == str((tmp_path / "superlink.db").resolve())
    assert cmd[cmd.index("--host") + 1 : cmd.index("--host") + 4] == ["127.0.0.1", "--port", "9093"]
    plain = superlink_command(ServerOptions(tmp_path, tls=None))
    assert "--insecure" in plain and "--enable-supernode-auth" not in plain
    with pytest.raises(ValueError, match="--control"):
        superlink_command(ServerOptions(tmp_path, control_address="nohost"))


def test_supernode_command_and_node_config(tmp_path: Path) -> None:
    opts = JoinOptions(
        "srv:9092",
        tmp_path / "my data.jsonl",
        tmp_path / "st",
        "phone 1",
        tmp_path / "k.key",
        tmp_path / "ca.pem",
        9999,
    )
    cfg = node_config(opts)
    assert "train-engine" not in cfg  # the run's train.engine decides
    assert "train-engine='onnxruntime'" in node_config(dataclasses.replace(opts, train_engine="onnxruntime"))
    assert f"data-path='{(tmp_path / 'my data.jsonl').resolve()}'" in cfg
    assert "device-id='phone 1'" in cfg
    from flwr.common.config import parse_config_args

    parsed = parse_config_args([cfg])
    assert parsed["data-path"] == str((tmp_path / "my data.jsonl").resolve()) and parsed["device-id"] == "phone 1"
    cmd = supernode_command(opts)
    assert "--auth-supernode-private-key" in cmd and "--insecure" not in cmd and cmd[cmd.index("--port") + 1] == "9999"
    plain = supernode_command(dataclasses.replace(opts, ca_cert=None, private_key=None))
    assert "--insecure" in plain and "--root-certificates" not in plain


def test_run_state_dir_is_stable_across_resume_settings(tmp_path: Path) -> None:
    cfg = RunConfig(run_dir="/runs/a")
    more_rounds = dataclasses.replace(cfg, federation=FederationConfig(rounds=9, reply_timeout=5.0))
    assert run_state_dir(tmp_path, cfg) == run_state_dir(tmp_path, more_rounds)
    assert run_state_dir(tmp_path, cfg).parent == tmp_path / "runs"
    assert run_state_dir(tmp_path, cfg) != run_state_dir(tmp_path, dataclasses.replace(cfg, seed=1))
    assert run_state_dir(tmp_path, cfg) != run_state_dir(tmp_path, dataclasses.replace(cfg, run_dir="/runs/b"))


def test_server_log_lines_for_people(tmp_path: Path) -> None:
    _, public = generate_device_key(tmp_path, "rogue")
    key = load_public_key(public)
    pem = repr(public_key_pem(key))  # Flower logs the key as a bytes repr, newlines escaped
    refused = (
        f"ERROR: [ActivateNode] Attempted to register SuperNode with public key: {pem}, "
        "exception: No SuperNode found with the given public key."
    )
    assert f"fingerprint {fingerprint(key)}" in (describe_line(refused) or "")
    assert describe_line("INFO : [Fleet.ActivateNode] Activated node_id=42") == "device connected (node 42)"
    assert describe_line("INFO : ControlServicer.ListNodes") is None
    # A stopped run's ServerApp calling in once more is expected: the log file keeps it, the console does not.
    stopped = "ERROR :     [/v1/runtime/get-nodes][ApiError:1008] Runtime task-token authentication failed."
    assert describe_line(stopped) is None
    assert describe_line("ERROR :     the database is locked") == "ERROR :     the database is locked"
