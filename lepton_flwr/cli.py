"""Command line: ``lepton-flwr keygen``, ``decrypt``, ``certs``, ``node-key``, and more.

``check-node`` checks a SuperNode's settings; ``superlink`` and ``supernode`` check, then
start Flower's own (``lepton_flwr.launch``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from lepton_flwr.launch import (
    SUPERLINK_PORT,
    SUPERNODE_PORT,
    prepare_superlink,
    prepare_supernode,
)


def keygen(out: Path, overrides: list[str]) -> None:
    """Write secret.ctx (clients) and public.ctx (server) for the config's CKKS parameters."""
    from lepton_flwr.config import load_config
    from lepton_flwr.he import CKKSParams, fingerprint, load_context, write_keys

    cfg = load_config(["he=ckks", *overrides])
    secret, public = write_keys(CKKSParams.from_config(cfg["he"]), out)
    key = fingerprint(load_context(public, expect_secret=False))
    print(f"key {key}\n  clients (secret, keep private): {secret}\n  server (public):  {public}")
    print(
        "Deployment: SuperNodes get --node-config 'he-secret-context=<secret.ctx path>'; "
        "the run gets he.public_context_path=<public.ctx path> in hydra-overrides."
    )


def decrypt(
    secret_context: Path,
    model: Path,
    out: Path,
    like: Path | None = None,
    count_in: Path | None = None,
) -> None:
    """Decrypt a saved encrypted global model into a torch state dict file.

    The values are flooded with noise and rounded (``lepton_flwr.he.publish``); with
    ``like`` (a torch state dict of the key holder's own model) names, shapes and dtypes
    come from it rather than from the file. Each decryption is counted under the key in
    ``count_in`` (default: the secret context's folder) and refused past the number the
    flooding is sized for (``lepton_flwr.he.ledger``).
    """
    from flwr.app import ArrayRecord

    from lepton_flwr.he import decrypt_arrays
    from lepton_flwr.he.keyholder import decryption_count_folder, encoder_for
    from lepton_flwr.he.ledger import count_file, read_count
    from lepton_flwr.he.publish import DECRYPTIONS

    own = ArrayRecord(torch.load(like, weights_only=True)) if like is not None else None
    state = decrypt_arrays(model, secret_context, own, count_in).to_torch_state_dict()
    torch.save(state, out)
    key = encoder_for(secret_context, workers=1)[1]
    ledger = count_file(decryption_count_folder(secret_context, count_in), key)
    print(
        f"decrypted {sum(t.numel() for t in state.values())} values -> {out} (flooded with "
        f"noise and rounded so that publishing them keeps the key safe; decryption "
        f"{read_count(ledger)} of {DECRYPTIONS} under key {key}, counted in {ledger})"
    )


def certs(out: Path, hosts: list[str], days: int, ca_dir: Path | None) -> None:
    """Make a CA and the SuperLink's TLS certificate (see ``lepton_flwr.deploy``)."""
    from lepton_flwr.deploy import make_certificates

    files = make_certificates(out, hosts, days, ca_dir)
    print(
        f"CA certificate (give it to every SuperNode and to the flwr CLI): {files['ca.crt']}\n"
        f"CA key (keep offline, never on the SuperLink): {files['ca.key']}\n"
        f"SuperLink certificate and key (the SuperLink only: lepton-flwr superlink {out} "
        "<state-dir>): "
        f"{files['superlink.crt']}, {files['superlink.key']}"
    )


def node_key(out: Path, name: str, force: bool) -> None:
    """Make one SuperNode's authentication key pair (see ``lepton_flwr.deploy``)."""
    from lepton_flwr.deploy import make_node_key

    private, public = make_node_key(out, name, force)
    print(
        f"SuperNode {name}: private key (this SuperNode only) {private}\n"
        f"public key (register it: flwr supernode register {public} <connection>) {public}"
    )


def check_node_command(node_config: str, root_certificates: str | None, auth_key: str | None):
    """Check a SuperNode's settings; exit with the list of problems if there are any."""
    from lepton_flwr.node_check import app_keys_note, node_config_problems

    problems = node_config_problems(node_config, root_certificates, auth_key)
    if problems:
        raise ValueError("this SuperNode's settings are wrong:\n  " + "\n  ".join(problems))
    if note := app_keys_note(node_config):
        print(note)
    print("node settings: ok")


