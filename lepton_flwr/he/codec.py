"""Pack model tensors into CKKS ciphertexts and back; add ciphertexts without a secret key.

A model's tensors are flattened, in a fixed order, into one float64 vector that is cut
into chunks of N/2 values, one CKKS ciphertext each. Clients encrypt with the secret key
(SEAL's symmetric encryption), which lets a ciphertext travel *seeded*: its second
polynomial is replaced by the seed that regenerates it, halving the upload. The server
loads the chunks with a public context, checks them and adds them.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from itertools import count
from multiprocessing import get_context

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from lepton_flwr.he.keys import scratch_dir

# Below this many chunks, encrypting in the calling process beats starting workers.
PARALLEL_MIN_CHUNKS = 64
_names = count()


class CiphertextError(ValueError):
    """A ciphertext that cannot be loaded or does not fit the context."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one model tensor, in packing order."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        """Number of values."""
        return math.prod(self.shape)


def flatten(tensors: dict[str, np.ndarray]) -> tuple[np.ndarray, list[TensorSpec]]:
    """Concatenate tensors (in dict order) into one float64 vector; return it and the manifest."""
    manifest = [
        TensorSpec(k, tuple(int(d) for d in v.shape), str(v.dtype)) for k, v in tensors.items()
    ]
    if not tensors:
        return np.zeros(0), manifest
    vector = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in tensors.values()])
    return vector, manifest


