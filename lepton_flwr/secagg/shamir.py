"""Shamir secret sharing of 32-byte secrets over the prime field of p = 2^521 − 1.

Textbook Shamir (1979), no new cryptography: to share a secret s t-of-k, draw t − 1
coefficients uniformly from the field, and give holder x the value f(x) of
f(X) = s + a_1 X + … + a_{t−1} X^{t−1} (Horner's rule); any t values give s = f(0) by
Lagrange interpolation, and any t − 1 are uniformly distributed whatever s is (for
each candidate secret exactly one polynomial passes through them and (0, s)).

The field. p = 2^521 − 1 is a Mersenne prime (proved by the Lucas–Lehmer test,
Robinson 1952; it is also the field of NIST P-521). A 32-byte secret, read as a
big-endian integer below 2^256, is one field element. Each of a node's two secrets
(its self-mask seed and its round mask key) is shared on its own polynomial: with one
polynomial for both, every revealed share would be a share of both, and the protocol
lets a holder reveal, per peer, a share of only one of them.

Global x-coordinates. In a round, holder h's x is its position in the round's sorted
participant list, plus one: the same for every owner whose secret h holds. An owner
skips its own x (it keeps no share of its own secrets). The server therefore computes
the Lagrange coefficients at 0 once for the set of holders that answered
(:class:`LagrangeAtZero`) and, in O(m) more, for that set less one holder: the set of
any owner among them.

A share travels as ``SHARE_BYTES`` bytes: x in 4 big-endian bytes, then f(x) in 66
big-endian bytes (a value ≥ p is malformed).

Why not Flower's ``crypto.shamir`` (PyCryptodome, 16-byte blocks in GF(2^128)), which
the protocol used first: in the n = 100 cost test of ``tests/test_secagg_protocol.py``
(t = 53, 5 dropouts) a client spent 0.3–0.4 s on its two splits into 99 shares and
the server 22–27 s reconstructing 95 seeds and 5 keys, about 0.2 s per secret (a
pure-Python Lagrange interpolation per 16-byte block and per secret, no coefficients
reused). Here a split is (t − 1)(n − 1) big-integer multiply-adds (the whole share-keys
stage took 0.014 s per client in that test) and a reconstruction, once the round's
coefficients are known, one dot product (0.07 s for the server's whole unmask, checks
included).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence

from lepton_flwr.numbers import is_int

PRIME = (1 << 521) - 1
INDEX_BYTES = 4
VALUE_BYTES = (PRIME.bit_length() + 7) // 8  # 66
SHARE_BYTES = INDEX_BYTES + VALUE_BYTES
SECRET_BYTES = 32
MAX_INDEX = (1 << (8 * INDEX_BYTES)) - 1


def holder_indices(participants: Iterable[int]) -> dict[int, int]:
    """Node id -> its x-coordinate in a round: its place among the sorted ids, plus one.

    Raises
    ------
    ValueError
        If an id repeats, or there are more participants than a 4-byte index counts.
    """
    ordered = sorted(participants)
    if len(set(ordered)) != len(ordered):
        raise ValueError("a participant is listed twice")
    if len(ordered) > MAX_INDEX:
        raise ValueError(f"more than {MAX_INDEX} participants")
    return {node: position + 1 for position, node in enumerate(ordered)}


def _evaluate(secret: int, coefficients: Sequence[int], x: int, prime: int) -> int:
    """f(x) for f(X) = secret + Σ_i coefficients[i] X^{i+1}, by Horner's rule, mod prime."""
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % prime
    return (value * x + secret) % prime


