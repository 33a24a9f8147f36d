"""Pack model tensors into CKKS ciphertexts and back; add ciphertexts without a secret key.

A model's tensors are flattened, in a fixed order, into one float64 vector cut into
chunks of N values, one CKKS ciphertext each: a chunk's first N/2 values are the real
parts of the ciphertext's N/2 complex slots, the next N/2 their imaginary parts
(:func:`complex_slots`), so a ciphertext carries as many values as its polynomial has
coefficients. Clients encrypt with the secret key
(SEAL's symmetric encryption), which lets a ciphertext travel *seeded*: its second
polynomial is replaced by the seed that regenerates it, halving the upload. The server
loads a client's chunks in one TenSEAL vector (its loader checks each ciphertext against
the context), checks their level and scale, and adds the vectors.

An upload may be masked (issue 20, ``docs/design_secure_aggregation.md``): the encoder
adds a ring element to each chunk's encoded plaintext before encrypting it, so that the
ciphertext decrypts, under the shared key, to the mask plus the values; the server
subtracts masks from a sum with the public context alone (:meth:`CkksAdder.remove_mask`).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from itertools import count
from multiprocessing import get_context

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from lepton_flwr.he.keys import scratch_dir, secret_context_bytes
from lepton_flwr.he.publish import TooCoarseError, publishable
from lepton_flwr.he.ring_masks import add_mod, checked_ring_element
from lepton_flwr.he.seal_words import plaintext_from_words, plaintext_words

# Below this many chunks, encrypting in the calling process beats starting workers.
PARALLEL_MIN_CHUNKS = 64
_names = count()

RingMask = Callable[[int], np.ndarray]
"""A mask: chunk index -> ring element, uint64 (len(primes), N), row j below q_j."""


def complex_slots(piece: np.ndarray, degree: int) -> np.ndarray:
    """The N/2 complex slot values that carry a chunk of at most N real values.

    ``piece`` is zero-padded to N = ``degree`` values; slot k holds
    ``piece[k] + 1j * piece[N/2 + k]``. A slot's modulus can reach sqrt(2) times the
    largest value, which is why :func:`lepton_flwr.he.params.headroom` divides by sqrt(2).
    """
    if len(piece) > degree:
        raise ValueError(f"a chunk holds at most {degree} values, got {len(piece)}")
    padded = np.zeros(degree)
    padded[: len(piece)] = piece
    half = degree // 2
    return padded[:half] + 1j * padded[half:]


def real_values(slots: np.ndarray) -> np.ndarray:
    """Inverse of :func:`complex_slots`: the N real values (real parts, then imaginary)."""
    slots = np.asarray(slots)
    return np.concatenate([slots.real, slots.imag])


class CiphertextError(ValueError):
    """A ciphertext that cannot be loaded or does not fit the context."""


def ring_of(context: ts.Context) -> tuple[list[int], int]:
    """The RNS primes and the degree N of the first data level, where uploads are made.

    A mask for one chunk is a ring element of this level: a uint64 array of shape
    (len(primes), N) whose row j holds words below primes[j], in NTT form.
    """
    parms = context.seal_context().data.first_context_data().parms()
    return [modulus.value() for modulus in parms.coeff_modulus()], parms.poly_modulus_degree()


def _checked_mask(mask: RingMask, index: int, primes: list[int], degree: int) -> np.ndarray:
    return checked_ring_element(mask(index), primes, degree, f"the mask of chunk {index}")


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


def manifest_of(tensors: Mapping) -> list[TensorSpec]:
    """Names, shapes and dtypes of tensors (numpy arrays or Flower Arrays), in order.

    Reads only their metadata: nothing is converted or copied.
    """
    return [TensorSpec(k, tuple(int(d) for d in v.shape), str(v.dtype)) for k, v in tensors.items()]


def flatten(tensors: dict[str, np.ndarray]) -> tuple[np.ndarray, list[TensorSpec]]:
    """Concatenate tensors (in dict order) into one float64 vector; return it and the manifest."""
    manifest = manifest_of(tensors)
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


# ---- TenSEAL's CKKSVectorProto, the container its loader reads ------------------------
# message CKKSVectorProto { repeated uint32 sizes = 1; repeated bytes ciphertexts = 2;
#                           double scale = 3; }   (tenseal/proto/tensors.proto)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def vector_proto(chunks: list[bytes], slots: int, scale: float) -> bytes:
    """Wrap serialized SEAL ciphertexts in a TenSEAL CKKS vector (``slots`` values each)."""
    sizes = b"".join(_varint(slots) for _ in chunks)
    parts = [b"\x0a" + _varint(len(sizes)) + sizes]
    parts += [b"\x12" + _varint(len(chunk)) + chunk for chunk in chunks]
    parts.append(b"\x19" + struct.pack("<d", scale))
    return b"".join(parts)


def proto_ciphertexts(blob: bytes) -> list[bytes]:
    """The serialized ciphertexts inside a TenSEAL CKKS vector (field 2)."""
    chunks, pos = [], 0
    while pos < len(blob):
        key, pos = _read_varint(blob, pos)
        field, wire = key >> 3, key & 7
        if wire == 2:
            length, pos = _read_varint(blob, pos)
            if field == 2:
                chunks.append(blob[pos : pos + length])
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 0:
            _, pos = _read_varint(blob, pos)
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    return chunks


# ---- client side -----------------------------------------------------------------------


def _save(obj) -> bytes:
    """Serialize a SEAL object (its Python binding only writes files)."""
    path = str(scratch_dir() / f"ct-{next(_names)}")
    obj.save(path)
    try:
        with open(path, "rb") as handle:
            return handle.read()
    finally:
        os.unlink(path)


class _SymmetricEncryptor:
    """SEAL encoder and secret-key encryptor; ``seeded`` halves the serialized size."""

    def __init__(self, context: ts.Context, seeded: bool):
        seal_context = context.seal_context().data
        self.encoder = sealapi.CKKSEncoder(seal_context)
        self.encryptor = sealapi.Encryptor(seal_context, context.secret_key().data)
        self.seal_context, self.scale, self.seeded = seal_context, context.global_scale, seeded
        self.primes, self.degree = ring_of(context)

    def encrypt(self, values: np.ndarray, mask_words: np.ndarray | None = None) -> bytes:
        """Encode in complex slots, add ``mask_words`` (a checked ring element), encrypt.

        The values go two to a slot (:func:`complex_slots`); the result is saved.

        The mask goes into the plaintext, not the ciphertext: Enc(pt + m) is the
        ciphertext (c0 + m, c1), and a seeded c1 survives (masking a saved ciphertext
        would have to expand its seed, doubling the upload).
        """
        plain = sealapi.Plaintext()
        self.encoder.encode(complex_slots(values, self.degree).tolist(), self.scale, plain)
        if mask_words is not None:
            masked = add_mod(plaintext_words(plain, self.degree), mask_words, self.primes)
            plain = plaintext_from_words(self.seal_context, masked, plain.parms_id(), plain.scale)
        if self.seeded:
            return _save(self.encryptor.encrypt_symmetric(plain))
        ciphertext = sealapi.Ciphertext(self.seal_context)
        self.encryptor.encrypt_symmetric(plain, ciphertext)
        return _save(ciphertext)


_worker_encryptor: _SymmetricEncryptor | None = None


def _init_worker(secret_context: bytes, seeded: bool) -> None:
    global _worker_encryptor
    _worker_encryptor = _SymmetricEncryptor(ts.context_from(secret_context), seeded)


def _encrypt_in_worker(values: np.ndarray, mask_words: np.ndarray | None = None) -> bytes:
    return _worker_encryptor.encrypt(values, mask_words)


@lru_cache(maxsize=2)
def _pool(secret_context: bytes, seeded: bool, workers: int) -> ProcessPoolExecutor:
    # fork: spawn/forkserver would re-import the caller's __main__ (a Ray worker script,
    # flwr-clientapp); the workers only run SEAL on the arrays they are sent.
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=get_context("fork"),
        initializer=_init_worker,
        initargs=(secret_context, seeded),
    )


def default_workers() -> int:
    """Cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class CkksEncoder:
    """Client-side codec: encrypt a vector into CKKS chunks; decrypt a sum for release.

    Parameters
    ----------
    context : ts.Context
        A context holding the secret key.
    workers : int | None
        Processes that encrypt chunks in parallel; None uses every core this process
        may use, 1 encrypts in the calling process.
    seeded : bool
        Send seeded ciphertexts (half the bytes; the server spends about twice as long
        loading each one).
    """

    def __init__(self, context: ts.Context, workers: int | None = None, seeded: bool = True):
        if not context.has_secret_key():
            raise ValueError("Encryption and decryption need the secret context.")
        self._context = context
        self._secret_bytes: bytes | None = None
        self._encryptor = _SymmetricEncryptor(context, seeded)
        self._decryptor = sealapi.Decryptor(context.seal_context().data, context.secret_key().data)
        self.seeded = seeded
        self.workers = default_workers() if workers is None else max(1, workers)
        self.primes, self.degree = ring_of(context)
        # Values per ciphertext: N, the real and imaginary parts of N/2 complex slots.
        self.slots = self.degree
        self.poly_modulus_degree, self.scale = self.degree, context.global_scale

    def encrypt(self, vector: np.ndarray, mask: RingMask | None = None) -> list[bytes]:
        """Encrypt a float vector as ceil(len / N) ciphertexts, each masked if asked.

        Parameters
        ----------
        vector : np.ndarray
            The values.
        mask : Callable[[int], np.ndarray] | None
            None encrypts the values as they are. Otherwise ``mask(i)`` is the ring
            element (:func:`ring_of`) added to chunk i's encoded plaintext before it is
            encrypted: the chunk then decrypts to the mask plus the values, uniform mod
            each prime when the mask is. The upload stays seeded. Masks are computed
            here, in the calling process, and checked before anything is encrypted.

        Raises
        ------
        ValueError
            If a mask is not a uint64 array of shape (len(primes), N) with every word
            below its prime; the message names the chunk.
        """
        vector = np.asarray(vector, dtype=np.float64)
        chunks = [vector[i : i + self.slots] for i in range(0, len(vector), self.slots)]
        if mask is None:
            masks = None
        else:
            masks = [_checked_mask(mask, i, self.primes, self.degree) for i in range(len(chunks))]
        if self.workers == 1 or len(chunks) < PARALLEL_MIN_CHUNKS:
            if masks is None:
                return [self._encryptor.encrypt(c) for c in chunks]
            return [self._encryptor.encrypt(c, m) for c, m in zip(chunks, masks, strict=True)]
        if self._secret_bytes is None:  # what the worker processes load their keys from
            self._secret_bytes = secret_context_bytes(self._context)
        pool = _pool(self._secret_bytes, self.seeded, self.workers)
        chunksize = max(1, len(chunks) // (4 * self.workers))
        if masks is None:
            return list(pool.map(_encrypt_in_worker, chunks, chunksize=chunksize))
        return list(pool.map(_encrypt_in_worker, chunks, masks, chunksize=chunksize))

    def decrypt(self, chunks: list[bytes], length: int, weight: float = 1.0) -> np.ndarray:
        """Decrypt a sum for release: flooded with noise, divided by ``weight``, rounded.

        Only ciphertexts that can be a sum of fresh uploads are decrypted (one per N
        values, first data level, this key's scale: :func:`load_fresh`); the result goes
        through :func:`lepton_flwr.he.publish.publishable`, as every decryption that may
        leave the key holder must. Both parts of every complex slot that holds one of
        the ``length`` values are released, and so flooded; a last chunk's unused tail
        is dropped before flooding, never released.

        Raises
        ------
        CiphertextError
            If the chunks are not ``ceil(length / N)`` fresh-looking ciphertexts of
            this context, or the key's parameters are too coarse to flood.
        """
        exact = self._decrypt_exact(chunks, length)
        try:
            return publishable(exact, weight, self.poly_modulus_degree, self.scale)
        except TooCoarseError as err:
            raise CiphertextError(str(err)) from err

    def _decrypt_exact(self, chunks: list[bytes], length: int) -> np.ndarray:
        """The exact decryption (tests and benchmarks only: never publish it).

        An exact CKKS decryption together with its ciphertext reveals the secret key
        (:mod:`lepton_flwr.he.publish`).
        """
        expected = -(-length // self.slots)
        if len(chunks) != expected:
            raise CiphertextError(
                f"{len(chunks)} ciphertext chunks for {length} values, expected {expected}"
            )
        vector = load_fresh(self._context, chunks)
        encoder, parts = self._encryptor.encoder, []
        for ciphertext in vector.ciphertext():
            plain = sealapi.Plaintext()
            self._decryptor.decrypt(ciphertext, plain)
            parts.append(real_values(encoder.decode_complex(plain)))
        return np.concatenate(parts)[:length] if parts else np.zeros(0)


def container_size(context: ts.Context) -> int:
    """The per-chunk size TenSEAL's vector container records: its slot count, N/2.

    TenSEAL's loader and its addition read it; our codec ignores it (a chunk holds N
    values, :func:`complex_slots`).
    """
    return context.seal_context().data.first_context_data().parms().poly_modulus_degree() // 2


def load_fresh(context: ts.Context, chunks: list[bytes], slots: int | None = None) -> ts.CKKSVector:
    """Load chunks into one CKKS vector, refusing what cannot be a sum of fresh uploads.

    The server applies it to every upload and each client to every model it decrypts:
    each chunk must parse under ``context``, have two polynomials in NTT form, sit at the
    first data level and carry the key's scale. (These fields are metadata a sender can
    forge; the checks keep out malformed input and the easy transformations of a
    ciphertext, such as a product with a plaintext, not a determined adversary.)
    ``slots`` is the container's per-chunk size field, :func:`container_size` if None.

    Raises
    ------
    CiphertextError
        Naming the chunk and the field; never another exception, whatever the bytes.
    """
    scale = context.global_scale
    slots = container_size(context) if slots is None else slots
    try:
        vector = ts.ckks_vector_from(context, vector_proto(chunks, slots, scale))
    except Exception as err:  # TenSEAL raises ValueError/RuntimeError variants
        raise CiphertextError(f"not a valid ciphertext for this context ({err})"[:300]) from err
    try:
        parms_id = list(context.seal_context().data.first_parms_id())
        for index, ciphertext in enumerate(vector.ciphertext()):
            if ciphertext.size() != 2:
                raise CiphertextError(f"chunk {index} has {ciphertext.size()} polynomials, not 2")
            if not ciphertext.is_ntt_form():  # it would load, then make the addition throw
                raise CiphertextError(f"chunk {index} is not in NTT form")
            if list(ciphertext.parms_id()) != parms_id:
                raise CiphertextError(f"chunk {index} is not at the first data level")
            found = float(ciphertext.scale)
            if not (math.isfinite(found) and math.isclose(found, scale, rel_tol=1e-9)):
                raise CiphertextError(
                    f"chunk {index} has scale {found:.6g}, not the key's {scale:.6g}"
                )
    except CiphertextError:
        raise
    except Exception as err:  # noqa: BLE001 - no field of a ciphertext may end a run
        raise CiphertextError(f"a ciphertext field cannot be read ({err!r})"[:300]) from err
    return vector


# ---- server side -----------------------------------------------------------------------


class CkksAdder:
    """Server-side codec: check and add ciphertexts with a context that has no secret key.

    Parameters
    ----------
    context : ts.Context
        The public context (no secret key).
    """

    def __init__(self, context: ts.Context):
        self.context = context
        self.scale = context.global_scale
        self.primes, self.degree = ring_of(context)
        self.slots = self.degree  # values per ciphertext, as CkksEncoder.slots
        self._evaluator: sealapi.Evaluator | None = None
        self._public_encryptor: tuple[sealapi.CKKSEncoder, sealapi.Encryptor] | None = None

    def encrypt_public(self, vector: np.ndarray) -> list[bytes]:
        """Encrypt with the public key (full-size ciphertexts, N values each, as uploads).

        The server's initial model and HE + DP's noise top-ups; values are laid out in
        complex slots as :class:`CkksEncoder` lays them (:func:`complex_slots`).
        """
        vector = np.asarray(vector, dtype=np.float64)
        if self._public_encryptor is None:
            seal_context = self.context.seal_context().data
            self._public_encryptor = (
                sealapi.CKKSEncoder(seal_context),
                sealapi.Encryptor(seal_context, self.context.public_key().data),
            )
        encoder, encryptor = self._public_encryptor
        chunks = []
        for start in range(0, len(vector), self.slots):
            plain = sealapi.Plaintext()
            piece = complex_slots(vector[start : start + self.slots], self.degree)
            encoder.encode(piece.tolist(), self.scale, plain)
            ciphertext = sealapi.Ciphertext(self.context.seal_context().data)
            encryptor.encrypt(plain, ciphertext)
            chunks.append(_save(ciphertext))
        return chunks

    def load(self, chunks: list[bytes]) -> ts.CKKSVector:
        """Load one client's chunks, each checked as a fresh ciphertext (:func:`load_fresh`).

        Raises
        ------
        CiphertextError
            If a chunk does not parse, or its level, size or scale are not those of a
            fresh ciphertext under these parameters.
        """
        return load_fresh(self.context, chunks)

    def remove_mask(self, chunks: list[bytes], mask: RingMask) -> list[bytes]:
        """Subtract ring element ``mask(i)`` from ciphertext i, with the public context.

        For a sum of masked uploads: subtracting the masks that do not cancel (the
        survivors' self-masks, the pairwise masks of the dropped) leaves the sum of the
        values, exactly as if nothing had been masked (every operation is exact mod
        each prime). Each chunk is checked as :func:`load_fresh` checks it first;
        ``Evaluator.sub_plain`` runs at its parms_id and scale.

        Returns
        -------
        list[bytes]
            The serialized ciphertexts, which :func:`load_fresh` and
            :meth:`CkksEncoder.decrypt` accept.

        Raises
        ------
        CiphertextError
            If a chunk is not a ciphertext :func:`load_fresh` accepts.
        ValueError
            If a mask is not a uint64 array of shape (len(primes), N) with every word
            below its prime; the message names the chunk.
        """
        if not chunks:
            return []
        vector = self.load(chunks)
        seal_context = self.context.seal_context().data
        if self._evaluator is None:
            self._evaluator = sealapi.Evaluator(seal_context)
        unmasked = []
        for index, ciphertext in enumerate(vector.ciphertext()):
            words = _checked_mask(mask, index, self.primes, self.degree)
            plain = plaintext_from_words(
                seal_context, words, ciphertext.parms_id(), ciphertext.scale
            )
            self._evaluator.sub_plain_inplace(ciphertext, plain)
            unmasked.append(_save(ciphertext))
        return unmasked

    def sum_range(
        self, uploads: list[list[bytes]], start: int, stop: int
    ) -> tuple[list[bytes], dict[int, str]]:
        """Load and add chunks ``start:stop`` of every upload.

        Every failure while loading or adding one upload (a ``CiphertextError`` from
        :meth:`load`, or any other exception) leaves that upload out, with the reason;
        nothing one upload holds makes this raise.

        Returns
        -------
        tuple[list[bytes], dict[int, str]]
            The serialized sums, and the uploads (by index) whose chunks failed to
            load or add, with the reason; those are left out of the sums.
        """
        total, errors = None, {}
        for index, chunks in enumerate(uploads):
            try:
                vector = self.load(chunks[start:stop])
                # Out of place: an addition that fails half-way leaves the total intact.
                total = vector if total is None else total + vector
            except CiphertextError as err:
                errors[index] = str(err)
            except Exception as err:  # noqa: BLE001 - one upload, one verdict
                errors[index] = f"cannot be loaded or added to the others ({err!r})"[:300]
        return ([] if total is None else proto_ciphertexts(total.serialize())), errors

    def sum_updates(
        self, uploads: list[list[bytes]], workers: int | None = None
    ) -> tuple[list[bytes], dict[int, str]]:
        """Add uploads chunk by chunk, in parallel over chunk ranges.

        Every upload must have the same number of chunks. An upload with a chunk that
        does not load or add, whatever the error, is reported (index -> reason) and left
        out of the sum (:meth:`sum_range`).

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
        ranges = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
        global _fork_state
        _fork_state = (self, uploads)
        # The forked workers take all ranges but the first, which this process sums.
        pool = get_context("fork").Pool(workers - 1)
        try:
            pending = pool.map_async(_sum_range_in_fork, ranges[1:])
            parts = [self.sum_range(uploads, *ranges[0]), *pending.get()]
        finally:
            _fork_state = None
            pool.close()  # let the workers exit: terminating them would trip Ray's
            pool.join()  # SIGTERM handler, inherited through fork, into a stack dump
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