def start(argv: list[str]) -> None:
    """Replace this process with Flower's (same process id); print the command first."""
    print("starting: " + " ".join(argv), flush=True)
    os.execvp(argv[0], argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lepton-flwr`` command."""
    parser = argparse.ArgumentParser(prog="lepton-flwr", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("keygen", help="create a CKKS key pair (secret.ctx, public.ctx)")
    gen.add_argument("--out", type=Path, required=True, help="folder for the two files")
    gen.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. he.poly_modulus_degree=8192"
    )
    dec = sub.add_parser("decrypt", help="decrypt a saved encrypted model (needs the secret key)")
    dec.add_argument("--secret-context", type=Path, required=True)
    dec.add_argument("--model", type=Path, required=True, help="model.ckks.zip of a run")
    dec.add_argument("--out", type=Path, required=True, help="torch state dict to write")
    dec.add_argument(
        "--like", type=Path, help="your own model's state dict: names, shapes, dtypes from it"
    )
    dec.add_argument(
        "--count-in",
        type=Path,
        help="folder counting your decryptions under the key (default: the secret's folder)",
    )
    tls = sub.add_parser("certs", help="make a CA and the SuperLink's TLS certificate")
    tls.add_argument(
        "--out", type=Path, required=True, help="the SuperLink's folder (ca.crt, superlink.*)"
    )
    tls.add_argument(
        "--ca-dir", type=Path, help="the CA's folder, kept offline (default: <out>-ca)"
    )
    tls.add_argument(
        "--host", action="append", required=True, help="SuperLink host name or IP (repeat)"
    )
    tls.add_argument("--days", type=int, default=365)
    node = sub.add_parser("node-key", help="make a SuperNode's authentication key pair")
    node.add_argument("--out", type=Path, required=True)
    node.add_argument("--name", required=True, help="the SuperNode's name, e.g. hospital-a")
    node.add_argument(
        "--force", action="store_true", help="replace an existing key (re-register the node)"
    )
    check = sub.add_parser("check-node", help="check a SuperNode's settings before it starts")
    check.add_argument("--node-config", required=True, help="as given to flower-supernode")
    check.add_argument("--root-certificates", help="the CA certificate for TLS")
    check.add_argument("--auth-key", help="the SuperNode's authentication private key")
    link = sub.add_parser(
        "superlink",
        help="check and start flower-superlink (TLS, SuperNode auth, a database)",
        description="Refuse a SuperLink folder holding the CA key or lacking a file, or a "
        "port in use; then run flower-superlink with TLS, --enable-supernode-auth and "
        "<state-dir>/superlink.db. ServerApps run in this command's working folder: an "
        "app's relative output paths land there. Flags after -- go to flower-superlink.",
    )
    link.add_argument("certs_dir", type=Path, help="the --out folder of lepton-flwr certs")
    link.add_argument("state_dir", type=Path, help="the SuperLink's database folder")
    link.add_argument("--port", type=int, default=SUPERLINK_PORT, help="default %(default)s")
    node_start = sub.add_parser(
        "supernode",
        help="check and start flower-supernode (TLS, its own auth key)",
        description="Run check-node, refuse a --port in use, then run flower-supernode. "
        "Each SuperNode on one host needs its own --port (Flower's default is 9094). "
        "Flags after -- go to flower-supernode.",
    )
    node_start.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT")
    node_start.add_argument(
        "--root-certificates", type=Path, required=True, help="the CA certificate (ca.crt)"
    )
    node_start.add_argument(
        "--auth-key", type=Path, required=True, help="this SuperNode's private key"
    )
    node_start.add_argument("--node-config", required=True, help="key=value ..., or a .toml")
    node_start.add_argument(
        "--port",
        type=int,
        default=SUPERNODE_PORT,
        help="this SuperNode's Runtime API port, one per SuperNode on a host (default %(default)s)",
    )
    node_start.add_argument("flower_args", nargs="*", help="after --: more flower-supernode flags")
    argv = list(sys.argv[1:] if argv is None else argv)
    flower_args = []  # after --: passed on to flower-superlink / flower-supernode
    if argv[:1] in (["superlink"], ["supernode"]) and "--" in argv:
        argv, flower_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = parser.parse_args(argv)
    try:
        if args.command == "keygen":
            keygen(args.out, args.overrides)
        elif args.command == "decrypt":
            decrypt(args.secret_context, args.model, args.out, args.like, args.count_in)
        elif args.command == "check-node":
            check_node_command(args.node_config, args.root_certificates, args.auth_key)
        elif args.command == "superlink":
            start(prepare_superlink(args.certs_dir, args.state_dir, args.port, flower_args))
        elif args.command == "supernode":
            start(
                prepare_supernode(
                    args.superlink,
                    args.root_certificates,
                    args.auth_key,
                    args.node_config,
                    args.port,
                    flower_args,
                )
            )
        elif args.command == "certs":
            certs(args.out, args.host, args.days, args.ca_dir)
        else:
            node_key(args.out, args.name, args.force)
    except (ValueError, OSError) as err:
        sys.exit(f"lepton-flwr {args.command}: {err}")


if __name__ == "__main__":
    main()
