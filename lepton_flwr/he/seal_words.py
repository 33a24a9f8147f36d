"""The uint64 words of SEAL plaintexts and ciphertexts, read out and written back.

TenSEAL's ``sealapi`` reads a SEAL object one word at a time and writes none: its objects
have no buffer view, and ``save`` always compresses (zstd, which Python 3.11 cannot
read). To build an object from words, this module writes SEAL's own *uncompressed*
serialization and ``load``s it, so SEAL checks what it gets (a word >= its prime, a
parms_id the context does not know, or sizes that disagree are refused by ``load``).

The layout (SEAL 4.x, ``serialization.h`` and ``save_members`` of each class):

- a 16-byte header: magic 0xA15E (u16), header size 16 (u8), version major and minor
  (u8 each; ``load`` refuses another version, so they are taken from the library's own
  ``SEALHeader``), compression mode 0 = none (u8), reserved (u16), total size (u64);
- Plaintext: parms_id (4 x u64), coefficient count (u64), scale (f64), then a DynArray;
- Ciphertext: parms_id (4 x u64), NTT flag (u8), size, N, RNS prime count (u64 each),
  scale (f64), correction factor (u64), then a DynArray;
- DynArray: its own header, word count (u64), the words (u64, little-endian).

Words are laid out as SEAL holds them: a plaintext at a level with k primes is k rows of
N words (one per prime, NTT form for CKKS); a ciphertext is ``size`` such polynomials.
"""

from __future__ import annotations

import errno
import os
import struct
import tempfile
import threading
import zlib
from contextlib import suppress

import numpy as np
import tenseal.sealapi as sealapi
import zstandard

from lepton_flwr.he.keys import scratch_base, scratch_dir

_HEADER = struct.Struct("<HBBBBHQ")
_COMPRESSION_NONE, _COMPRESSION_ZLIB, _COMPRESSION_ZSTD = 0, 1, 2


def seal_version() -> tuple[int, int]:
    """The (major, minor) version SEAL writes into its headers and requires on load."""
    header = sealapi.Serialization.SEALHeader()
    return int(header.version_major), int(header.version_minor)


def _framed(body: bytes) -> bytes:
    """``body`` behind an uncompressed SEAL header that counts itself."""
    header = sealapi.Serialization.SEALHeader()
    total = _HEADER.size + len(body)
    return (
        _HEADER.pack(
            int(header.magic),
            int(header.header_size),
            int(header.version_major),
            int(header.version_minor),
            _COMPRESSION_NONE,
            0,
            total,
        )
        + body
    )


def _dyn_array(words: np.ndarray) -> bytes:
    data = np.ascontiguousarray(words, dtype="<u8").ravel()
    return _framed(struct.pack("<Q", data.size) + data.tobytes())


def plaintext_bytes(words: np.ndarray, parms_id, scale: float) -> bytes:
    """Uncompressed SEAL serialization of a plaintext holding ``words`` (k rows of N)."""
    body = struct.pack("<4Q", *parms_id) + struct.pack("<Qd", words.size, scale)
    return _framed(body + _dyn_array(words))


CIPHERTEXT_FIELDS = struct.Struct("<4QBQQQdQ")
"""A serialized ciphertext's fields before its words: parms_id, NTT flag, size, N, k,
scale, correction factor."""


def ciphertext_bytes(words: np.ndarray, parms_id, scale: float, ntt_form: bool = True) -> bytes:
    """Uncompressed SEAL serialization of a ciphertext, ``words`` shaped (size, k, N)."""
    size, primes, degree = words.shape
    body = CIPHERTEXT_FIELDS.pack(*parms_id, int(ntt_form), size, degree, primes, scale, 1)
    return _framed(body + _dyn_array(words))


