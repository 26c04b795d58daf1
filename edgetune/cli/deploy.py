"""``edgetune server`` / ``edgetune device`` / ``edgetune run``: the federation on real devices over gRPC.

edgetune server --host my-server.lan --allow-device keys/        the SuperLink (TLS, device keys)
edgetune device keygen --out keys --name phone1                  a device key pair
edgetune device join --server my-server.lan:9092 --data chats.jsonl --storage state \\
    --key keys/phone1.key --ca ca.pem                            a device joins
edgetune run --devices 2 --rounds 3 --run-dir runs/devices       submit a run and follow it

See docs/devices.md for the whole walk-through (two machines, or one with 127.0.0.1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgetune import wire
from edgetune.cli.simulate import SIMULATE_FLAGS
from edgetune.config import ENGINES, ConfigError, RunConfig, from_flat, parse_overrides, to_flat

__all__ = ["register"]

DEFAULT_STATE = Path("~/.edgetune/server")
DEFAULT_CONTROL = "127.0.0.1:9093"

# edgetune run flag -> (flat config key, metavar, help): simulate's flags that make sense for real devices
_RUN_FLAGS = {
    **{flag: SIMULATE_FLAGS[flag] for flag in ("base", "rounds", "per_round", "codec", "steps", "seed")},
    "devices": ("federation.num-devices", "N", "devices the server waits for before round 1"),
}

_PLAINTEXT_WARNING = (
    "WARNING: --insecure-plaintext: no TLS. Adapters, metrics and the run config cross the network "
    "unencrypted and unauthenticated, and devices cannot be authenticated (Flower needs TLS for that). "
    "Use only on a network you trust completely."
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``server``, ``device`` and ``run`` to the ``edgetune`` sub-commands."""
    _register_server(sub)
    _register_device(sub)
    _register_run(sub)


# --- edgetune server -------------------------------------------------------------------------


def _register_server(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "server",
        help="run the federation server (a Flower SuperLink with TLS and device keys)",
        description="Start a Flower SuperLink for real devices, in the foreground. TLS by default: without "
        "--cert/--key/--ca-cert it makes a CA and a server certificate in STATE/tls and prints which file "
        "devices need (ca.pem). Only devices whose public keys are registered (--allow-device) may join. "
        "Ctrl-C stops it; the same command restarts it with the same certificates and device registrations.",
    )
    p.add_argument(
        "--state-dir",
        default=str(DEFAULT_STATE),
        help="server state: tls/, superlink.db, superlink.log (default: %(default)s)",
    )
    p.add_argument(
        "--listen",
        default="0.0.0.0:9092",
        metavar="HOST:PORT",
        help="where devices connect (Fleet API, default: %(default)s)",
    )
    p.add_argument(
        "--control",
        default=DEFAULT_CONTROL,
        metavar="HOST:PORT",
        help="where `edgetune run` submits runs (Control API; default: %(default)s, this machine only: a "
        "submitted run is code the server executes)",
    )
    p.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or IP address devices use to reach this server; goes into the certificate (repeatable; "
        "localhost and 127.0.0.1 are always in)",
    )
    p.add_argument(
        "--allow-device",
        action="append",
        default=[],
        metavar="KEY.pub|DIR",
        help="a device public key file, or a folder of *.pub files, to register (repeatable)",
    )
    p.add_argument("--cert", help="your own server certificate (PEM); needs --key and --ca-cert")
    p.add_argument("--key", help="your own server private key (PEM)")
    p.add_argument("--ca-cert", help="the CA certificate that signed --cert (devices get this file)")
    p.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="no TLS and no device authentication (loud warning; trusted networks only)",
    )
    p.add_argument("--verbose", action="store_true", help="print every SuperLink log line, not only devices and errors")
    p.set_defaults(handler=_cmd_server)


