"""CKKS key material: the clients' secret context, the server's public one, fingerprints."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from functools import cache, lru_cache
from multiprocessing.util import Finalize
from pathlib import Path

import tenseal as ts

from lepton_flwr.files import write_atomically
from lepton_flwr.he.params import CKKSParams

SECRET_CONTEXT_FILE = "secret.ctx"
PUBLIC_CONTEXT_FILE = "public.ctx"


def scratch_base() -> str:
    """Where SEAL's scratch files are made: ``/dev/shm`` (RAM) if writable, else the temp dir."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def scratch_dir() -> Path:
    """A per-process folder in :func:`scratch_base` for SEAL's *named* scratch files.

    Made on first use: only where anonymous files cannot be made
    (:mod:`lepton_flwr.he.seal_words`), so that on Linux a process leaves nothing behind
    however it ends.
    """
    return Path(_scratch(scratch_base(), os.getpid()))  # forked workers get folders of their own


@cache
def _scratch(base: str, pid: int) -> str:
    path = tempfile.mkdtemp(prefix=f"lepton-he-{pid}-", dir=base)
    # Removed when this process exits normally (multiprocessing's finalizers run at exit
    # in the main process and in forked workers, each only for its own folder).
    Finalize(None, shutil.rmtree, args=(path,), kwargs={"ignore_errors": True}, exitpriority=0)
    return path


def create_secret_context(params: CKKSParams) -> ts.Context:
    """Generate fresh keys: a TenSEAL CKKS context that holds the secret key."""
    params.validate()
    context = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
    )
    context.global_scale = 2.0**params.scale_bits
    return context


def public_context_bytes(context: ts.Context) -> bytes:
    """Serialize a context without its secret key (nor relin/Galois keys: sums need none)."""
    return context.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )


def secret_context_bytes(context: ts.Context) -> bytes:
    """Serialize a context with its secret key (for clients only)."""
    if not context.has_secret_key():
        raise ValueError("This context holds no secret key.")
    return context.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )


def fingerprint(context: ts.Context) -> str:
    """Key fingerprint: SHA-256 of the public key, the same for secret and public contexts."""
    from lepton_flwr.he.seal_words import save_bytes  # it imports scratch_dir from here

    return hashlib.sha256(save_bytes(context.public_key().data)).hexdigest()[:16]


def write_keys(params: CKKSParams, folder: str | Path) -> tuple[Path, Path]:
    """Generate keys; write ``secret.ctx`` (mode 600, for clients) and ``public.ctx`` (server).

    Both are written atomically; existing files (or symlinks) at those paths are replaced.

    Returns
    -------
    tuple[Path, Path]
        The secret and the public context paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    context = create_secret_context(params)
    secret, public = folder / SECRET_CONTEXT_FILE, folder / PUBLIC_CONTEXT_FILE
    write_atomically(secret, secret_context_bytes(context), 0o600)
    write_atomically(public, public_context_bytes(context), 0o644)
    return secret, public


@lru_cache(maxsize=4)
def _load_context(path: str, mtime_ns: int) -> ts.Context:
    return ts.context_from(Path(path).read_bytes())


def load_context(path: str | Path, *, expect_secret: bool) -> ts.Context:
    """Load a context file (cached per process), checking that it is the kind expected.

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    ValueError
        If a secret context is expected and the file has no secret key, or the other
        way round (a server must never load a secret key).
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"CKKS context file not found: {path}")
    context = _load_context(str(path), path.stat().st_mtime_ns)
    if expect_secret and not context.has_secret_key():
        raise ValueError(f"{path} holds no secret key; clients need the secret context.")
    if not expect_secret and context.has_secret_key():
        raise ValueError(
            f"{path} holds a secret key; the server must get the public context only "
            f"(the {PUBLIC_CONTEXT_FILE} that keygen writes)."
        )
    return context