class _ScratchFile:
    """A file of its own for SEAL's file-only (de)serialization, closed with this object.

    On Linux an anonymous file (``O_TMPFILE``, mode 0600, on the file system of
    :func:`~lepton_flwr.he.keys.scratch_base`, named in no folder) that SEAL opens as
    ``/proc/self/fd/N``: nothing can find it but the process's own user through
    ``/proc``, and it goes when closed or when the process ends, however it ends; no
    folder is made. Elsewhere a file of a unique name (``mkstemp``, mode 0600) in the
    process's scratch folder (:func:`~lepton_flwr.he.keys.scratch_dir`), removed when
    closed.
    """

    def __init__(self):
        self.pid, self.named = os.getpid(), None
        self.prefix: tuple[bytes, int] | None = None  # what load_prefixed left in the file
        self.fd = _anonymous_file(scratch_base())
        if self.fd is None:
            self.fd, self.named = tempfile.mkstemp(prefix="words-", dir=str(scratch_dir()))
            self.path = self.named
        else:
            self.path = f"/proc/self/fd/{self.fd}"

    def __del__(self):
        if self.pid == os.getpid():  # a forked child leaves its parent's file alone
            os.close(self.fd)
            if self.named is not None:
                with suppress(OSError):
                    os.unlink(self.named)


def _anonymous_file(folder: str) -> int | None:
    """An ``O_TMPFILE`` file in ``folder`` that ``/proc/self/fd`` reopens, or None."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, flag | os.O_RDWR, 0o600)
    except OSError:  # a file system without anonymous files
        return None


_per_thread = threading.local()


def _zstd() -> zstandard.ZstdDecompressor:
    """The calling thread's zstd decompressor (made once: about a third of a small read)."""
    decompressor = getattr(_per_thread, "zstd", None)
    if decompressor is None:
        decompressor = _per_thread.zstd = zstandard.ZstdDecompressor()
    return decompressor


def _scratch() -> _ScratchFile:
    """The calling thread's scratch file, opened once and written over each time.

    It holds the last object saved or loaded until the thread ends (:class:`_ScratchFile`):
    in the library, ciphertexts and public keys, never a decryption
    (``tests/test_hostile_files.py::test_no_decryption_passes_through_the_seal_scratch_files``;
    tests read plaintexts through :func:`plaintext_words`).
    """
    scratch = getattr(_per_thread, "file", None)
    if scratch is None or scratch.pid != os.getpid():  # first use, or a forked child
        scratch = _per_thread.file = _ScratchFile()
    return scratch


def save_bytes(obj) -> bytes:
    """A SEAL object's serialization (the binding only writes files: a RAM-backed one)."""
    scratch = _scratch()
    scratch.prefix = None
    obj.save(scratch.path)
    return os.pread(scratch.fd, os.fstat(scratch.fd).st_size, 0)