def _cmd_server(args: argparse.Namespace) -> int:
    from edgetune.devicekeys import DeviceKeyError, public_key_files
    from edgetune.server.superlink import ServerError, ServerOptions, serve
    from edgetune.server.tls import ensure_certificates, user_certificates

    state = Path(args.state_dir).expanduser()
    own = [args.cert, args.key, args.ca_cert]
    try:
        if args.insecure_plaintext:
            if args.allow_device or any(own):
                raise ConfigError("--insecure-plaintext cannot be combined with --allow-device or certificates")
            print(_PLAINTEXT_WARNING, file=sys.stderr)
            tls = None
        elif any(own):
            if not all(own):
                raise ConfigError("--cert, --key and --ca-cert go together")
            tls = user_certificates(args.ca_cert, args.cert, args.key)
        else:
            tls = ensure_certificates(state / wire.SERVER_TLS_DIR, args.host)
            verb = "created" if tls.created else "using"
            print(f"TLS: {verb} CA {tls.ca_cert} and server certificate {tls.server_cert}")
            print(f"     copy {tls.ca_cert} to every device (`edgetune device join --ca ca.pem`)")
        keys = tuple(public_key_files(args.allow_device))
    except (DeviceKeyError, FileNotFoundError, ValueError) as err:
        print(f"edgetune: {err}", file=sys.stderr)
        return 2
    if tls is not None and not keys:
        print("note: no --allow-device keys given; devices registered earlier (in superlink.db) may still join")
    opts = ServerOptions(state, args.listen, args.control, tls, keys, args.verbose)
    try:
        return serve(opts)
    except (ServerError, ValueError) as err:
        print(f"edgetune: {err}", file=sys.stderr)
        return 1


# --- edgetune device -------------------------------------------------------------------------


def _register_device(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "device", help="a device: make its key pair, or join a federation", description="Device-side commands."
    )
    dsub = p.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    k = dsub.add_parser(
        "keygen",
        help="make a device key pair (NAME.key stays on the device, NAME.pub goes to the server)",
        description="Make an EC P-384 key pair in OpenSSH format, the format Flower 1.39's SuperNode "
        "authentication uses. Copy NAME.pub to the server and pass it to `edgetune server --allow-device`.",
    )
    k.add_argument("--out", required=True, metavar="DIR", help="folder for NAME.key (mode 0600) and NAME.pub")
    k.add_argument("--name", default="device", help="key file name and default device id (default: %(default)s)")
    k.set_defaults(handler=_cmd_keygen)
    j = dsub.add_parser(
        "join",
        help="join a federation with this device's own data (foreground; Ctrl-C leaves)",
        description="Start a Flower SuperNode that trains on this device's own data when the server asks. "
        "Reconnects by itself when the server restarts; its state lives in --storage.",
    )
    j.add_argument(
        "--server",
        required=True,
        metavar="HOST:PORT",
        help="the server's device address (edgetune server --listen, port 9092)",
    )
    j.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help='this device\'s conversations: a JSONL file ({"messages": [...]} or {"prompt", "response"} per line)',
    )
    j.add_argument(
        "--storage",
        required=True,
        metavar="DIR",
        help="this device's storage folder (held adapter version, residual, log)",
    )
    j.add_argument("--key", metavar="NAME.key", help="this device's private key (edgetune device keygen)")
    j.add_argument(
        "--ca", metavar="CA.pem", help="the federation's CA certificate, copied from the server (STATE/tls/ca.pem)"
    )
    j.add_argument("--device-id", help="this device's name in the run's metrics (default: the key's file name)")
    j.add_argument(
        "--runtime-port",
        type=int,
        default=0,
        help="port of Flower's local per-device API on 127.0.0.1 (default: a free one)",
    )
    j.add_argument(
        "--insecure-plaintext",
        action="store_true",
        help="connect without TLS and without a key (only to a server started with --insecure-plaintext)",
    )
    j.add_argument(
        "--train-engine",
        choices=ENGINES,
        help="train this device with PyTorch or ONNX Runtime (fp32, artefacts built once in --storage); "
        "default: the run's train.engine",
    )
    j.add_argument(
        "--peer-keys",
        metavar="PATH",
        help="the registered devices' public keys (a *.pub file or a folder of them, as the server's "
        "--allow-device): in secure aggregation this device refuses a round whose roster holds a key "
        "advertisement none of them signed",
    )
    j.add_argument("--verbose", action="store_true", help="print every SuperNode log line")
    j.set_defaults(handler=_cmd_join)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from edgetune.devicekeys import fingerprint, generate_device_key, load_public_key

    try:
        private, public = generate_device_key(Path(args.out), args.name)
    except FileExistsError as err:
        print(f"edgetune: {err}", file=sys.stderr)
        return 2
    print(f"private key: {private} (keep it on this device)")
    print(f"public key:  {public} (copy to the server: edgetune server --allow-device {public.name})")
    print(f"fingerprint: {fingerprint(load_public_key(public))}")
    return 0


