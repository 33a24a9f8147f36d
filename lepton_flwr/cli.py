"""Command line: ``lepton-flwr keygen`` and ``lepton-flwr decrypt``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


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


def decrypt(secret_context: Path, model: Path, out: Path, like: Path | None = None) -> None:
    """Decrypt a saved encrypted global model into a torch state dict file.

    The values are flooded with noise and rounded (``lepton_flwr.he.publish``); with
    ``like`` (a torch state dict of the key holder's own model) names, shapes and dtypes
    come from it rather than from the file.
    """
    from flwr.app import ArrayRecord

    from lepton_flwr.he import decrypt_arrays

    own = ArrayRecord(torch.load(like, weights_only=True)) if like is not None else None
    state = decrypt_arrays(model, secret_context, own).to_torch_state_dict()
    torch.save(state, out)
    print(
        f"decrypted {sum(t.numel() for t in state.values())} values -> {out} (flooded with "
        f"noise and rounded so that publishing them keeps the key safe)"
    )


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
    args = parser.parse_args(argv)
    try:
        if args.command == "keygen":
            keygen(args.out, args.overrides)
        else:
            decrypt(args.secret_context, args.model, args.out, args.like)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"lepton-flwr {args.command}: {err}")


if __name__ == "__main__":
    main()