def split(secret: bytes, threshold: int, indices: Sequence[int]) -> list[bytes]:
    """Shares of a 32-byte secret, one per x in ``indices`` (in that order), t-of-k.

    The t − 1 coefficients come from ``secrets.randbelow(PRIME)``.

    Raises
    ------
    ValueError
        If the secret is not 32 bytes, t is not in [1, len(indices)], or an x is
        repeated or outside [1, 2^32).
    """
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes")
    if not is_int(threshold) or not 1 <= threshold <= len(indices):
        raise ValueError(f"the threshold must be in [1, {len(indices)}], not {threshold!r}")
    if len(set(indices)) != len(indices) or not all(
        is_int(x) and 1 <= x <= MAX_INDEX for x in indices
    ):
        raise ValueError("x-coordinates must be distinct integers in [1, 2^32)")
    coefficients = [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    value = int.from_bytes(secret, "big")
    return [encode_share(x, _evaluate(value, coefficients, x, PRIME)) for x in indices]


def encode_share(x: int, value: int) -> bytes:
    """The wire form of the share (x, f(x))."""
    return x.to_bytes(INDEX_BYTES, "big") + value.to_bytes(VALUE_BYTES, "big")


def share_index(share: bytes) -> int:
    """The x-coordinate a share carries (its first 4 bytes, big-endian)."""
    return int.from_bytes(share[:INDEX_BYTES], "big")


def decode_share(share: object) -> tuple[int, int]:
    """(x, f(x)) from a share's bytes.

    Raises
    ------
    ValueError
        If it is not ``SHARE_BYTES`` bytes, x is 0, or the value is not below p.
    """
    if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes")
    x = share_index(share)
    value = int.from_bytes(share[INDEX_BYTES:], "big")
    if x == 0 or value >= PRIME:
        raise ValueError("a share's x is 0 or its value is not below p")
    return x, value


class LagrangeAtZero:
    """Lagrange coefficients at 0 for one set of x-coordinates, and for it less one x.

    λ_i = Π_{j≠i} x_j / (x_j − x_i) mod p, so that f(0) = Σ_i λ_i f(x_i) for every f of
    degree below the number of points. Computing them costs O(m²) multiplications for
    m points, once; :meth:`without` derives the set less one x in O(m), since dropping
    x_u multiplies each λ_i by (x_u − x_i) / x_u.

    Parameters
    ----------
    indices
        Distinct x-coordinates in [1, p).
    prime
        The field's modulus (the tests use small fields).
    """

    def __init__(self, indices: Iterable[int], prime: int = PRIME) -> None:
        xs = sorted(set(indices))
        if not xs or xs[0] < 1 or xs[-1] >= prime:
            raise ValueError("x-coordinates must be distinct, in [1, p), at least one")
        self.prime = prime
        self.coefficients: dict[int, int] = {}
        numerator = 1
        for x in xs:
            numerator = numerator * x % prime
        for x_i in xs:
            denominator = x_i
            for x_j in xs:
                if x_j != x_i:
                    denominator = denominator * (x_j - x_i) % prime
            self.coefficients[x_i] = numerator * pow(denominator, -1, prime) % prime

    def without(self, x: int) -> dict[int, int]:
        """The coefficients for the set less ``x`` (the set itself if ``x`` is not in it)."""
        if x not in self.coefficients:
            return dict(self.coefficients)
        p = self.prime
        inverse = pow(x, -1, p)
        return {
            x_i: coefficient * (x - x_i) % p * inverse % p
            for x_i, coefficient in self.coefficients.items()
            if x_i != x
        }


def interpolate_at_zero(
    coefficients: Mapping[int, int], points: Mapping[int, int], prime: int = PRIME
) -> int:
    """f(0) = Σ λ_x f(x) mod p, the points (x -> f(x)) being exactly the coefficients' xs.

    Raises
    ------
    ValueError
        If the points are not at the coefficients' x-coordinates.
    """
    if points.keys() != coefficients.keys():
        raise ValueError("the points are not at the coefficients' x-coordinates")
    return sum(coefficients[x] * value for x, value in points.items()) % prime


def _trim(poly: list[int]) -> list[int]:
    while poly and poly[-1] == 0:
        poly.pop()
    return poly


def _divmod(num: list[int], den: list[int], prime: int) -> tuple[list[int], list[int]]:
    """Polynomial division (coefficients low to high, ``den`` trimmed and non-zero)."""
    num = list(num)
    inverse = pow(den[-1], -1, prime)
    quotient = [0] * max(len(num) - len(den) + 1, 0)
    for shift in range(len(num) - len(den), -1, -1):
        factor = num[shift + len(den) - 1] * inverse % prime
        quotient[shift] = factor
        if factor:
            for i, c in enumerate(den):
                num[shift + i] = (num[shift + i] - factor * c) % prime
    return _trim(quotient), _trim(num[: len(den) - 1])


def _mul(a: list[int], b: list[int], prime: int) -> list[int]:
    if not a or not b:
        return []
    out = [0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        if x:
            for j, y in enumerate(b):
                out[i + j] = (out[i + j] + x * y) % prime
    return _trim(out)


def decode(points: Mapping[int, int], threshold: int, prime: int = PRIME) -> list[int] | None:
    """The polynomial of degree below ``threshold`` that all but a few points lie on.

    Reed–Solomon decoding (Gao's algorithm): with m points of which e are wrong, it
    finds the polynomial whenever e ≤ ⌊(m − t)/2⌋, in O(m²) field operations, and
    returns its coefficients (low to high); None when no such polynomial exists. A
    result is unique within that bound, but beyond it may be another polynomial: check
    the secret it gives.
    """
    xs = list(points)
    m, k = len(xs), threshold
    if m < k or k < 1:
        return None
    g0 = [1]  # Π (X − x_i)
    for x in xs:
        g0 = _mul(g0, [(-x) % prime, 1], prime)
    g1 = [0] * m  # the interpolant of every point: Σ y_i w_i g0 / (X − x_i)
    for x_i in xs:
        weight = 1
        for x_j in xs:
            if x_j != x_i:
                weight = weight * (x_i - x_j) % prime
        factor = points[x_i] * pow(weight, -1, prime) % prime
        carry = 0  # g0 / (X − x_i) by synthetic division, high to low
        for degree in range(m, 0, -1):
            carry = (g0[degree] + carry * x_i) % prime
            g1[degree - 1] = (g1[degree - 1] + factor * carry) % prime
    r0, r1 = g0, _trim(g1)
    v0, v1 = [], [1]
    while len(r1) - 1 >= (m + k) / 2:  # partial extended Euclid on (g0, g1)
        quotient, remainder = _divmod(r0, r1, prime)
        r0, r1 = r1, remainder
        product = _mul(quotient, v1, prime)
        size = max(len(v0), len(product))
        v0, v1 = (
            v1,
            _trim(
                [
                    ((v0[i] if i < len(v0) else 0) - (product[i] if i < len(product) else 0))
                    % prime
                    for i in range(size)
                ]
            ),
        )
    if not v1:
        return None
    f, remainder = _divmod(r1, v1, prime)
    if remainder or len(f) > k:
        return None
    return f + [0] * (k - len(f))


def evaluate(coefficients: Sequence[int], x: int, prime: int = PRIME) -> int:
    """f(x) by Horner's rule (coefficients low to high)."""
    value = 0
    for c in reversed(coefficients):
        value = (value * x + c) % prime
    return value


def secret_bytes(value: int) -> bytes | None:
    """The 32-byte secret a reconstructed field element stands for (None if ≥ 2^256)."""
    if value >> (8 * SECRET_BYTES):
        return None
    return value.to_bytes(SECRET_BYTES, "big")


def combine(shares: Sequence[bytes]) -> bytes | None:
    """The secret interpolated from all ``shares`` (None if it is not 32 bytes).

    With fewer than t shares, or a wrong one, the result is another field element:
    check it (a commitment, a public key) before use.

    Raises
    ------
    ValueError
        If a share is malformed or two share an x.
    """
    points = dict(decode_share(share) for share in shares)
    if len(points) != len(shares):
        raise ValueError("two shares have the same x")
    return secret_bytes(interpolate_at_zero(LagrangeAtZero(points).coefficients, points))
