"""Packed ciphertexts: c0 as bit-packed integers mod Q, c1 as a seed up and as words down.

The wire format of issue 22's goal 4 (``docs/design_ciphertext_size.md``, steps 2 and 3),
independent of how values are encoded into slots. A ciphertext (c0, c1) at the first data
level has one row of N words per data prime q_j, both polynomials in NTT form as SEAL
holds them. This module sends

- **up** (a client's fresh secret-key ciphertext): c0 in *coefficient* form as one integer
  x < Q = Π q_j per coefficient (the CRT of its residues), its ``d_up`` low bits rounded
  off, bit-packed; then the 64-byte seed from which SEAL regenerates c1;
- **down** (the server's sum): the sum's c0 the same way at ``d_down``, then the sum's c1
  as its NTT residues bit-packed at the primes' widths, never rounded (an error in c1 is
  multiplied by the secret key when decrypting).

**Rounding.** ``round_off`` sends y = round(x / 2^d), ties to even, and 0 where y * 2^d
would reach Q (Q stands for 0; it cannot happen for CKKS primes, which are 1 mod 2N, so
Q = 1 mod 2^13), so y <= ceil(Q / 2^d) - 1. The receiver restores y * 2^d: it lies
within 2^(d-1) of x mod Q. c0 is uniform mod Q (it hides the message under -a*s with a
uniform), so the error of a coefficient is uniform on that interval, of mean 0 and
variance ``rounding_variance(d)``. What that does to the flooding, and so how far d may go,
is stated in :mod:`lepton_flwr.he.publish` (``MAX_UPLOAD_DROP``, ``summed_limit``).

**Layout.** All integers are little-endian. A packed integer polynomial of width w bits
(w = ``coefficient_width(d)`` = bit length of ceil(Q / 2^d) - 1) is, for w > 64, the N low
64-bit halves as N u64 words, then the N high parts (w - 64 bits each) as a bitstream; for
w <= 64 only the bitstream. A bitstream of b-bit fields puts field i at bits
[i*b, (i+1)*b), bit k of the stream being bit k % 8 of byte k // 8. Residues of c1 are one
bitstream per prime at that prime's bit length. An upload chunk is
``c0 ‖ seed`` (N*w_up/8 + 64 bytes), a download chunk ``c0 ‖ c1`` (N*w_down/8 + N*Σ bits(q_j)/8).

**Checks.** Unpacking refuses (with :class:`~lepton_flwr.he.codec.CiphertextError` naming
the chunk) a chunk of the wrong length, a c0 word >= ceil(Q / 2^d) and a c1 word >= its
prime; nothing else can be wrong: every metadata field of a SEAL ciphertext (level,
scale, size, NTT flag) is fixed by the format, and any 64 bytes are a seed.

**Arithmetic.** numpy has no 128-bit integers: an integer below 2^128 is held as two
uint64 arrays (hi, lo), and products use 32-bit limbs (:func:`_mul_wide`); reductions mod a
prime use Shoup's precomputed quotients (no ``%``, about ten times slower than a
multiplication in numpy). The server adds the uploads' words y as integers, without
reducing (a sum of up to 2^45 uploads fits), and reduces once when it packs the sum.

Supported contexts: one or two data primes with Q < 2^127 (the CRT of two residues is one
mixed-radix step), as the pack's parameters are (two 40-bit primes, Q ~ 2^80, N = 4096).
The forward and inverse NTT, and the expansion of seeds, are SEAL's own (through its
uncompressed serialization, :mod:`lepton_flwr.he.seal_words`), so the words are exactly
those SEAL computes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from lepton_flwr.he.codec import CiphertextError
from lepton_flwr.he.publish import (
    MAX_DOWNLOAD_DROP,
    MAX_UPLOAD_DROP,
    check_summed,
)
from lepton_flwr.he.ring_masks import add_mod, checked_ring_element, sub_mod
from lepton_flwr.he.seal_words import (
    _HEADER,
    CIPHERTEXT_FIELDS,
    _framed,
    _unframed,
    ciphertext_from_words,
    ciphertext_words,
    load_prefixed,
)

D_UP = 4
"""Low bits of c0 dropped on the way up: the most the flooding covers (``MAX_UPLOAD_DROP``)."""
D_DOWN = 12
"""Low bits of the sum's c0 dropped on the way down (``MAX_DOWNLOAD_DROP``)."""
SEED_BYTES = 64
"""SEAL's PRNG seed (8 x u64) that regenerates c1 of a seeded ciphertext."""

_BLAKE2XB = 1  # sealapi.prng_type.blake2xb: the PRNG of SEAL's seeded ciphertexts
_SEAL_MAX_SIZE = 16  # SEAL_CIPHERTEXT_SIZE_MAX: polynomials in one SEAL ciphertext
_M32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)

Polys = np.ndarray
"""Residues of polynomials: uint64, shape (..., k, N), row j below the j-th prime."""
Wide = tuple[np.ndarray, np.ndarray]
"""Integers below 2^128 as (hi, lo) uint64 arrays of one shape."""


# ---- 128-bit arithmetic in numpy ------------------------------------------------------------


def _u64(value: int) -> np.uint64:
    return np.uint64(value & 0xFFFFFFFFFFFFFFFF)


def _mul_wide(a: np.ndarray, b: int) -> Wide:
    """The exact product a * b of uint64 ``a`` and an integer 0 <= b < 2^64, as (hi, lo)."""
    a0, a1 = a & _M32, a >> _S32
    b0, b1 = _u64(b & 0xFFFFFFFF), _u64(b >> 32)
    p00, p10 = a0 * b0, a1 * b0
    if b >> 32:
        p01, p11 = a0 * b1, a1 * b1
        mid = (p00 >> _S32) + (p01 & _M32) + (p10 & _M32)
        hi = p11 + (p01 >> _S32) + (p10 >> _S32) + (mid >> _S32)
    else:
        mid = (p00 >> _S32) + (p10 & _M32)
        hi = (p10 >> _S32) + (mid >> _S32)
    return hi, (p00 & _M32) | (mid << _S32)


