"""Pack model tensors into CKKS ciphertexts and back; add ciphertexts without a secret key.

A model's tensors are flattened, in a fixed order, into one float64 vector cut into
chunks of N values, one CKKS ciphertext each: a chunk's first N/2 values are the real
parts of the ciphertext's N/2 complex slots, the next N/2 their imaginary parts
(:func:`complex_slots`), so a ciphertext carries as many values as its polynomial has
coefficients.

Ciphertexts travel in the packed format of :mod:`lepton_flwr.he.packed`, in three kinds
of chunk, told apart by their length:

- an **upload** (a client's, :meth:`CkksEncoder.encrypt`): encrypted with the secret key,
  c0 in coefficient form with its ``D_UP`` low bits rounded off, and the seed of c1;
- a **sum** (what the server keeps, :meth:`CkksAdder.sum_updates`): c0 exact, c1 as its
  residues; the server's public-key encryptions (:meth:`CkksAdder.encrypt_public`) are
  sums of one;
- a **download** (what the server sends, :meth:`CkksAdder.download`): a sum whose c0 has
  its ``D_DOWN`` low bits rounded off. The server keeps the exact sum and rounds a copy.

The server adds uploads in numpy (c0) and expands their seeds into c1 with SEAL; it never
loads a client's SEAL ciphertext. It accepts only uploads from clients, so every c1 it
adds is a seed's expansion (a client cannot send an arbitrary c1).

An upload may be masked (issue 20, ``docs/design_secure_aggregation.md``): the encoder
adds a ring element to each chunk's c0 in coefficient form before rounding it, so that
the ciphertext decrypts, under the shared key, to the mask plus the values; the server
subtracts masks from a sum with the public context alone (:meth:`CkksAdder.remove_mask`).
"""

from __future__ import annotations

import math
import mmap
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from typing import TYPE_CHECKING

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from lepton_flwr.he.keys import secret_context_bytes
from lepton_flwr.he.publish import TooCoarseError, check_summed, publishable
from lepton_flwr.he.ring_masks import checked_ring_element, sub_mod
from lepton_flwr.he.seal_words import ciphertext_words, save_bytes

if TYPE_CHECKING:  # packed imports CiphertextError from here: imported where used
    from lepton_flwr.he.packed import PackedFormat

# Below this many chunks, encrypting in the calling process beats starting workers.
PARALLEL_MIN_CHUNKS = 64

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


# ---- the packed formats of one context ------------------------------------------------