def _cmd_join(args: argparse.Namespace) -> int:
    from edgetune.client.supernode import JoinOptions, join
    from edgetune.devicekeys import DeviceKeyError, check_private_key, load_public_key, public_key_files

    data = Path(args.data)
    if not data.exists():
        print(f"edgetune: --data {data}: no such file or folder", file=sys.stderr)
        return 2
    key = Path(args.key) if args.key else None
    ca = Path(args.ca) if args.ca else None
    if args.insecure_plaintext:
        if key or ca:
            print("edgetune: --insecure-plaintext cannot be combined with --key or --ca", file=sys.stderr)
            return 2
        print(_PLAINTEXT_WARNING, file=sys.stderr)
    else:
        if key is None or ca is None:
            print(
                "edgetune: --key and --ca are needed (or --insecure-plaintext for a plain-text server)", file=sys.stderr
            )
            return 2
        try:
            check_private_key(key)
        except DeviceKeyError as err:
            print(f"edgetune: --key {err}", file=sys.stderr)
            return 2
        if not ca.is_file():
            print(f"edgetune: --ca {ca}: no such file (copy STATE/tls/ca.pem from the server)", file=sys.stderr)
            return 2
    peer_keys = Path(args.peer_keys) if args.peer_keys else None
    if peer_keys is not None:
        try:
            for pub in public_key_files([str(peer_keys)]):
                load_public_key(pub)
        except DeviceKeyError as err:
            print(f"edgetune: --peer-keys {err}", file=sys.stderr)
            return 2
    device_id = args.device_id or (key.name.removesuffix(wire.DEVICE_PRIVATE_KEY_SUFFIX) if key else "device")
    opts = JoinOptions(
        args.server,
        data,
        Path(args.storage),
        device_id,
        key,
        ca,
        runtime_port=args.runtime_port,
        train_engine=args.train_engine or "",
        peer_keys=peer_keys,
        verbose=args.verbose,
    )
    return join(opts)


# --- edgetune run ----------------------------------------------------------------------------