def _minus_if_over(r: np.ndarray, q: int) -> np.ndarray:
    """Subtract q where r >= q (r < 2q): r - q wraps above r exactly when r < q."""
    return np.minimum(r, r - _u64(q))


class _Shoup:
    """(a * c) mod q for uint64 ``a`` and a constant c < q < 2^63, without division.

    With c' = floor(c * 2^64 / q), the high word of a * c' is floor(a * c / q) or one
    less (Shoup), so a * c - that * q, computed mod 2^64, is in [0, 2q).
    """

    def __init__(self, c: int, q: int):
        self.c, self.q, self.shoup = c % q, q, ((c % q) << 64) // q

    def __call__(self, a: np.ndarray) -> np.ndarray:
        quotient, _ = _mul_wide(a, self.shoup)
        r = a * _u64(self.c) - quotient * _u64(self.q)
        return _minus_if_over(r, self.q)


def _add_wide(x: Wide, y: Wide) -> Wide:
    lo = x[1] + y[1]
    return x[0] + y[0] + (lo < y[1]), lo


def _add_wide_into(x: Wide, y: Wide) -> None:
    """Add y to x (mod 2^128) in x's own arrays (no temporary of x's size but the carry)."""
    np.add(x[1], y[1], out=x[1])
    np.add(x[0], y[0], out=x[0])
    np.add(x[0], x[1] < y[1], out=x[0], casting="unsafe")  # the carry out of lo


def _sub_wide(x: Wide, y: Wide) -> Wide:
    """The difference x - y mod 2^128."""
    lo = x[1] - y[1]
    return x[0] - y[0] - (x[1] < y[1]), lo


def _split(value: int) -> tuple[np.uint64, np.uint64]:
    return _u64(value >> 64), _u64(value)


_BLOCK = 8  # polynomials per vectorised step: temporaries stay in cache (5-10x faster)


def _blocked(function, *arguments):
    """``function`` over blocks of ``_BLOCK`` along the first axis, results concatenated.

    Each argument is an array or a :data:`Wide` pair, all of one length along axis 0;
    the result is an array or a tuple of arrays.
    """
    first = arguments[0][0] if isinstance(arguments[0], tuple) else arguments[0]
    total = len(first)
    if total <= _BLOCK:
        return function(*arguments)
    parts = []
    for start in range(0, total, _BLOCK):
        stop = start + _BLOCK
        parts.append(
            function(
                *(
                    tuple(a[start:stop] for a in argument)
                    if isinstance(argument, tuple)
                    else argument[start:stop]
                    for argument in arguments
                )
            )
        )
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(column) for column in zip(*parts, strict=True))
    return np.concatenate(parts)


# ---- bitstreams of fixed-width fields --------------------------------------------------------


def _words_of(blobs: np.ndarray) -> np.ndarray:
    """uint8 rows (..., 8m) read as uint64 words (..., m): a view where the rows allow it.

    A view of a read-only table stays read-only: nothing is written through it.
    """
    if blobs.strides[-1] != 1 or any(stride % 8 for stride in blobs.strides[:-1]):
        blobs = np.ascontiguousarray(blobs)
    words = blobs.view("<u8")
    return words if words.dtype == np.uint64 else words.astype(np.uint64)  # a big-endian host