class Formats:
    """The packed formats of a context: uploads, exact sums and downloads.

    ``wire`` drops ``D_UP`` bits of an upload's c0 and ``D_DOWN`` of a download's;
    ``exact`` reads and writes sums with c0 whole (the same upload layout).
    """

    def __init__(self, context: ts.Context):
        from lepton_flwr.he.packed import D_DOWN, D_UP, PackedFormat

        self.wire: PackedFormat = PackedFormat(context, D_UP, D_DOWN)
        self.exact: PackedFormat = PackedFormat(context, D_UP, 0)
        self.ring, self.packer = self.wire.ring, self.wire.packer

    def kind(self, chunks: Sequence[bytes]) -> str:
        """The kind of chunks ("upload", "sum" or "download"), from the first one's length.

        Raises
        ------
        CiphertextError
            If it is none of them (the parser then checks every chunk).
        """
        if not chunks:
            return "sum"
        first = chunks[0]
        length = len(first) if isinstance(first, bytes | bytearray) else -1
        kinds = {
            self.wire.upload_chunk_bytes: "upload",
            self.exact.download_chunk_bytes: "sum",
            self.wire.download_chunk_bytes: "download",
        }
        if length not in kinds:
            raise CiphertextError(
                f"chunk 0 has {length} bytes: neither an upload "
                f"({self.wire.upload_chunk_bytes}), a sum ({self.exact.download_chunk_bytes}) "
                f"nor a download ({self.wire.download_chunk_bytes})"
            )
        return kinds[length]

    def sum_parts(self, chunks: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """A sum's c0 (coefficient form) and c1 (NTT form) residues, each (B, k, N).

        Raises
        ------
        CiphertextError
            If a chunk is not a sum of this context (length, a word past Q or a prime).
        """
        c0, c1 = _only_ciphertext_errors(self.exact.parse_download, chunks)
        return self.packer.residues(c0), c1

    def sum_chunks(self, c0: np.ndarray, c1: np.ndarray) -> list[bytes]:
        """Sum chunks from c0 (coefficient form) and c1 (NTT form) residues, (B, k, N)."""
        if len(c0) == 0:
            return []
        return self.exact.pack_download(self.packer.compose(c0), c1)


LOCAL_FAILURES = (MemoryError, OSError)
"""This machine's own failures (memory, the scratch files' file system): never a
ciphertext's fault, so never reported as one; they propagate wherever a ciphertext's
errors are caught. A ciphertext's bytes cannot cause them: every chunk's length is
checked before anything is sized from it or SEAL or a scratch file sees it
(``tests/test_review_x.py``, ``tests/test_fuzz_loaders.py``)."""


def _only_ciphertext_errors(function, *arguments):
    """``function(*arguments)``; what it raises becomes a CiphertextError.

    A CiphertextError and :data:`LOCAL_FAILURES` propagate as they are.
    """
    try:
        return function(*arguments)
    except (CiphertextError, *LOCAL_FAILURES):
        raise
    except Exception as err:  # noqa: BLE001 - no byte of a ciphertext may end a run
        raise CiphertextError(f"not a ciphertext of this context ({err!r})"[:300]) from err


# ---- client side -----------------------------------------------------------------------


class _SymmetricEncryptor:
    """SEAL encoder and secret-key encryptor, and the upload format."""

    def __init__(self, context: ts.Context):
        seal_context = context.seal_context().data
        self.encoder = sealapi.CKKSEncoder(seal_context)
        self.encryptor = sealapi.Encryptor(seal_context, context.secret_key().data)
        self.scale = context.global_scale
        self.formats = Formats(context)
        self.primes, self.degree = ring_of(context)

    def encrypt(
        self, pieces: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None = None
    ) -> list[bytes]:
        """Encode each piece in complex slots, encrypt with the secret key, pack as uploads.

        The values go two to a slot (:func:`complex_slots`). ``masks[i]`` (checked ring
        elements), if given, is added to chunk i's c0 in coefficient form before its low
        bits are rounded off: the chunk then decrypts to the mask plus the values. The
        pieces are packed together (SEAL's inverse NTT and the packing work in batches).
        """
        seeded = []
        for values in pieces:
            plain = sealapi.Plaintext()
            self.encoder.encode(complex_slots(values, self.degree).tolist(), self.scale, plain)
            seeded.append(save_bytes(self.encryptor.encrypt_symmetric(plain)))
        mask = None if masks is None else masks.__getitem__
        return self.formats.wire.pack_upload(seeded, mask)


_worker_encryptor: _SymmetricEncryptor | None = None


def _init_worker(secret_context: bytes) -> None:
    global _worker_encryptor
    _worker_encryptor = _SymmetricEncryptor(ts.context_from(secret_context))


def _encrypt_in_worker(
    pieces: list[np.ndarray], masks: list[np.ndarray] | None = None
) -> list[bytes]:
    return _worker_encryptor.encrypt(pieces, masks)


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
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class CkksEncoder:
    """Client-side codec: encrypt a vector into upload chunks; decrypt a sum for release.

    Parameters
    ----------
    context : ts.Context
        A context holding the secret key.
    workers : int | None
        Processes that encrypt chunks in parallel; None uses every core this process
        may use, 1 encrypts in the calling process.
    seeded : bool
        Kept for configurations that set it: uploads always carry c1 as its seed
        (the packed format, :mod:`lepton_flwr.he.packed`); False is refused.
    """

    def __init__(self, context: ts.Context, workers: int | None = None, seeded: bool = True):
        if not context.has_secret_key():
            raise ValueError("Encryption and decryption need the secret context.")
        if seeded is not True:
            raise ValueError(
                "seeded=False is no longer supported: uploads always carry c1 as its seed "
                "(the packed format, lepton_flwr.he.packed)"
            )
        self._context = context
        self._secret_bytes: bytes | None = None
        self._encryptor = _SymmetricEncryptor(context)
        self._decryptor = sealapi.Decryptor(context.seal_context().data, context.secret_key().data)
        self.formats = self._encryptor.formats
        self.seeded = True
        self.workers = default_workers() if workers is None else max(1, workers)
        self.primes, self.degree = ring_of(context)
        # Values per ciphertext: N, the real and imaginary parts of N/2 complex slots.
        self.slots = self.degree
        self.poly_modulus_degree, self.scale = self.degree, context.global_scale
        self._last: tuple[tuple[bytes, ...], np.ndarray] | None = None  # _decrypt_exact's

    def encrypt(self, vector: np.ndarray, mask: RingMask | None = None) -> list[bytes]:
        """Encrypt a float vector as ceil(len / N) upload chunks, each masked if asked.

        Parameters
        ----------
        vector : np.ndarray
            The values.
        mask : Callable[[int], np.ndarray] | None
            None encrypts the values as they are. Otherwise ``mask(i)`` is the ring
            element (:func:`ring_of`) added to chunk i's c0 in coefficient form: the chunk
            then decrypts to the mask plus the values, uniform mod each prime when the
            mask is. Masks are computed here, in the calling process, and checked before
            anything is encrypted.

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
            return self._encryptor.encrypt(chunks, masks)
        if self._secret_bytes is None:  # what the worker processes load their keys from
            self._secret_bytes = secret_context_bytes(self._context)
        pool = _pool(self._secret_bytes, self.workers)
        per = max(1, len(chunks) // (4 * self.workers))
        starts = range(0, len(chunks), per)
        batches = [chunks[i : i + per] for i in starts]
        if masks is None:
            done = pool.map(_encrypt_in_worker, batches)
        else:
            done = pool.map(_encrypt_in_worker, batches, [masks[i : i + per] for i in starts])
        return [chunk for batch in done for chunk in batch]

    def decrypt(self, chunks: list[bytes], length: int, weight: float = 1.0) -> np.ndarray:
        """Decrypt a sum for release: flooded with noise, divided by ``weight``, rounded.

        ``chunks`` are one per N values, all of one kind (a download, a sum, or an
        upload: :func:`load`); the result goes through
        :func:`lepton_flwr.he.publish.publishable`, as every decryption that may leave the
        key holder must. Exactly the ``length`` values are released, each flooded (a
        chunk's N values are its slots' real parts, then their imaginary parts); a last
        chunk's unused values, in either part, are dropped before flooding, never released.

        Raises
        ------
        CiphertextError
            If the chunks are not ``ceil(length / N)`` chunks of one kind that this
            context reads, or the key's parameters are too coarse to flood.
        """
        exact = self._decrypt_exact(chunks, length)
        try:
            return publishable(exact, weight, self.poly_modulus_degree, self.scale)
        except TooCoarseError as err:
            raise CiphertextError(str(err)) from err

    def _decrypt_exact(self, chunks: list[bytes], length: int) -> np.ndarray:
        """The exact decryption (tests and benchmarks only: never publish it).

        An exact CKKS decryption together with its ciphertext reveals the secret key
        (:mod:`lepton_flwr.he.publish`). The last one is kept, with its chunks, in this
        process (which holds the key): every client a simulation process runs decrypts
        the same global model, and SEAL's decryption is deterministic, so the same bytes
        get a copy of the same values; :meth:`decrypt` floods each copy afresh. Chunks
        that do not load are not kept (a model whose values its caller then refuses, past
        its bound, is: each use checks a freshly flooded copy again).
        """
        expected = -(-length // self.slots)
        if len(chunks) != expected:
            raise CiphertextError(
                f"{len(chunks)} ciphertext chunks for {length} values, expected {expected}"
            )
        key, last = same_chunks(chunks), self._last  # read once: another thread may store
        if key is not None and last is not None and last[0] == key:
            return last[1][:length].copy()
        encoder, parts = self._encryptor.encoder, []
        for ciphertext in load(self.formats, chunks if key is None else key):  # the kept
            plain = sealapi.Plaintext()  # bytes, not a bytearray someone may still write
            self._decryptor.decrypt(ciphertext, plain)
            parts.append(real_values(encoder.decode_complex(plain)))
        values = np.concatenate(parts) if parts else np.zeros(0)
        if key is not None:
            self._last = (key, values)
        return values[:length].copy()


def same_chunks(chunks: Sequence[bytes]) -> tuple[bytes, ...] | None:
    """Chunks as a tuple of bytes, equal only to a tuple of the same bytes.

    None if a chunk is neither bytes nor bytearray (such a chunk is refused when loaded).
    """
    if not all(isinstance(chunk, bytes | bytearray) for chunk in chunks):
        return None
    return tuple(bytes(chunk) if isinstance(chunk, bytearray) else chunk for chunk in chunks)


def load(formats: Formats, chunks: Sequence[bytes]) -> list[sealapi.Ciphertext]:
    """SEAL ciphertexts (to decrypt) from chunks of one kind, each checked by its format.

    A download or a sum is parsed (:meth:`lepton_flwr.he.packed.PackedFormat.parse_download`:
    length, c0 words below ceil(Q / 2^d), c1 words below their primes); an upload the same
    (:meth:`~lepton_flwr.he.packed.PackedFormat.parse_upload`), its seeds expanded.
    Nothing else can be wrong: level, scale, size and NTT form are fixed by the format.

    Raises
    ------
    CiphertextError
        Naming the chunk and the fault; never another exception, whatever the bytes.
    """
    kind = formats.kind(chunks)
    if kind == "upload":
        wire = formats.wire
        return _only_ciphertext_errors(lambda: wire.upload_ciphertexts(wire.parse_upload(chunks)))
    packed = formats.wire if kind == "download" else formats.exact
    return _only_ciphertext_errors(packed.load_download, chunks)


# ---- server side -----------------------------------------------------------------------


class CkksAdder:
    """Server-side codec: check and add uploads with a context that has no secret key.

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
        self.formats = Formats(context)
        self._public_encryptor: tuple[sealapi.CKKSEncoder, sealapi.Encryptor] | None = None

    def encrypt_public(self, vector: np.ndarray) -> list[bytes]:
        """Encrypt with the public key: sum chunks (of one ciphertext each), N values a chunk.

        The server's initial model and HE + DP's noise top-ups; values are laid out in
        complex slots as :class:`CkksEncoder` lays them (:func:`complex_slots`). A
        public-key ciphertext has no seed: its c1 travels whole, as a sum's.
        """
        vector = np.asarray(vector, dtype=np.float64)
        if self._public_encryptor is None:
            seal_context = self.context.seal_context().data
            self._public_encryptor = (
                sealapi.CKKSEncoder(seal_context),
                sealapi.Encryptor(seal_context, self.context.public_key().data),
            )
        encoder, encryptor = self._public_encryptor
        words = []
        for start in range(0, len(vector), self.slots):
            plain = sealapi.Plaintext()
            piece = complex_slots(vector[start : start + self.slots], self.degree)
            encoder.encode(piece.tolist(), self.scale, plain)
            ciphertext = sealapi.Ciphertext(self.context.seal_context().data)
            encryptor.encrypt(plain, ciphertext)
            words.append(ciphertext_words(ciphertext))
        if not words:
            return []
        stacked = np.stack(words)  # (B, 2, k, N), NTT form
        c0 = self.formats.ring.transform(stacked[:, 0], to_ntt=False)
        return self.formats.sum_chunks(c0, stacked[:, 1])

    def check(self, chunks: list[bytes]) -> None:
        """Check one client's chunks as uploads of this context.

        Raises
        ------
        CiphertextError
            If a chunk has the wrong length, a c0 word past ceil(Q / 2^D_UP), or is not
            an upload at all (a sum or a download: their c1 is not a seed's expansion).
        """
        _only_ciphertext_errors(self.formats.wire.parse_upload, chunks)

    def download(self, chunks: list[bytes], summed: int) -> list[bytes]:
        """The copy of a sum to send: c0 with its ``D_DOWN`` low bits rounded off.

        ``summed`` is the number of uploads (and public-key encryptions) the sum holds:
        the flooding covers a rounded sum of at most
        :func:`lepton_flwr.he.publish.summed_limit` of them.

        Raises
        ------
        CiphertextError
            If a chunk is not a sum of this context.
        lepton_flwr.he.publish.TooManySummedError
            If ``summed`` passes what the flooding covers.
        """
        check_summed(summed, self.formats.wire.d_down)
        if not chunks or self.formats.kind(chunks) == "download":
            return list(chunks)
        c0, c1 = _only_ciphertext_errors(self.formats.exact.parse_download, chunks)
        return self.formats.wire.pack_download(c0, c1)

    def remove_mask(self, chunks: list[bytes], mask: RingMask) -> list[bytes]:
        """Subtract ring element ``mask(i)`` from sum chunk i's c0 (coefficient form).

        For a sum of masked uploads: subtracting the masks that do not cancel (the
        survivors' self-masks, the pairwise masks of the dropped) leaves the sum of the
        values, exactly as if nothing had been masked (every operation is exact mod
        each prime; the uploads' rounding is what it would have been without masks).

        Returns
        -------
        list[bytes]
            Sum chunks, which :meth:`CkksEncoder.decrypt` and :meth:`download` accept.

        Raises
        ------
        CiphertextError
            If a chunk is not a sum of this context.
        ValueError
            If a mask is not a uint64 array of shape (len(primes), N) with every word
            below its prime; the message names the chunk.
        """
        if not chunks:
            return []
        c0, c1 = self.formats.sum_parts(chunks)
        masks = np.stack(
            [_checked_mask(mask, index, self.primes, self.degree) for index in range(len(c0))]
        )
        return self.formats.sum_chunks(sub_mod(c0, masks, self.primes), c1)

    def sum_range(
        self,
        uploads: list[list[bytes]],
        start: int,
        stop: int,
        sums: Sequence[list[bytes]] = (),
    ) -> tuple[list[bytes], dict[int, str]]:
        """Add chunks ``start:stop`` of every upload, and of the server's own ``sums``.

        Every failure while checking or adding one upload leaves that upload out, with
        the reason; nothing one upload holds makes this raise.

        Returns
        -------
        tuple[list[bytes], dict[int, str]]
            The sum chunks, and the uploads (by index) whose chunks failed to load or
            add, with the reason; those are left out of the sums.

        Raises
        ------
        CiphertextError
            If one of ``sums`` (the server's own) is not a sum of this context.
        """
        from lepton_flwr.he.packed import PackedSum

        total, errors = PackedSum(self.formats.wire, stop - start), {}
        for index, chunks in enumerate(uploads):
            reason = _refusal_of(total.add, chunks[start:stop])
            if reason is not None:
                errors[index] = reason
        for chunks in sums:
            try:
                c0, c1 = self.formats.sum_parts(chunks[start:stop])
            except CiphertextError as err:
                raise CiphertextError(f"the server's own ciphertexts do not load: {err}") from err
            total.add_exact(c0, c1, 1)
        if total.count == 0 or stop == start:
            return [], errors
        return total.exact_chunks(self.formats.exact), errors

    def sum_updates(
        self,
        uploads: list[list[bytes]],
        workers: int | None = None,
        sums: Sequence[list[bytes]] = (),
    ) -> tuple[list[bytes], dict[int, str]]:
        """Add uploads chunk by chunk, and the server's own ``sums``, in parallel over ranges.

        Every sum must have the same number of chunks, and so must every upload: that of
        the sums, or without sums the count most uploads have. An upload with another
        count, or with a chunk that does not check or add, whatever the error, is
        reported (index -> reason, as a serial sum gives it) and left out of the sum
        (:meth:`sum_range`). Only uploads are taken from ``uploads``; sums (whose c1 is
        not a seed's expansion) only from ``sums``. Safe to call from several threads.

        Parameters
        ----------
        uploads : list[list[bytes]]
            Each client's upload chunks.
        workers : int | None
            Processes (forked, so they read the uploads without copying); None uses
            every core this process may use.
        sums : Sequence[list[bytes]]
            Sum chunks the server made itself (the global model, public-key encryptions).

        Raises
        ------
        RuntimeError
            If a forked worker dies (the sum is not returned).
        """
        from lepton_flwr.he.packed import check_chunks

        if not uploads and not sums:
            return [], {}
        size = self.formats.wire.upload_chunk_bytes
        errors = {  # every chunk checked before the sum is sized from a count of them
            index: reason
            for index, upload in enumerate(uploads)
            if (reason := _refusal_of(check_chunks, upload, None, size)) is not None
        }
        counts = {i: len(upload) for i, upload in enumerate(uploads) if i not in errors}
        if sums:
            num_chunks = len(sums[0])
        elif counts:
            num_chunks = Counter(counts.values()).most_common(1)[0][0]
        else:
            return [], errors
        errors.update(
            (index, f"{count} chunks, expected {num_chunks}")
            for index, count in counts.items()
            if count != num_chunks
        )
        kept = [index for index in range(len(uploads)) if index not in errors]
        workers = default_workers() if workers is None else max(1, workers)
        total, refused = self._sum_sized([uploads[i] for i in kept], num_chunks, workers, sums)
        errors.update((kept[index], reason) for index, reason in refused.items())
        return total, dict(sorted(errors.items()))

    def _sum_sized(
        self,
        uploads: list[list[bytes]],
        num_chunks: int,
        workers: int,
        sums: Sequence[list[bytes]],
    ) -> tuple[list[bytes], dict[int, str]]:
        """:meth:`sum_updates` of uploads of ``num_chunks`` chunks each."""
        if not uploads and not sums:
            return [], {}
        if workers == 1 or num_chunks * (len(uploads) + len(sums)) < PARALLEL_MIN_CHUNKS * 4:
            return self.sum_range(uploads, 0, num_chunks, sums)
        bounds = np.linspace(0, num_chunks, workers + 1).astype(int)
        ranges = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
        # The forked workers take all ranges but the first, which this process sums. They
        # get their state with the pool (inherited through fork: nothing global, so
        # threads may sum at once) and write their sum chunks into memory shared with
        # this process (anonymous, made before the fork), not through a pipe this process
        # would only read once its own range is done.
        chunk_bytes = self.formats.exact.download_chunk_bytes
        first = ranges[0][1]
        shared = mmap.mmap(-1, (num_chunks - first) * chunk_bytes)
        pool = None
        try:
            pool = ProcessPoolExecutor(
                workers - 1,
                mp_context=get_context("fork"),
                initializer=_install_fork_state,
                initargs=((self, uploads, sums, shared, first),),
            )
            pending = [pool.submit(_sum_range_in_fork, bounds) for bounds in ranges[1:]]
            parts = [self.sum_range(uploads, *ranges[0], sums)]
            for (start, _), future in zip(ranges[1:], pending, strict=True):
                written, part_errors = future.result()
                at = (start - first) * chunk_bytes
                chunks = [
                    shared[at + i * chunk_bytes : at + (i + 1) * chunk_bytes]
                    for i in range(written)
                ]
                parts.append((chunks, part_errors))
        except BrokenProcessPool as err:
            raise RuntimeError(f"a process summing uploads died ({err})") from err
        finally:
            if pool is not None:  # let the workers exit: terminating them would trip
                pool.shutdown(wait=True)  # Ray's SIGTERM handler, inherited, into a dump
            shared.close()
        errors: dict[int, str] = {}
        for _, part_errors in parts:
            errors.update(part_errors)
        if not errors:
            return [chunk for part, _ in parts for chunk in part], errors
        # a bad upload was left out of some ranges only: say why as a serial sum would (a
        # range numbers its chunks from its start), and sum the good ones again
        for index in errors:
            errors[index] = self._refusal(uploads[index], num_chunks, errors[index])
        good = [upload for index, upload in enumerate(uploads) if index not in errors]
        total, _ = self._sum_sized(good, num_chunks, workers, sums)
        return total, errors

    def _refusal(self, chunks: list[bytes], num_chunks: int, reason: str) -> str:
        """Why a whole upload is refused; ``reason`` (a range's) if the whole parses."""
        return _refusal_of(self.formats.wire.parse_upload, chunks, num_chunks) or reason


def _refusal_of(function, *arguments) -> str | None:
    """Why ``function(*arguments)`` refuses one upload, or None if it does not.

    Whatever it raises is that upload's verdict, :data:`LOCAL_FAILURES` excepted.
    """
    try:
        function(*arguments)
    except CiphertextError as err:
        return str(err)
    except LOCAL_FAILURES:
        raise
    except Exception as err:  # noqa: BLE001 - one upload, one verdict
        return f"cannot be loaded or added to the others ({err!r})"[:300]
    return None


_fork_state: tuple[CkksAdder, list[list[bytes]], Sequence[list[bytes]], mmap.mmap, int] | None = (
    None  # set in forked summing workers only (_install_fork_state)
)


def _install_fork_state(state: tuple) -> None:
    global _fork_state
    _fork_state = state


def _sum_range_in_fork(bounds: tuple[int, int]) -> tuple[int, dict[int, str]]:
    """Sum a range in a forked worker, its chunks written to the shared memory.

    They go at the range's place after ``first`` (where the caller's own range ends);
    the count of chunks and the refused uploads are returned.
    """
    adder, uploads, sums, shared, first = _fork_state
    start, stop = int(bounds[0]), int(bounds[1])
    chunks, errors = adder.sum_range(uploads, start, stop, sums)
    at = (start - first) * adder.formats.exact.download_chunk_bytes
    shared[at : at + sum(map(len, chunks))] = b"".join(chunks)
    return len(chunks), errors
