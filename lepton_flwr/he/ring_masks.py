"""Uniform masks in the CKKS plaintext ring, expanded from 32-byte seeds (issue 20).

The building block of masking uploads in the ring (``docs/design_secure_aggregation.md``):
a mask is an element of R_Q = Z_Q[X]/(X^N + 1), held as SEAL holds ciphertexts and
plaintexts, one row of N words per RNS prime q_j of the level (NTT form; the NTT is a
bijection mod each prime, so a mask uniform in NTT form is uniform). Pairwise masks
cancel in a sum, self-masks are removed by whoever learns their seeds.

Each row is exactly uniform in [0, q_j): AES-256-CTR (``cryptography``) keyed by the
seed, read as 64-bit words cut to bit_length(q_j) bits, words >= q_j rejected (reducing a
64-bit word mod q_j instead would be biased by about 2^-24 for 40-bit primes). A ring
element takes all its rows from one stream (nonce from purpose, round and chunk); a row
in which a word would be rejected is replaced by a row rejection-sampled from a stream of
its own (nonce from purpose, round, prime and chunk). The output is a deterministic
function of the seed and the label.

Not Flower's ``pseudo_rand_gen``: it folds its seed to 32 bits and draws from numpy's
MT19937, neither of which hides a mask.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
MAX_PRIME_BITS = 62  # a + b of two residues stays below 2^63: no uint64 overflow


_ROW_NONCE = b"lepton-flwr ring mask nonce"  # one row, rejection-sampled
_ELEMENT_NONCE = b"lepton-flwr ring element nonce"  # every row of an element at once


def _stream(seed: bytes, label: bytes, size: int, domain: bytes = _ROW_NONCE) -> bytes:
    """``size`` bytes of AES-256-CTR keyed by ``seed``, nonce from ``domain`` and ``label``."""
    nonce = hashlib.sha256(domain + label).digest()[:16]
    return Cipher(algorithms.AES(seed), modes.CTR(nonce)).encryptor().update(bytes(size))


def uniform_mod(seed: bytes, label: bytes, prime: int, count: int) -> np.ndarray:
    """``count`` values exactly uniform in [0, prime), a function of (seed, label) only.

    Raises
    ------
    ValueError
        If the seed is not 32 bytes or the prime is not in [2, 2^62).
    """
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes")
    if not 2 <= prime < 1 << MAX_PRIME_BITS:
        raise ValueError(f"prime {prime} is outside [2, 2^{MAX_PRIME_BITS})")
    cut = np.uint64((1 << prime.bit_length()) - 1)
    bound = np.uint64(prime)
    # First the count words themselves: for a prime just below a power of two (the CKKS
    # data primes) none is rejected but about once in a thousand rows, and the row is them.
    words = np.frombuffer(_stream(seed, label, 8 * count), dtype="<u8") & cut
    if not (words >= bound).any():
        return words
    wanted = count + 64 + count // 32  # room for rejections (fewer than 1 in 2 words)
    while True:
        words = np.frombuffer(_stream(seed, label, 8 * wanted), dtype="<u8") & cut
        kept = words[words < bound]
        if len(kept) >= count:
            return kept[:count].copy()
        wanted *= 2  # a longer prefix of the same stream: the same first values


def sum_mod(elements, primes: list[int], degree: int) -> np.ndarray:
    """Σ elements mod q_j, row by row, each element already reduced (uint64).

    Adds without reducing while the sum cannot pass 2^64, then reduces once: about 30 times
    faster than one :func:`add_mod` per element for 40-bit primes.
    """
    q = _moduli(primes)
    per_batch = max(1, ((1 << 64) - 1) // (max(primes) - 1) - 1)
    total = np.zeros((len(primes), degree), dtype=np.uint64)
    batch = np.zeros_like(total)
    pending = 0
    for element in elements:
        batch += element
        pending += 1
        if pending == per_batch:
            total = add_mod(total, batch % q, primes)
            batch[:] = 0
            pending = 0
    return add_mod(total, batch % q, primes)


def ring_mask(
    seed: bytes, purpose: bytes, server_round: int, chunk: int, primes: list[int], degree: int
) -> np.ndarray:
    """A uniform element of R_Q for one ciphertext: shape (len(primes), degree), uint64.

    ``purpose`` names the mask's role (e.g. b"self", b"pair"), so that one seed never
    gives the same mask for two roles, rounds or chunks.
    """
    if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes")
    if not primes or any(not 2 <= q < 1 << MAX_PRIME_BITS for q in primes):
        raise ValueError(f"primes must be in [2, 2^{MAX_PRIME_BITS})")
    # One stream for every row, each row cut to its prime's bits. A row with a word >=
    # its prime (about one in a thousand for the CKKS data primes) is replaced by a row
    # rejection-sampled from its own stream: a row kept is uniform given that none of its
    # words was rejected, a row replaced is uniform, and the rows are independent.
    label = bytes([len(purpose)]) + purpose + struct.pack("<QQ", server_round, chunk)
    stream = _stream(seed, label, 8 * degree * len(primes), _ELEMENT_NONCE)
    words = np.frombuffer(stream, dtype="<u8").reshape(len(primes), degree)
    cuts = np.array([(1 << q.bit_length()) - 1 for q in primes], dtype=np.uint64)[:, None]
    words = words & cuts
    for index in np.nonzero((words >= _moduli(primes)).any(axis=1))[0]:
        row_label = purpose + struct.pack("<QQQ", server_round, index, chunk)
        words[index] = uniform_mod(seed, row_label, primes[index], degree)
    return words


def _moduli(primes: list[int]) -> np.ndarray:
    return np.array(primes, dtype=np.uint64)[:, None]


def add_mod(a: np.ndarray, b: np.ndarray, primes: list[int]) -> np.ndarray:
    """(a + b) mod q_j, row by row; a and b already reduced."""
    total = a + b
    q = _moduli(primes)
    return np.where(total >= q, total - q, total)


def sub_mod(a: np.ndarray, b: np.ndarray, primes: list[int]) -> np.ndarray:
    """(a − b) mod q_j, row by row; a and b already reduced."""
    q = _moduli(primes)
    return np.where(a >= b, a - b, a + (q - b))


def checked_ring_element(element: object, primes: list[int], degree: int, what: str) -> np.ndarray:
    """``element`` if it is a ring element of these primes: else a ValueError naming ``what``.

    A ring element is a uint64 array of shape (len(primes), degree) whose row j holds
    words below q_j. Anything else (another shape or dtype, a word >= its prime) would
    make the mask arithmetic wrap silently or SEAL refuse the plaintext far from the
    cause.

    Raises
    ------
    ValueError
        Starting with ``what`` and saying which property fails.
    """
    if not isinstance(element, np.ndarray):
        raise ValueError(f"{what} is a {type(element).__name__}, not a numpy array")
    if element.dtype != np.uint64:
        raise ValueError(f"{what} has dtype {element.dtype}, not uint64")
    if element.shape != (len(primes), degree):
        raise ValueError(f"{what} has shape {element.shape}, not {(len(primes), degree)}")
    over = element >= _moduli(primes)
    if over.any():
        row, column = (int(i[0]) for i in np.nonzero(over))
        raise ValueError(
            f"{what} has {int(over.sum())} words not below their prime "
            f"(first: row {row}, word {column}, value {int(element[row, column])} "
            f">= {primes[row]})"
        )
    return element
