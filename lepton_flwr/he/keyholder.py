"""What a key holder does with an encrypted model: decrypt it, save it, load it.

The server of an HE run only ever holds the encrypted global model (``Result.arrays``
of ``HEFedAvg.start``/``HEDPFedAvg.start``). It can save it with
:func:`save_encrypted_arrays`; a party holding the clients' secret context decrypts it
with :func:`decrypt_arrays` (or ``lepton-flwr decrypt`` on the command line) into plain
tensors, e.g. ``decrypt_arrays(arrays, "secret.ctx").to_torch_state_dict()``. Each such
decryption is counted under the key, beside the secret context unless another folder
is named, and refused past the ``DECRYPTIONS`` that the flooding is sized for
(:mod:`lepton_flwr.he.ledger`).
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
from lepton_flwr.he.ledger import DecryptionCountError, count_file, spend_one
from lepton_flwr.he.publish import DECRYPTIONS, TAIL, flooding_std, summed_limit
from lepton_flwr.he.records import EncryptedModel, is_encrypted, load_encrypted, save_encrypted

# Decryption is exact to about 1e-15 per summed value at the default parameters; a
# wrapped value is off by about Q / (2 Δ) = 2^21. Values may pass their bound by this
# much, plus TAIL + 1 times the flooding std (the noise, then the rounding).
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
    count: Callable[[], object] | None = None,
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
    count : Callable[[], object] | None
        Called once the model is checked, just before it is decrypted (to count the
        decryption; it raises to refuse it).

    Raises
    ------
    CiphertextError
        For another key, a model that is not the size of ``like``, a sum of more
        ciphertexts than the flooding covers (the header's ``summed``, the server's own
        count: this catches a faulty server, not a lying one), or (as
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
    drop = encoder.formats.wire.d_down if encoder.formats.kind(model.chunks) == "download" else 0
    if model.summed > summed_limit(drop):
        raise CiphertextError(
            f"the global model is a sum of {model.summed} ciphertexts: the flooding of a "
            f"decryption covers at most {summed_limit(drop)}"
        )
    if count is not None:
        count()
    vector = encoder.decrypt(model.chunks, model.num_values, model.weight)
    flooding = flooding_std(encoder.poly_modulus_degree, encoder.scale, model.num_values)
    check_bound(vector, model, flooding)
    return ArrayRecord({k: Array(v) for k, v in unflatten(vector, manifest).items()})


def check_bound(vector: np.ndarray, model: EncryptedModel, flooding: float = 0.0) -> None:
    """The wrap detector: decrypted values must be finite and within the sum's bound.

    The header's ``max_abs`` is the server's bound on the summed values (the sum of
    public bounds that each added upload's header was checked against), so an honest
    sum decrypts within ``max_abs / weight``, give or take the decryption error and the
    flooding (``flooding``: its std, in units of the summed values). CKKS wraps a value
    that passes its headroom around silently, and an upload under another key, or past
    its bound, decrypts to values far outside it.

    Raises
    ------
    ModelOutOfBoundError
        Naming the largest value and the bound.
    """
    if not np.isfinite(vector).all():
        raise ModelOutOfBoundError("the decrypted values are not all finite")
    limit = (model.max_abs + BOUND_SLACK + (TAIL + 1) * flooding) / model.weight
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
    count_in: str | Path | None = None,
) -> ArrayRecord:
    """Decrypt an encrypted model (a record, or a file from :func:`save_encrypted_arrays`).

    The values are flooded with noise and rounded before they are returned
    (:mod:`lepton_flwr.he.publish`): an exact CKKS decryption, published, would reveal
    the secret key. The flooding is sized for ``DECRYPTIONS`` decryptions under the key,
    so each one is counted first (:mod:`lepton_flwr.he.ledger`) and refused past that.

    Parameters
    ----------
    arrays : ArrayRecord | str | Path
        ``Result.arrays`` of an HE strategy, or the path of a saved encrypted model.
    secret_context : str | Path
        The clients' secret context (``secret.ctx`` of ``lepton-flwr keygen``).
    like : ArrayRecord | None
        The key holder's own model (e.g. ``ArrayRecord(model.state_dict())``): names,
        shapes and dtypes come from it rather than from the file's header.
    count_in : str | Path | None
        The folder where this key holder counts its decryptions under the key
        (``he-decryptions-<fingerprint>.json``); None: the secret context's folder.
        Give every decryption under a key the same folder.

    Returns
    -------
    ArrayRecord
        The plaintext tensors (``.to_torch_state_dict()`` for a torch model).

    Raises
    ------
    DecryptionCountError
        If ``DECRYPTIONS`` decryptions under this key are counted in the folder already,
        or the count cannot be read or written there; nothing is decrypted then.
    """
    if not isinstance(arrays, ArrayRecord):
        arrays = load_encrypted_arrays(arrays)
    encoder, own = encoder_for(secret_context, workers=1)
    path = count_file(decryption_count_folder(secret_context, count_in), own)
    return decrypt_model(arrays, encoder, own, like, count=lambda: spend_one(path, DECRYPTIONS))


def decryption_count_folder(secret_context: str | Path, count_in: str | Path | None) -> Path:
    """The folder where a key holder counts its decryptions (see :func:`decrypt_arrays`)."""
    if count_in is not None:
        return Path(count_in).expanduser().resolve()
    return Path(secret_context).expanduser().resolve().parent


def keyholder_evaluate_fn(
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None],
    secret_context: str | Path,
    like: ArrayRecord | None = None,
    count_in: str | Path | None = None,
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """An ``evaluate_fn`` for a ServerApp that also plays a key holder: decrypt, then evaluate.

    Our strategies skip a server-side ``evaluate_fn`` on encrypted models; one made by
    this function is called, and decrypts first (flooded, as every decryption: see
    :func:`decrypt_arrays`, and counted; ``like`` and ``count_in`` as there). Only for a
    server that may hold the secret key (a simulation where every party is one machine,
    or an evaluator the clients trust); in a deployment that server could decrypt every
    upload. A model that clients would refuse (:class:`ModelOutOfBoundError`: one upload
    past its bound) is not tested, nor one past the key's decryption budget
    (:class:`DecryptionCountError`), and the run goes on: one dishonest upload must not
    end it, nor a spent budget.
    """

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if is_encrypted(arrays):
            try:
                arrays = decrypt_arrays(arrays, secret_context, like, count_in)
            except (ModelOutOfBoundError, DecryptionCountError) as err:
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