def _register_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="submit a federated run to `edgetune server` and follow it to the end",
        description="Build the app bundle with the whole run config, submit it to the server's Control API, and "
        "print one line per round (held-out loss, bytes up/down, replies) from the run folder. Exits 0 only if "
        "the run completed. If the server restarts mid-run, the run is submitted again and resumes from its last "
        "completed round; Ctrl-C stops the run within 10 s, marks its run folder interrupted "
        "and exits 130 (the same command continues it).",
    )
    defaults = to_flat(RunConfig())
    p.add_argument(
        "--server",
        default=DEFAULT_CONTROL,
        metavar="HOST:PORT",
        help="the server's Control API (edgetune server --control; default: %(default)s)",
    )
    p.add_argument("--ca", metavar="CA.pem", help=f"the server's CA certificate (default: {DEFAULT_STATE}/tls/ca.pem)")
    p.add_argument("--insecure-plaintext", action="store_true", help="the server runs without TLS")
    p.add_argument(
        "--run-dir",
        default="runs/devices",
        metavar="DIR",
        help="run folder on the server machine (made absolute; default: %(default)s)",
    )
    for flag, (key, metavar, text) in _RUN_FLAGS.items():
        p.add_argument(
            f"--{flag.replace('_', '-')}", dest=flag, metavar=metavar, help=f"{text} (default: {defaults[key]})"
        )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. train.local-steps=4 (repeatable)",
    )
    p.add_argument(
        "--server-wait",
        type=float,
        default=900.0,
        metavar="S",
        help="how long to wait for a server that went away (default: %(default)s)",
    )
    p.set_defaults(handler=_cmd_run)


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run config from ``edgetune run``'s flags; the run folder made absolute."""
    flat: dict[str, object] = {"run-dir": str(Path(args.run_dir).expanduser().resolve())}
    for flag, (key, *_) in _RUN_FLAGS.items():
        if getattr(args, flag) is not None:
            flat[key] = getattr(args, flag)
    flat.update(parse_overrides(args.set))
    # The ServerApp runs in a process Flower starts elsewhere: only an absolute path means what the user meant.
    flat["run-dir"] = str(Path(str(flat["run-dir"])).expanduser().resolve())
    return from_flat(flat)


def _round_line(row: dict) -> str:
    loss = "-" if row.get("eval_loss") is None else f"{row['eval_loss']:.4f}"
    return (
        f"round {row['round']}: held-out loss {loss}, bytes up {row.get('bytes_up', 0):,} down "
        f"{row.get('bytes_down', 0):,}, replies {row.get('replies', 0)}, "
        f"devices {', '.join(sorted(row.get('per_device', {})))}"
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from edgetune.models import ModelError, resolve_base
    from edgetune.processes import EXIT_INTERRUPTED
    from edgetune.server.checkpoint import footprint
    from edgetune.server.metrics import plot_run, read_metrics, summary_table, time_table
    from edgetune.server.submit import FollowOptions, submit_and_follow

    cfg = run_config(args)
    try:  # the server would find out only after the run started
        resolve_base(cfg.model.base)
    except ModelError as err:
        print(f"edgetune: --base {cfg.model.base}: {err}", file=sys.stderr)
        return 2
    ca = None
    if not args.insecure_plaintext:
        ca = Path(args.ca).expanduser() if args.ca else (DEFAULT_STATE / wire.SERVER_TLS_DIR / "ca.pem").expanduser()
        if not ca.is_file():
            print(f"edgetune: --ca {ca}: no such file", file=sys.stderr)
            return 2
    f = cfg.federation
    print(
        f"edgetune run: {f.num_devices} devices, {f.rounds} rounds, base={cfg.model.base}, codec={f.codec}, "
        f"run folder {cfg.run_dir}",
        flush=True,
    )
    opts = FollowOptions(args.server, ca, server_wait=args.server_wait)
    try:
        outcome = submit_and_follow(cfg, opts, lambda row: print(_round_line(row), flush=True))
    except Exception as err:  # noqa: BLE001 - the Control API's errors reach the user as one line
        print(f"edgetune: could not submit to {args.server}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    if outcome.status == "interrupted":
        print(
            f"edgetune: interrupted; round {outcome.last_round} is the last completed; "
            "continue with the same `edgetune run` command",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if not outcome.ok:
        print(f"edgetune: run {outcome.status}: {outcome.detail}", file=sys.stderr)
        return 1
    run_dir = Path(cfg.run_dir)
    rows = read_metrics(run_dir)
    print(summary_table(rows))
    print(time_table(rows))
    print(footprint(run_dir))
    plots = plot_run(run_dir)
    print(f"adapter: {run_dir / wire.ADAPTER_DIR}; plots: " + ", ".join(str(p) for p in plots))
    return 0
