"""What a key holder does with an encrypted model: decrypt it, save it, load it.

The server of an HE run only ever holds the encrypted global model (``Result.arrays``
of ``HEFedAvg.start``/``HEDPFedAvg.start``). It can save it with
:func:`save_encrypted_arrays`; a party holding the clients' secret context decrypts it
with :func:`decrypt_arrays` (or ``lepton-flwr decrypt`` on the command line) into plain
tensors, e.g. ``decrypt_arrays(arrays, "secret.ctx").to_torch_state_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.common.logger import log

from lepton_flwr.he.codec import (
    CiphertextError,
    CkksEncoder,
    TensorSpec,
    manifest_of,
    unflatten,
)
from lepton_flwr.he.keys import fingerprint, load_context
from lepton_flwr.he.records import EncryptedModel, is_encrypted, load_encrypted, save_encrypted

# Decryption is exact to about 1e-15 per summed value at the default parameters, and the
# flooding noise is below 1e-4 (12 σ_f = 8e-4); a wrapped value is off by about
# Q / (2 Δ) = 2^21. Values may pass their bound by this much.
BOUND_SLACK = 1e-3


class ModelOutOfBoundError(CiphertextError):
    """A decrypted model that is not finite or passes the bound its encrypted sum allows."""


@lru_cache(maxsize=4)
def _encoder(
    path: str, mtime_ns: int, workers: int | None, seeded: bool
) -> tuple[CkksEncoder, str]:
    context = load_context(path, expect_secret=True)
    return CkksEncoder(context, workers=workers, seeded=seeded), fingerprint(context)


def encoder_for(
    path: str | Path, workers: int | None = None, seeded: bool = True
) -> tuple[CkksEncoder, str]:
    """The codec and key fingerprint of a secret context file (cached per process).

    Raises
    ------
    FileNotFoundError
        If there is no such file, saying where it was looked for.
    """
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        hint = (
            f" (a relative path, resolved against this process's folder {Path.cwd()}: "
            f"give an absolute path)"
            if not Path(path).expanduser().is_absolute()
            else ""
        )
        raise FileNotFoundError(
            f"CKKS secret context not found: {resolved}{hint}. Create keys with "
            f"`lepton-flwr keygen --out <folder>` and give clients its secret.ctx."
        )
    return _encoder(str(resolved), resolved.stat().st_mtime_ns, workers, seeded)


def decrypt_model(
    record: ArrayRecord,
    encoder: CkksEncoder,
    own_fingerprint: str,
    like: ArrayRecord | list[TensorSpec] | None = None,
) -> ArrayRecord:
    """Decrypt an encrypted global model (weighted sum + total weight) for release.

    The result is flooded with noise and rounded (:func:`lepton_flwr.he.publish.publishable`)
    and checked against the bound of its sum (:func:`check_bound`).

    Parameters
    ----------
    record : ArrayRecord
        The encrypted model.
    encoder : CkksEncoder
        The key holder's codec.
    own_fingerprint : str
        Its key's fingerprint; a model under another key is refused.
    like : ArrayRecord | list[TensorSpec] | None
        The key holder's own model (or its manifest): tensor names, shapes and dtypes
        are taken from it, not from the header (which the server writes); None trusts
        the header's.

    Raises
    ------
    CiphertextError
        For another key, a model that is not the size of ``like``, or (as
        :class:`ModelOutOfBoundError`) values past the sum's bound.
    """
    model = EncryptedModel.from_record(record)
    if model.fingerprint != own_fingerprint:
        raise CiphertextError(
            f"the global model is encrypted under key {model.fingerprint}, this client holds "
            f"key {own_fingerprint}: the server and clients use different key pairs"
        )
    manifest = model.manifest
    if like is not None:
        manifest = manifest_of(like) if isinstance(like, ArrayRecord) else list(like)
        own_size = sum(spec.size for spec in manifest)
        if own_size != model.num_values:
            raise CiphertextError(
                f"the encrypted model holds {model.num_values} values, the key holder's own "
                f"model {own_size}"
            )
    vector = encoder.decrypt(model.chunks, model.num_values, model.weight)
    check_bound(vector, model)
    return ArrayRecord({k: Array(v) for k, v in unflatten(vector, manifest).items()})


def check_bound(vector: np.ndarray, model: EncryptedModel) -> None:
    """The wrap detector: decrypted values must be finite and within the sum's bound.

    The header's ``max_abs`` is the server's bound on the summed values (the sum of
    public bounds that each added upload's header was checked against), so an honest
    sum decrypts within ``max_abs / weight``. CKKS wraps a value that passes its
    headroom around silently, and an upload under another key, or past its bound,
    decrypts to values far outside it.

    Raises
    ------
    ModelOutOfBoundError
        Naming the largest value and the bound.
    """
    if not np.isfinite(vector).all():
        raise ModelOutOfBoundError("the decrypted values are not all finite")
    limit = (model.max_abs + BOUND_SLACK) / model.weight
    largest = float(np.abs(vector).max(initial=0.0))
    if largest > limit:
        raise ModelOutOfBoundError(
            f"a decrypted value reaches {largest:.3g}, beyond the bound {limit:.3g} that its "
            f"encrypted sum allows: the sum wrapped around (CKKS overflow) or an upload was "
            f"encrypted dishonestly"
        )


def decrypt_arrays(
    arrays: ArrayRecord | str | Path,
    secret_context: str | Path,
    like: ArrayRecord | None = None,
) -> ArrayRecord:
    """Decrypt an encrypted model (a record, or a file from :func:`save_encrypted_arrays`).

    The values are flooded with noise and rounded before they are returned
    (:mod:`lepton_flwr.he.publish`): an exact CKKS decryption, published, would reveal
    the secret key.

    Parameters
    ----------
    arrays : ArrayRecord | str | Path
        ``Result.arrays`` of an HE strategy, or the path of a saved encrypted model.
    secret_context : str | Path
        The clients' secret context (``secret.ctx`` of ``lepton-flwr keygen``).
    like : ArrayRecord | None
        The key holder's own model (e.g. ``ArrayRecord(model.state_dict())``): names,
        shapes and dtypes come from it rather than from the file's header.

    Returns
    -------
    ArrayRecord
        The plaintext tensors (``.to_torch_state_dict()`` for a torch model).
    """
    if not isinstance(arrays, ArrayRecord):
        arrays = load_encrypted_arrays(arrays)
    encoder, own = encoder_for(secret_context, workers=1)
    return decrypt_model(arrays, encoder, own, like)


def keyholder_evaluate_fn(
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None],
    secret_context: str | Path,
    like: ArrayRecord | None = None,
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """An ``evaluate_fn`` for a ServerApp that also plays a key holder: decrypt, then evaluate.

    Our strategies skip a server-side ``evaluate_fn`` on encrypted models; one made by
    this function is called, and decrypts first (flooded, as every decryption: see
    :func:`decrypt_arrays`; ``like`` as there). Only for a server that may hold the
    secret key (a simulation where every party is one machine, or an evaluator the
    clients trust); in a deployment that server could decrypt every upload. A model that
    clients would refuse (:class:`ModelOutOfBoundError`: one upload past its bound) is
    not tested, and the run goes on: one dishonest upload must not end it.
    """

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if is_encrypted(arrays):
            try:
                arrays = decrypt_arrays(arrays, secret_context, like)
            except ModelOutOfBoundError as err:
                log(WARNING, "key holder: round %d's model not tested: %s", server_round, err)
                return None
        return evaluate_fn(server_round, arrays)

    evaluate.decrypts = True
    return evaluate


def save_encrypted_arrays(arrays: ArrayRecord, path: str | Path) -> Path:
    """Write an encrypted model (e.g. ``Result.arrays``) to a zip file; no key needed."""
    return save_encrypted(EncryptedModel.from_record(arrays), path)


def load_encrypted_arrays(path: str | Path) -> ArrayRecord:
    """Read a file written by :func:`save_encrypted_arrays` back into a record."""
    return load_encrypted(path).to_record()