def unflatten(vector: np.ndarray, manifest: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten`: cut the vector back into named tensors of their dtypes."""
    total = sum(spec.size for spec in manifest)
    if len(vector) < total:
        raise ValueError(f"vector has {len(vector)} values, the manifest needs {total}")
    out, offset = {}, 0
    for spec in manifest:
        piece = vector[offset : offset + spec.size].reshape(spec.shape)
        out[spec.name] = piece.astype(spec.dtype)
        offset += spec.size
    return out


def _scratch_path() -> str:
    return str(scratch_dir() / f"ct-{next(_names)}")


def _save(obj) -> bytes:
    """Serialize a SEAL object (its Python binding only writes files)."""
    path = _scratch_path()
    obj.save(path)
    try:
        with open(path, "rb") as handle:
            return handle.read()
    finally:
        os.unlink(path)


def _load_ciphertext(seal_context, data: bytes) -> sealapi.Ciphertext:
    path = _scratch_path()
    with open(path, "wb") as handle:
        handle.write(data)
    try:
        ciphertext = sealapi.Ciphertext(seal_context)
        ciphertext.load(seal_context, path)
        return ciphertext
    except Exception as err:  # SEAL raises ValueError/RuntimeError/IOError variants
        raise CiphertextError(f"not a valid ciphertext for this context ({err})") from err
    finally:
        os.unlink(path)


class _SecretKeyOps:
    """SEAL encoder, symmetric encryptor and decryptor over a secret context."""

    def __init__(self, context: ts.Context):
        if not context.has_secret_key():
            raise ValueError("Encryption and decryption need the secret context.")
        self.seal_context = context.seal_context().data
        secret_key = context.secret_key().data
        self.encoder = sealapi.CKKSEncoder(self.seal_context)
        self.encryptor = sealapi.Encryptor(self.seal_context, secret_key)
        self.decryptor = sealapi.Decryptor(self.seal_context, secret_key)
        self.scale = context.global_scale
        self.slots = self.encoder.slot_count()

    def encrypt(self, values: np.ndarray) -> bytes:
        plain = sealapi.Plaintext()
        self.encoder.encode(values.tolist(), self.scale, plain)
        return _save(self.encryptor.encrypt_symmetric(plain))

    def decrypt(self, data: bytes) -> np.ndarray:
        ciphertext = _load_ciphertext(self.seal_context, data)
        plain = sealapi.Plaintext()
        self.decryptor.decrypt(ciphertext, plain)
        return np.asarray(self.encoder.decode_double(plain))


_worker_ops: _SecretKeyOps | None = None


def _init_worker(secret_context: bytes) -> None:
    global _worker_ops
    _worker_ops = _SecretKeyOps(ts.context_from(secret_context))


def _encrypt_in_worker(values: np.ndarray) -> bytes:
    return _worker_ops.encrypt(values)


@lru_cache(maxsize=2)
def _pool(secret_context: bytes, workers: int) -> ProcessPoolExecutor:
    # fork: spawn/forkserver would re-import the caller's __main__ (a Ray worker script,
    # flwr-clientapp); the workers only run SEAL on the arrays they are sent.
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=get_context("fork"),
        initializer=_init_worker,
        initargs=(secret_context,),
    )


def default_workers() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class CkksEncoder:
    """Client-side codec: encrypt a vector into seeded CKKS chunks, decrypt chunks back.

    Parameters
    ----------
    context : ts.Context
        A context holding the secret key.
    workers : int | None
        Processes that encrypt chunks in parallel; None uses every core this process
        may use, 1 encrypts in the calling process.
    """

    def __init__(self, context: ts.Context, workers: int | None = None):
        self._ops = _SecretKeyOps(context)
        self._context = context
        self.workers = default_workers() if workers is None else max(1, workers)
        self.slots = self._ops.slots

    def _chunks(self, vector: np.ndarray) -> list[np.ndarray]:
        return [vector[i : i + self.slots] for i in range(0, len(vector), self.slots)]

    def encrypt(self, vector: np.ndarray) -> list[bytes]:
        """Encrypt a float vector as ceil(len / slots) seeded ciphertexts."""
        chunks = self._chunks(np.asarray(vector, dtype=np.float64))
        if self.workers == 1 or len(chunks) < PARALLEL_MIN_CHUNKS:
            return [self._ops.encrypt(c) for c in chunks]
        from lepton_flwr.he.keys import secret_context_bytes

        pool = _pool(secret_context_bytes(self._context), self.workers)
        return list(
            pool.map(
                _encrypt_in_worker, chunks, chunksize=max(1, len(chunks) // (4 * self.workers))
            )
        )

    def decrypt(self, chunks: list[bytes], length: int) -> np.ndarray:
        """Decrypt chunks and return the first ``length`` values."""
        if len(chunks) * self.slots < length:
            raise CiphertextError(f"{len(chunks)} chunks hold fewer than {length} values")
        return np.concatenate([self._ops.decrypt(c) for c in chunks])[:length]


class CkksAdder:
    """Server-side codec: check and add ciphertexts with a context that has no secret key.

    Parameters
    ----------
    context : ts.Context
        The public context (no secret key).
    """

    def __init__(self, context: ts.Context):
        self.seal_context = context.seal_context().data
        self.evaluator = sealapi.Evaluator(self.seal_context)
        self.scale = context.global_scale
        self._parms_id = self.seal_context.first_parms_id()
        self.slots = (
            context.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2
        )

    def load(self, data: bytes) -> sealapi.Ciphertext:
        """Deserialize one chunk and check that it is a fresh ciphertext of this context.

        Raises
        ------
        CiphertextError
            If the bytes do not parse, or the level, size or scale are not those of a
            fresh ciphertext under these parameters.
        """
        ciphertext = _load_ciphertext(self.seal_context, data)
        if ciphertext.size() != 2:
            raise CiphertextError(f"ciphertext has {ciphertext.size()} polynomials, expected 2")
        if list(ciphertext.parms_id()) != list(self._parms_id):
            raise CiphertextError("ciphertext is not at the first data level of this context")
        if not math.isclose(ciphertext.scale, self.scale, rel_tol=1e-9):
            raise CiphertextError(
                f"ciphertext scale 2^{math.log2(ciphertext.scale):.1f} differs from the context's"
            )
        return ciphertext

    def add(
        self, total: sealapi.Ciphertext | None, ciphertext: sealapi.Ciphertext
    ) -> sealapi.Ciphertext:
        """Add ``ciphertext`` into ``total`` (in place); start a total with None."""
        if total is None:
            return ciphertext
        self.evaluator.add_inplace(total, ciphertext)
        return total

    @staticmethod
    def dump(ciphertext: sealapi.Ciphertext) -> bytes:
        """Serialize a ciphertext (a sum: full size, it carries no seed)."""
        return _save(ciphertext)

    def sum_range(
        self, uploads: list[list[bytes]], start: int, stop: int
    ) -> tuple[list[bytes], dict[int, str]]:
        """Load and add chunks ``start:stop`` of every upload.

        Returns
        -------
        tuple[list[bytes], dict[int, str]]
            The serialized sums, and the uploads (by index) whose chunks failed to
            load, with the reason; those are left out of the sums.
        """
        sums: list = [None] * (stop - start)
        errors: dict[int, str] = {}
        for index, chunks in enumerate(uploads):
            try:
                loaded = [self.load(chunks[j]) for j in range(start, stop)]
            except CiphertextError as err:
                errors[index] = str(err)
                continue
            sums = [self.add(t, c) for t, c in zip(sums, loaded, strict=True)]
        return [self.dump(t) for t in sums if t is not None], errors

    def sum_updates(
        self, uploads: list[list[bytes]], workers: int | None = None
    ) -> tuple[list[bytes], dict[int, str]]:
        """Add uploads chunk by chunk, in parallel over chunk ranges.

        Every upload must have the same number of chunks. An upload with a chunk that
        does not load is reported (index -> reason) and left out of the sum.

        Parameters
        ----------
        uploads : list[list[bytes]]
            Each client's serialized ciphertexts.
        workers : int | None
            Processes (forked, so they read the uploads without copying); None uses
            every core this process may use.
        """
        if not uploads:
            return [], {}
        num_chunks = len(uploads[0])
        workers = default_workers() if workers is None else max(1, workers)
        if workers == 1 or num_chunks * len(uploads) < PARALLEL_MIN_CHUNKS * 4:
            return self.sum_range(uploads, 0, num_chunks)
        bounds = np.linspace(0, num_chunks, workers + 1).astype(int)
        global _fork_state
        _fork_state = (self, uploads)
        try:
            with get_context("fork").Pool(workers) as pool:
                parts = pool.map(
                    _sum_range_in_fork, list(zip(bounds[:-1], bounds[1:], strict=True))
                )
        finally:
            _fork_state = None
        errors: dict[int, str] = {}
        for _, part_errors in parts:
            errors.update(part_errors)
        if errors:  # a bad upload was left out of some ranges only: sum the good ones again
            good = [u for i, u in enumerate(uploads) if i not in errors]
            sums, _ = self.sum_updates(good, workers)
            return sums, errors
        return [chunk for part, _ in parts for chunk in part], errors


_fork_state: tuple[CkksAdder, list[list[bytes]]] | None = None


def _sum_range_in_fork(bounds: tuple[int, int]) -> tuple[list[bytes], dict[int, str]]:
    adder, uploads = _fork_state
    return adder.sum_range(uploads, int(bounds[0]), int(bounds[1]))