def _write(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset``; a short write (a full file system) raises."""
    written = os.pwrite(fd, data, offset)
    if written != len(data):
        raise OSError(
            errno.ENOSPC, f"SEAL's scratch file took {written} of {len(data)} bytes (space?)"
        )


def _rewrite(scratch: _ScratchFile, blob: bytes) -> None:
    """Make ``blob`` the scratch file's whole content; the kept prefix is forgotten first."""
    scratch.prefix = None
    os.ftruncate(scratch.fd, 0)
    _write(scratch.fd, blob, 0)


def load_bytes(obj, seal_context, blob: bytes):
    """``obj.load`` from bytes (the binding only reads files); SEAL checks them.

    Raises
    ------
    OSError
        If the scratch file cannot take the bytes (this machine's failure, not the
        bytes': :data:`lepton_flwr.he.codec.LOCAL_FAILURES`).
    """
    scratch = _scratch()
    _rewrite(scratch, blob)
    obj.load(seal_context, scratch.path)
    return obj


def load_prefixed(obj, seal_context, prefix: bytes, tail: bytes):
    """``obj.load`` from ``prefix + tail``, writing only ``tail`` while ``prefix`` repeats.

    For many loads that differ in their last bytes alone (seeded ciphertexts: 64 kB of
    fields and zero words, then a 64-byte seed): the calling thread's scratch file keeps
    the last prefix it was given, with a tail of the same length, and a call with that
    prefix (the same bytes) and such a tail writes the tail over the old one. Anything
    else written to the file (:func:`save_bytes`, :func:`load_bytes`) forgets the prefix.
    SEAL checks what it loads, as with :func:`load_bytes`.
    """
    scratch = _scratch()
    if scratch.prefix is not None and scratch.prefix == (prefix, len(tail)):
        _write(scratch.fd, tail, len(prefix))
    else:
        _rewrite(scratch, prefix + tail)
        scratch.prefix = (prefix, len(tail))
    obj.load(seal_context, scratch.path)
    return obj


def plaintext_from_words(
    seal_context, words: np.ndarray, parms_id, scale: float
) -> sealapi.Plaintext:
    """A SEAL plaintext holding ``words`` (k rows of N), at ``parms_id`` and ``scale``.

    Raises
    ------
    RuntimeError, ValueError
        From SEAL's ``load``, if a word is not below its prime or the parms_id and word
        count do not fit the context.
    """
    return load_bytes(sealapi.Plaintext(), seal_context, plaintext_bytes(words, parms_id, scale))


def ciphertext_from_words(
    seal_context, words: np.ndarray, parms_id, scale: float, ntt_form: bool = True
) -> sealapi.Ciphertext:
    """A SEAL ciphertext holding ``words`` (size, k, N), at ``parms_id`` and ``scale``."""
    blob = ciphertext_bytes(words, parms_id, scale, ntt_form)
    return load_bytes(sealapi.Ciphertext(seal_context), seal_context, blob)


def plaintext_words(plain: sealapi.Plaintext, degree: int) -> np.ndarray:
    """A plaintext's words as (coeff_count / degree, degree) uint64 (a copy).

    ``sealapi`` has no bulk read, and reading word by word costs about 0.35 µs a word
    (8.5 ms for a plaintext of three 8192-word rows); SEAL's own ``save``, read back and
    decompressed, about a quarter of that. The words are checked against the count the
    plaintext reports.
    """
    total = plain.coeff_count()
    if total % degree:
        raise ValueError(f"a plaintext of {total} words is not rows of {degree}")
    body = _unframed(save_bytes(plain))
    # parms_id (4 x u64), coefficient count (u64), scale (f64), then the DynArray
    words = np.frombuffer(_unframed(body[48:]), dtype="<u8", offset=8)
    if words.size != total or int.from_bytes(body[32:40], "little") != total:
        raise ValueError(f"the saved plaintext holds {words.size} words, not {total}")
    return words.astype(np.uint64).reshape(total // degree, degree)


def _unframed(blob: bytes) -> bytes:
    """The body behind a SEAL header, decompressed (SEAL saves with zstd or zlib)."""
    magic, header_size, _, _, mode, _, size = _HEADER.unpack_from(blob)
    if magic != int(sealapi.Serialization.SEALHeader().magic) or size > len(blob):
        raise ValueError("not a SEAL serialization")
    body = blob[header_size:size]
    if mode == _COMPRESSION_NONE:
        return body
    if mode == _COMPRESSION_ZLIB:
        return zlib.decompress(body)
    if mode == _COMPRESSION_ZSTD:
        return _zstd().decompressobj().decompress(body)
    raise ValueError(f"unknown SEAL compression mode {mode}")


def ciphertext_words(ciphertext: sealapi.Ciphertext) -> np.ndarray:
    """A (non-seeded) ciphertext's words as (size, k, N) uint64 (a copy), from its save."""
    body = _unframed(save_bytes(ciphertext))
    fields = CIPHERTEXT_FIELDS.unpack_from(body)
    size, degree, primes = fields[5:8]
    words = np.frombuffer(_unframed(body[CIPHERTEXT_FIELDS.size :]), dtype="<u8", offset=8)
    return words.reshape(size, primes, degree).astype(np.uint64)