def _pack_fields(values: np.ndarray, bits: int) -> np.ndarray:
    """Fields of ``bits`` bits (1..64) along the last axis (a multiple of 64) -> u64 words.

    The words, little-endian, are the bitstream of the module's layout. Values must be
    below 2^bits.
    """
    *lead, count_ = values.shape
    if bits == 64:
        return values
    group = 8 // math.gcd(bits, 8)  # fields combined into one word, to end on a byte
    if group * bits <= 64:
        combined = values.reshape(*lead, count_ // group, group)
        word = combined[..., 0].copy()
        for i in range(1, group):
            word |= combined[..., i] << np.uint64(i * bits)
        width = group * bits // 8
        as_bytes = word.view(np.uint8).reshape(*lead, count_ // group, 8)[..., :width]
        return np.ascontiguousarray(as_bytes).reshape(*lead, count_ * bits // 8).view("<u8")
    fields = values.reshape(*lead, count_ // 64, 64)
    out = np.zeros((*lead, count_ // 64, bits), dtype=np.uint64)
    for i in range(64):
        word, shift = divmod(i * bits, 64)
        out[..., word] |= fields[..., i] << np.uint64(shift)
        if shift + bits > 64:
            out[..., word + 1] |= fields[..., i] >> np.uint64(64 - shift)
    return out.reshape(*lead, count_ * bits // 64)


def _unpack_fields(words: np.ndarray, bits: int, count_: int) -> np.ndarray:
    """Inverse of :func:`_pack_fields`: (..., count * bits / 64) words -> (..., count)."""
    *lead, _ = words.shape
    if bits == 64:
        return words
    group = 8 // math.gcd(bits, 8)
    if group * bits <= 64:  # each group of fields is `width` whole bytes: put them together
        width = group * bits // 8
        kind = np.uint32 if width <= 4 else np.uint64
        as_bytes = np.ascontiguousarray(words).view(np.uint8).reshape(*lead, count_ // group, width)
        word = as_bytes[..., 0].astype(kind)
        for i in range(1, width):
            word |= as_bytes[..., i].astype(kind) << kind(8 * i)
        mask = kind((1 << bits) - 1)
        if group == 1:
            return (word & mask).astype(np.uint64, copy=False).reshape(*lead, count_)
        out = np.empty((*lead, count_ // group, group), dtype=np.uint64)
        for i in range(group):
            out[..., i] = (word >> kind(i * bits)) & mask
        return out.reshape(*lead, count_)
    mask = _u64((1 << bits) - 1)
    stream = words.reshape(*lead, count_ // 64, bits)
    out = np.empty((*lead, count_ // 64, 64), dtype=np.uint64)
    for i in range(64):
        word, shift = divmod(i * bits, 64)
        field = stream[..., word] >> np.uint64(shift)
        if shift + bits > 64:
            field |= stream[..., word + 1] << np.uint64(64 - shift)
        out[..., i] = field & mask
    return out.reshape(*lead, count_)


# ---- integers mod Q <-> residues, rounding, packing ------------------------------------------


class CoefficientPacker:
    """Polynomials mod Q = Π primes in coefficient form <-> bit-packed integers.

    Parameters
    ----------
    primes : Sequence[int]
        The data primes (one or two, their product below 2^127).
    degree : int
        N, a multiple of 64.

    Raises
    ------
    ValueError
        For more than two primes, Q >= 2^127 or N not a multiple of 64.
    """

    def __init__(self, primes: Sequence[int], degree: int):
        primes = [int(q) for q in primes]
        modulus = math.prod(primes)
        if not 1 <= len(primes) <= 2 or modulus >= 1 << 127 or min(primes) < 3:
            raise ValueError(
                f"the packed format takes one or two data primes with a product below "
                f"2^127, not {primes}"
            )
        if degree % 64 or degree <= 0:
            raise ValueError(f"N = {degree} is not a positive multiple of 64")
        self.primes, self.degree, self.modulus = primes, degree, modulus
        self.prime_bits = [(q - 1).bit_length() for q in primes]
        self._modulus_float = float(modulus)
        self._lo_reducers = [_Shoup(1, q) for q in primes]
        self._hi_reducers = [_Shoup(1 << 64, q) for q in primes]
        if len(primes) == 2:
            q1, q2 = primes
            self._crt = _Shoup(pow(q1, -1, q2), q2)
            self._q1_mod_q2 = _Shoup(1, q2) if q1 > q2 else None

    # -- sizes and limits

    def limit(self, drop: int) -> int:
        """ceil(Q / 2^drop): every packed word at this drop is below it."""
        return -(-self.modulus >> drop)

    def coefficient_width(self, drop: int) -> int:
        """Bits a coefficient takes at this drop: the bit length of limit(drop) - 1."""
        return (self.limit(drop) - 1).bit_length()

    def polynomial_bytes(self, drop: int) -> int:
        """Bytes of one packed polynomial of N coefficients at this drop."""
        return self.degree * self.coefficient_width(drop) // 8

    def residue_bytes(self) -> int:
        """Bytes of one polynomial's residues, one bitstream per prime."""
        return self.degree * sum(self.prime_bits) // 8

    def _check_drop(self, drop: int) -> None:
        if not 0 <= drop <= 32 or self.coefficient_width(drop) < 1:
            raise ValueError(f"cannot drop {drop} bits of a {self.modulus.bit_length()}-bit Q")

    # -- public operations: a leading batch axis, worked through in blocks of _BLOCK

    def compose(self, residues: Polys) -> Wide:
        """Residues (B, k, N), row j below q_j -> the integers x < Q they stand for (CRT)."""
        return _blocked(self._compose_block, residues)

    def residues(self, x: Wide) -> Polys:
        """Integers x < 2^128 as (hi, lo), each (B, N) -> residues (B, k, N) mod each prime."""
        return _blocked(self._residues_block, x)

    def reduce(self, x: Wide) -> Wide:
        """Reduce x < 2^45 * Q (each (B, N)) mod Q."""
        return _blocked(self._reduce_block, x)

    def round_off(self, x: Wide, drop: int) -> Wide:
        """Round x < Q (each (B, N)) to y = round(x / 2^drop), ties to even; 0 if y * 2^drop >= Q.

        y < ``limit(drop)``, and y * 2^drop - x (mod Q) lies in [-2^(drop-1), 2^(drop-1)].
        """
        self._check_drop(drop)
        if drop == 0:
            return x
        return _blocked(lambda block: self._round_off_block(block, drop), x)

    @staticmethod
    def restore(y: Wide, drop: int) -> Wide:
        """The integer y * 2^drop (mod 2^128) that a word packed at ``drop`` stands for."""
        if drop == 0:
            return y
        d = np.uint64(drop)
        return (y[0] << d) | (y[1] >> np.uint64(64 - drop)), y[1] << d

    def pack(self, y: Wide, drop: int) -> np.ndarray:
        """Words y < limit(drop), each (B, N) -> uint8 (B, polynomial_bytes(drop))."""
        self._check_drop(drop)
        return _blocked(lambda block: self._pack_block(block, drop), y)

    def unpack(self, blobs: np.ndarray, drop: int) -> Wide:
        """Inverse of :meth:`pack` for uint8 (B, polynomial_bytes(drop)); no range check.

        Raises
        ------
        CiphertextError
            If the rows are not ``polynomial_bytes(drop)`` long.
        """
        self._check_drop(drop)
        if blobs.shape[-1] != self.polynomial_bytes(drop):
            raise CiphertextError(
                f"a packed polynomial has {blobs.shape[-1]} bytes, not "
                f"{self.polynomial_bytes(drop)}"
            )
        return self._unpack_block(blobs, drop)  # no temporaries to keep in cache

    def out_of_range(self, y: Wide, drop: int) -> np.ndarray:
        """Which rows of y (B, N) hold a word >= limit(drop): bool (B,)."""
        top_hi, top_lo = _split(self.limit(drop) - 1)
        hi, lo = y
        if hi.size == 0 or hi.max() < top_hi:
            return np.zeros(hi.shape[:-1], dtype=bool)
        return ((hi > top_hi) | ((hi == top_hi) & (lo > top_lo))).any(axis=-1)

    def pack_residues(self, residues: Polys) -> np.ndarray:
        """Residues (B, k, N) -> uint8 (B, residue_bytes()), one bitstream per prime."""
        return _blocked(self._pack_residues_block, residues)

    def unpack_residues(self, blobs: np.ndarray) -> Polys:
        """Inverse of :meth:`pack_residues`; no range check (:meth:`residues_out_of_range`).

        Raises
        ------
        CiphertextError
            If the rows are not ``residue_bytes()`` long.
        """
        if blobs.shape[-1] != self.residue_bytes():
            raise CiphertextError(
                f"packed residues have {blobs.shape[-1]} bytes, not {self.residue_bytes()}"
            )
        return self._unpack_residues_block(blobs)

    def residues_out_of_range(self, residues: Polys) -> np.ndarray:
        """Which polynomials (B, k, N) have a word >= its prime: bool (B,)."""
        primes = np.array(self.primes, dtype=np.uint64)[:, None]
        return (residues >= primes).any(axis=(-2, -1))

    # -- one block each

    def _compose_block(self, residues: Polys) -> Wide:
        if len(self.primes) == 1:
            lo = residues[:, 0, :]
            return np.zeros_like(lo), lo.copy()
        r1, r2 = residues[:, 0, :], residues[:, 1, :]
        q1, q2 = self.primes
        r1_mod_q2 = r1 if self._q1_mod_q2 is None else self._q1_mod_q2(r1)
        difference = r2 - r1_mod_q2
        difference = np.minimum(difference, difference + _u64(q2))  # (r2 - r1) mod q2
        hi, lo = _mul_wide(self._crt(difference), q1)  # x = r1 + q1 * t, t < q2
        return _add_wide((hi, lo), (np.zeros_like(r1), r1))

    def _residues_block(self, x: Wide) -> Polys:
        hi, lo = x
        rows = []
        for q, low, high in zip(self.primes, self._lo_reducers, self._hi_reducers, strict=True):
            rows.append(_minus_if_over(low(lo) + high(hi), q))
        return np.stack(rows, axis=-2)

    def _reduce_block(self, x: Wide) -> Wide:
        # the quotient estimated in float64 (off by at most one below 2^45), then corrected
        hi, lo = x
        estimate = hi.astype(np.float64) * 2.0**64 + lo.astype(np.float64)
        quotient = np.floor(estimate / self._modulus_float).astype(np.uint64)
        big_hi, big_lo = _split(self.modulus)
        product_hi, product_lo = _mul_wide(quotient, int(big_lo))
        product_hi = product_hi + quotient * big_hi
        r_hi, r_lo = _sub_wide((hi, lo), (product_hi, product_lo))
        modulus = (np.full_like(r_hi, big_hi), np.full_like(r_lo, big_lo))
        negative = (r_hi >> np.uint64(63)).astype(bool)  # the estimate was one too high
        if negative.any():
            fixed = _add_wide((r_hi, r_lo), modulus)
            r_hi, r_lo = np.where(negative, fixed[0], r_hi), np.where(negative, fixed[1], r_lo)
        over = (r_hi > big_hi) | ((r_hi == big_hi) & (r_lo >= big_lo))  # one too low
        if over.any():
            fixed = _sub_wide((r_hi, r_lo), modulus)
            r_hi, r_lo = np.where(over, fixed[0], r_hi), np.where(over, fixed[1], r_lo)
        return r_hi, r_lo

    def _round_off_block(self, x: Wide, drop: int) -> Wide:
        hi, lo = x
        half = _u64(1 << (drop - 1))
        shifted_hi, shifted_lo = _add_wide((hi, lo), (np.zeros_like(hi), np.full_like(lo, half)))
        d = np.uint64(drop)
        y_lo = (shifted_lo >> d) | (shifted_hi << np.uint64(64 - drop))
        y_hi = shifted_hi >> d
        tie = (lo & _u64((1 << drop) - 1)) == half  # exactly half way: to the even word
        y_lo = y_lo - (tie & (y_lo & np.uint64(1)).astype(bool)).astype(np.uint64)
        top_hi, top_lo = _split(self.limit(drop))  # the multiple equal to Q: 0 mod Q
        wrap = (y_hi == top_hi) & (y_lo == top_lo)
        if wrap.any():
            y_hi, y_lo = np.where(wrap, 0, y_hi), np.where(wrap, 0, y_lo)
        return y_hi.astype(np.uint64), y_lo.astype(np.uint64)

    def _pack_block(self, y: Wide, drop: int) -> np.ndarray:
        width = self.coefficient_width(drop)
        hi, lo = y
        if width > 64:
            low = np.ascontiguousarray(lo, dtype="<u8").view(np.uint8)
            high = _pack_fields(hi, width - 64).view(np.uint8)
            return np.concatenate([low, high], axis=-1)
        return _pack_fields(lo, width).view(np.uint8)

    def _unpack_block(self, blobs: np.ndarray, drop: int) -> Wide:
        width, n = self.coefficient_width(drop), self.degree
        if width > 64:
            lo = _words_of(blobs[:, : 8 * n])
            high = np.ascontiguousarray(blobs[:, 8 * n :]).view("<u8")
            return _unpack_fields(high, width - 64, n), lo
        lo = _unpack_fields(np.ascontiguousarray(blobs).view("<u8"), width, n)
        return np.zeros_like(lo), lo

    def _pack_residues_block(self, residues: Polys) -> np.ndarray:
        rows = [
            _pack_fields(residues[:, j, :], bits).view(np.uint8)
            for j, bits in enumerate(self.prime_bits)
        ]
        return np.concatenate(rows, axis=-1)

    def _unpack_residues_block(self, blobs: np.ndarray) -> Polys:
        rows, start = [], 0
        for bits in self.prime_bits:
            size = self.degree * bits // 8
            words = np.ascontiguousarray(blobs[:, start : start + size]).view("<u8")
            rows.append(_unpack_fields(words, bits, self.degree).astype(np.uint64, copy=False))
            start += size
        return np.stack(rows, axis=-2)


# ---- SEAL ciphertexts and their words -----------------------------------------------------


@dataclass(frozen=True)
class Ring:
    """The first data level of a CKKS context: where uploads are made and sums are added."""

    seal_context: object
    parms_id: tuple[int, ...]
    primes: tuple[int, ...]
    degree: int
    scale: float

    @classmethod
    def of(cls, context: ts.Context) -> Ring:
        """The ring of a TenSEAL context (secret or public)."""
        seal_context = context.seal_context().data
        parms = seal_context.first_context_data().parms()
        return cls(
            seal_context,
            tuple(int(p) for p in seal_context.first_parms_id()),
            tuple(int(m.value()) for m in parms.coeff_modulus()),
            int(parms.poly_modulus_degree()),
            float(context.global_scale),
        )

    def meta(self, size: int, ntt_form: bool) -> bytes:
        """The fields of a serialized ciphertext of ``size`` polynomials before its words."""
        return CIPHERTEXT_FIELDS.pack(
            *self.parms_id, int(ntt_form), size, self.degree, len(self.primes), self.scale, 1
        )

    def ciphertext(self, words: np.ndarray, ntt_form: bool) -> sealapi.Ciphertext:
        """A SEAL ciphertext holding ``words`` (size, k, N) at this level and scale."""
        return ciphertext_from_words(
            self.seal_context, words, list(self.parms_id), self.scale, ntt_form
        )

    def transform(self, polys: Polys, to_ntt: bool) -> Polys:
        """SEAL's negacyclic NTT (``to_ntt``) or its inverse of each polynomial (B, k, N).

        Up to 15 polynomials travel in one SEAL ciphertext, with a polynomial of ones
        last: SEAL refuses to transform a ciphertext whose polynomials after the first
        are all zero ("transparent").
        """
        polys = np.asarray(polys, dtype=np.uint64)
        guard = np.ones((1, len(self.primes), self.degree), dtype=np.uint64)
        out = np.empty_like(polys)
        per = _SEAL_MAX_SIZE - 1
        for start in range(0, len(polys), per):
            group = polys[start : start + per]
            ciphertext = self.ciphertext(np.concatenate([group, guard]), ntt_form=not to_ntt)
            if to_ntt:
                self._evaluator.transform_to_ntt_inplace(ciphertext)
            else:
                self._evaluator.transform_from_ntt_inplace(ciphertext)
            out[start : start + per] = ciphertext_words(ciphertext)[: len(group)]
        return out

    def mixed(self, c0: Polys, c1: Polys) -> sealapi.Ciphertext:
        """The ciphertext (NTT(c0), c1) from c0 in coefficient form and c1 in NTT form (k, N).

        Built inside SEAL, without reading words back out (SEAL saves only compressed):
        ``(c0, 1)`` in coefficient form goes to NTT form, ``(NTT(c0), NTT(1))``, and
        ``(0, c1 - NTT(1))`` is added. The constant polynomial 1 keeps the first
        ciphertext from being transparent, which SEAL refuses to transform.

        Raises
        ------
        ValueError, RuntimeError
            If a word is not below its prime (SEAL's ``load`` checks c0), or c1 is zero
            (no fresh ciphertext nor sum of them has it; SEAL refuses the result).
        """
        primes = list(self.primes)
        c1 = checked_ring_element(np.asarray(c1, dtype=np.uint64), primes, self.degree, "c1")
        if not c1.any():
            raise ValueError("c1 is zero: a transparent ciphertext, encrypted under no key")
        one, one_ntt = self._one
        first = self.ciphertext(np.stack([c0, one]), ntt_form=False)
        self._evaluator.transform_to_ntt_inplace(first)
        shifted = sub_mod(c1, one_ntt, primes)
        second = self.ciphertext(np.stack([np.zeros_like(c1), shifted]), ntt_form=True)
        self._evaluator.add_inplace(first, second)
        return first

    @cached_property
    def _evaluator(self) -> sealapi.Evaluator:
        return sealapi.Evaluator(self.seal_context)

    @cached_property
    def _one(self) -> tuple[Polys, Polys]:
        """The constant polynomial 1 in coefficient form and in SEAL's NTT form, (k, N)."""
        one = np.zeros((len(self.primes), self.degree), dtype=np.uint64)
        one[:, 0] = 1
        return one, self.transform(one[None], to_ntt=True)[0]

    @cached_property
    def _seeded_prefix(self) -> bytes:
        """A seeded ciphertext's serialization up to its seed: the fields, c0 = 0, the PRNG."""
        k, n = len(self.primes), self.degree
        head = self.meta(2, ntt_form=True) + _framed(struct.pack("<Q", k * n) + bytes(8 * k * n))
        return _framed(head + _framed(bytes([_BLAKE2XB]) + bytes(SEED_BYTES)))[:-SEED_BYTES]

    def seeded(self, seed: bytes) -> sealapi.Ciphertext:
        """A ciphertext (0, c1) whose c1 SEAL regenerates from ``seed`` (its seeded load).

        SEAL's seeded serialization: c0's words alone, then the PRNG's type and seed; its
        ``load`` fills c1 with the uniform words that seed expands to (NTT form), exactly
        as when it loads a seeded ciphertext it encrypted itself. Only the seed differs
        from one such load to the next: it alone is written (:func:`load_prefixed`).

        Raises
        ------
        ValueError
            If ``seed`` is not ``SEED_BYTES`` bytes.
        """
        if len(seed) != SEED_BYTES:
            raise ValueError(f"a seed of {len(seed)} bytes, not {SEED_BYTES}")
        ciphertext = sealapi.Ciphertext(self.seal_context)
        return load_prefixed(ciphertext, self.seal_context, self._seeded_prefix, bytes(seed))

    def seeded_parts(self, blob: bytes) -> tuple[Polys, bytes]:
        """A seeded SEAL ciphertext's c0 words (k, N; NTT form) and its c1 seed.

        Raises
        ------
        ValueError
            If ``blob`` is not a seeded two-polynomial NTT-form ciphertext of this level
            and scale, whose c1 comes from SEAL's Blake2xb PRNG.
        """
        body = _unframed(blob)
        fields = CIPHERTEXT_FIELDS.unpack_from(body)
        parms_id, ntt, size, degree, primes, scale = fields[:4], *fields[4:9]
        expected = (self.parms_id, 1, 2, self.degree, len(self.primes))
        if (tuple(parms_id), ntt, size, degree, primes) != expected or scale != self.scale:
            raise ValueError("not a fresh two-polynomial ciphertext of this context")
        rest = body[CIPHERTEXT_FIELDS.size :]
        array_size = _HEADER.unpack_from(rest)[-1]
        words = np.frombuffer(_unframed(rest[:array_size]), dtype="<u8", offset=8)
        info = _unframed(rest[array_size:])
        if words.size != primes * degree or len(info) != 1 + SEED_BYTES or info[0] != _BLAKE2XB:
            raise ValueError("not a seeded ciphertext (c1 is not a Blake2xb seed)")
        return words.astype(np.uint64).reshape(primes, degree), bytes(info[1:])


# ---- the wire format -------------------------------------------------------------------------


def check_chunks(chunks: Sequence, expected: int | None, chunk_bytes: int) -> None:
    """Check chunks before anything is sized from them: memory then follows their bytes.

    Raises
    ------
    CiphertextError
        Naming the chunk: not bytes, or a length other than ``chunk_bytes``; or not a
        list of chunks, or a chunk count other than ``expected``.
    """
    if not isinstance(chunks, Sequence):
        raise CiphertextError(f"a {type(chunks).__name__}, not a list of chunks")
    if expected is not None and len(chunks) != expected:
        raise CiphertextError(f"{len(chunks)} chunks, expected {expected}")
    for index, chunk in enumerate(chunks):
        if not isinstance(chunk, bytes | bytearray):
            raise CiphertextError(f"chunk {index} is a {type(chunk).__name__}, not bytes")
        if len(chunk) != chunk_bytes:
            raise CiphertextError(f"chunk {index} has {len(chunk)} bytes, not {chunk_bytes}")


def _chunk_table(chunks: list, expected: int | None, chunk_bytes: int) -> np.ndarray:
    """The chunks, checked (:func:`check_chunks`), as rows of one uint8 table."""
    check_chunks(chunks, expected, chunk_bytes)
    return np.frombuffer(b"".join(chunks), dtype=np.uint8).reshape(len(chunks), chunk_bytes)


@dataclass(frozen=True)
class Upload:
    """A parsed, checked upload: c0's words y (packed at ``d_up``) and the c1 seeds."""

    words: Wide
    seeds: tuple[bytes, ...]

    def __len__(self) -> int:
        return len(self.seeds)


class PackedFormat:
    """Packed uploads and downloads of one CKKS context (module docstring: the layout).

    Parameters
    ----------
    context : ts.Context
        A TenSEAL context, secret or public: its first data level's primes, N and scale.
    d_up, d_down : int
        Low bits of c0 dropped up and down; at most ``MAX_UPLOAD_DROP`` and
        ``MAX_DOWNLOAD_DROP`` (:mod:`lepton_flwr.he.publish`: what the flooding covers).

    Raises
    ------
    ValueError
        If a drop is outside what the flooding covers, or the context's data level is not
        one the packer takes (:class:`CoefficientPacker`).
    """

    def __init__(self, context: ts.Context, d_up: int = D_UP, d_down: int = D_DOWN):
        if not 0 <= d_up <= MAX_UPLOAD_DROP:
            raise ValueError(f"d_up = {d_up}: the flooding covers 0 to {MAX_UPLOAD_DROP}")
        if not 0 <= d_down <= MAX_DOWNLOAD_DROP:
            raise ValueError(f"d_down = {d_down}: the flooding covers 0 to {MAX_DOWNLOAD_DROP}")
        self.ring = Ring.of(context)
        self.packer = CoefficientPacker(self.ring.primes, self.ring.degree)
        self.d_up, self.d_down = d_up, d_down
        self.upload_c0_bytes = self.packer.polynomial_bytes(d_up)
        self.upload_chunk_bytes = self.upload_c0_bytes + SEED_BYTES
        self.download_c0_bytes = self.packer.polynomial_bytes(d_down)
        self.download_chunk_bytes = self.download_c0_bytes + self.packer.residue_bytes()

    # -- client: a fresh seeded ciphertext -> an upload

    def pack_upload(
        self, seeded: Sequence[bytes], mask: Callable[[int], Polys] | None = None
    ) -> list[bytes]:
        """Fresh seeded SEAL ciphertexts (the codec's chunks) -> upload chunks ``c0 ‖ seed``.

        c0 goes to coefficient form (SEAL's inverse NTT), becomes one integer mod Q a
        coefficient, loses its ``d_up`` low bits (rounded) and is bit-packed; the seed
        is copied. ``mask(i)``, if given, is added to chunk i's c0 in coefficient form
        (residues (k, N), row j below q_j) before rounding.

        Raises
        ------
        ValueError
            If a chunk is not a seeded ciphertext of this context (:meth:`Ring.seeded_parts`),
            or a mask not a ring element (uint64 (k, N), row j below q_j).
        """
        if not seeded:
            return []
        parts = [self.ring.seeded_parts(blob) for blob in seeded]
        c0 = self.ring.transform(np.stack([words for words, _ in parts]), to_ntt=False)
        if mask is not None:
            primes = list(self.ring.primes)
            for index in range(len(c0)):
                what = f"the mask of chunk {index}"
                words = checked_ring_element(mask(index), primes, self.ring.degree, what)
                c0[index] = add_mod(c0[index], words, primes)
        y = self.packer.round_off(self.packer.compose(c0), self.d_up)
        packed = self.packer.pack(y, self.d_up)
        return [packed[i].tobytes() + seed for i, (_, seed) in enumerate(parts)]

    # -- server: parse and check an upload

    def parse_upload(self, chunks: Sequence[bytes], expected: int | None = None) -> Upload:
        """Check and unpack upload chunks; what a sender may get wrong is refused.

        Raises
        ------
        CiphertextError
            Naming the chunk: not bytes, a length other than ``upload_chunk_bytes``, or a
            c0 word >= ceil(Q / 2^d_up); or a chunk count other than ``expected``.
        """
        chunks = list(chunks)
        table = _chunk_table(chunks, expected, self.upload_chunk_bytes)
        words = self.packer.unpack(table[:, : self.upload_c0_bytes], self.d_up)
        _refuse_out_of_range(self.packer.out_of_range(words, self.d_up), f"ceil(Q/2^{self.d_up})")
        seeds = tuple(row[self.upload_c0_bytes :].tobytes() for row in table)  # the same copy
        return Upload(words, seeds)

    def expand_seeds(self, seeds: Sequence[bytes]) -> Polys:
        """c1 of each seed (k, N; NTT form), as SEAL regenerates it; (len(seeds), k, N).

        Raises
        ------
        CiphertextError
            If a seed is not ``SEED_BYTES`` bytes.
        """
        _check_seeds(seeds)
        out = np.empty((len(seeds), len(self.ring.primes), self.ring.degree), dtype=np.uint64)
        for index, seed in enumerate(seeds):
            out[index] = ciphertext_words(self.ring.seeded(bytes(seed)))[1]
        return out

    # -- ciphertexts from words (a client loading a download, tests decrypting an upload)

    def ciphertexts(self, c0: Polys, c1: Polys) -> list[sealapi.Ciphertext]:
        """SEAL ciphertexts from c0 (coefficient form) and c1 (NTT form), each (B, k, N).

        The results are at the first data level, with the key's scale, as fresh
        ciphertexts and sums of them are (:meth:`Ring.mixed`: c0 goes to NTT form by
        SEAL's forward NTT, inside SEAL).
        """
        return [self.ring.mixed(first, second) for first, second in zip(c0, c1, strict=True)]

    def upload_ciphertexts(self, upload: Upload) -> list[sealapi.Ciphertext]:
        """The SEAL ciphertexts an upload stands for (c0 restored from its rounding)."""
        c0 = self.packer.residues(self.packer.restore(upload.words, self.d_up))
        return self.ciphertexts(c0, self.expand_seeds(upload.seeds))

    # -- server -> client

    def pack_download(self, c0: Wide, c1: Polys) -> list[bytes]:
        """Download chunks ``c0 ‖ c1`` from a sum's c0 (integers < Q) and c1 (NTT residues)."""
        y = self.packer.round_off(c0, self.d_down)
        first = self.packer.pack(y, self.d_down)
        second = self.packer.pack_residues(c1)
        return [first[i].tobytes() + second[i].tobytes() for i in range(len(first))]

    def parse_download(
        self, chunks: Sequence[bytes], expected: int | None = None
    ) -> tuple[Wide, Polys]:
        """Check download chunks: c0 (restored integers < Q, (B, N)) and c1 ((B, k, N)).

        Returns
        -------
        tuple[Wide, Polys]
            c0 as (hi, lo) and c1 as residues.

        Raises
        ------
        CiphertextError
            Naming the chunk: not bytes, the wrong length, a c0 word >= ceil(Q / 2^d_down),
            a c1 word >= its prime; or a chunk count other than ``expected``.
        """
        table = _chunk_table(list(chunks), expected, self.download_chunk_bytes)
        y = self.packer.unpack(table[:, : self.download_c0_bytes], self.d_down)
        _refuse_out_of_range(self.packer.out_of_range(y, self.d_down), f"ceil(Q/2^{self.d_down})")
        c1 = self.packer.unpack_residues(table[:, self.download_c0_bytes :])
        _refuse_out_of_range(self.packer.residues_out_of_range(c1), "its prime (in c1)")
        return self.packer.restore(y, self.d_down), c1

    def load_download(
        self, chunks: Sequence[bytes], expected: int | None = None
    ) -> list[sealapi.Ciphertext]:
        """Download chunks -> SEAL ciphertexts to decrypt (:meth:`parse_download` checks)."""
        c0, c1 = self.parse_download(chunks, expected)
        return self.ciphertexts(self.packer.residues(c0), c1)


def _refuse_out_of_range(bad: np.ndarray, bound: str) -> None:
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise CiphertextError(f"chunk {index} has a word not below {bound}")


def _check_seeds(seeds: Sequence[bytes]) -> None:
    for index, seed in enumerate(seeds):
        if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
            raise CiphertextError(f"the seed of chunk {index} is not {SEED_BYTES} bytes")


# ---- the server's sum -------------------------------------------------------------------------


class PackedSum:
    """The server's exact sum of packed uploads, chunk by chunk, and the copy it sends.

    c0 is summed as integers (the uploads' words y, unreduced: a sum of n words of width
    w stays below n * 2^w, far from 2^128 at the pack's parameters) and reduced mod Q when
    read; c1 is summed by SEAL, each seed expanded into a ciphertext (0, c1) that is added
    to the chunk's total. ``count`` is the number of uploads summed, which
    :func:`lepton_flwr.he.publish.check_summed` bounds when a download is made; the sum
    itself is never rounded (:meth:`download` rounds a copy).

    Parameters
    ----------
    packed : PackedFormat
        The format of the uploads.
    chunks : int
        Chunks in every upload.
    """

    def __init__(self, packed: PackedFormat, chunks: int):
        self.packed, self.chunks, self.count = packed, chunks, 0
        shape = (chunks, packed.ring.degree)
        self._y = (np.zeros(shape, dtype=np.uint64), np.zeros(shape, dtype=np.uint64))
        self._extra: Wide | None = None  # added integers mod Q (exact states, minus masks)
        self._c1: list[sealapi.Ciphertext | None] = [None] * chunks
        self._evaluator = sealapi.Evaluator(packed.ring.seal_context)
        self._unreduced = 0
        # n unreduced words stay below n * 2^width; restored (times 2^d_up) below 2^128 and
        # below 2^45 * Q, which one reduction takes (CoefficientPacker.reduce)
        width = packed.packer.coefficient_width(packed.d_up)
        self._max_unreduced = min(1 << 44, 1 << (127 - width - packed.d_up))

    def add(self, chunks: Sequence[bytes]) -> None:
        """Add one upload; a refused upload leaves the sum as it was.

        Raises
        ------
        CiphertextError
            What :meth:`PackedFormat.parse_upload` refuses.
        """
        upload = self.packed.parse_upload(chunks, self.chunks)
        seeded = [self.packed.ring.seeded(seed) for seed in upload.seeds]
        _add_wide_into(self._y, upload.words)
        self._unreduced += 1
        if self._unreduced >= self._max_unreduced:
            self._fold()
        for index, ciphertext in enumerate(seeded):
            total = self._c1[index]
            if total is None:
                self._c1[index] = ciphertext
            else:
                self._evaluator.add_inplace(total, ciphertext)
        self.count += 1

    def _fold(self) -> None:
        """Move the uploads' words into ``_extra`` (mod Q), so they cannot overflow."""
        c0 = self._c0_of_words()
        self._extra = c0 if self._extra is None else self._add_mod_q(self._extra, c0)
        zeros = np.zeros_like(self._y[0])
        self._y, self._unreduced = (zeros, zeros.copy()), 0

    def _c0_of_words(self) -> Wide:
        packer = self.packed.packer
        return packer.reduce(packer.restore(self._y, self.packed.d_up))  # (2^d_up Σ y) mod Q

    def _add_mod_q(self, x: Wide, y: Wide) -> Wide:
        return self.packed.packer.reduce(_add_wide(x, y))

    def add_exact(self, c0: Polys, c1: Polys, count_: int) -> None:
        """Add an exact sum kept from before (c0 coefficient, c1 NTT residues, (chunks, k, N)).

        ``count_`` is the number of uploads it sums (for :func:`check_summed`).
        """
        packer = self.packed.packer
        self._extra = (
            packer.compose(c0)
            if self._extra is None
            else self._add_mod_q(self._extra, packer.compose(c0))
        )
        seeded = [self.packed.ring.ciphertext(np.stack([np.zeros_like(p), p]), True) for p in c1]
        for index, ciphertext in enumerate(seeded):
            if self._c1[index] is None:
                self._c1[index] = ciphertext
            else:
                self._evaluator.add_inplace(self._c1[index], ciphertext)
        self.count += count_

    def subtract(self, c0: Polys) -> None:
        """Subtract ring elements (coefficient form, (chunks, k, N)) from c0: masks."""
        packer = self.packed.packer
        mask = packer.compose(c0)
        big = _split(packer.modulus)
        modulus = (np.full_like(mask[0], big[0]), np.full_like(mask[1], big[1]))
        negated = packer.reduce(_sub_wide(modulus, mask))  # Q - m, and 0 for m = 0
        self._extra = negated if self._extra is None else self._add_mod_q(self._extra, negated)

    def exact(self) -> tuple[Polys, Polys]:
        """The exact sum: c0 (coefficient form) and c1 (NTT form) residues, (chunks, k, N)."""
        packer = self.packed.packer
        return packer.residues(self._c0()), self._c1_words()

    def _c0(self) -> Wide:
        c0 = self._c0_of_words()
        return c0 if self._extra is None else self._add_mod_q(c0, self._extra)

    def _c1_words(self) -> Polys:
        ring = self.packed.ring
        out = np.zeros((self.chunks, len(ring.primes), ring.degree), dtype=np.uint64)
        for index, total in enumerate(self._c1):
            if total is not None:
                out[index] = ciphertext_words(total)[1]
        return out

    def exact_chunks(self, exact: PackedFormat) -> list[bytes]:
        """The exact sum as chunks of ``exact``, without going through its residues.

        ``exact`` is a format of this ring that drops nothing down (c0 whole): the chunks
        are :meth:`exact` packed by it.

        Raises
        ------
        ValueError
            If ``exact`` rounds c0 or belongs to another ring.
        """
        ring = self.packed.ring
        if exact.d_down != 0 or (exact.ring.primes, exact.ring.degree) != (
            ring.primes,
            ring.degree,
        ):
            raise ValueError("exact sums are packed by a format of this ring with d_down = 0")
        if self.chunks == 0:
            return []
        return exact.pack_download(self._c0(), self._c1_words())

    def download(self) -> list[bytes]:
        """The chunks to send: c0 rounded at ``d_down`` (a copy), c1 exact.

        Raises
        ------
        ValueError
            If more uploads are summed than the flooding covers with this rounding
            (:func:`lepton_flwr.he.publish.check_summed`).
        """
        check_summed(self.count, self.packed.d_down)
        return self.packed.pack_download(self._c0(), self._c1_words())
