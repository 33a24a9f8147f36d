"""Gaussian noise from the operating system's cryptographically secure randomness.

DP noise must be unpredictable to everyone, including whoever knows the code, the config
and any seed. Two samplers:

:func:`rounded_gaussian` (central DP-FedAvg, :mod:`lepton_flwr.dp.grid`) draws
``round(N(0, scale²))`` as exact integers, the noise added to an exact integer sum, so
that the release is a post-processing of the Gaussian mechanism and the floating-point
attacks on noise (Mironov, CCS 2012; Jin et al., S&P 2022) do not apply to it. Each value
takes 128 bits: one for the sign, 127 for a uniform v on the grid ``(k + 1/2) / 2^127``;
its magnitude is the m with ``erfc((m + 1/2) / (scale √2)) < v ≤ erfc((m − 1/2) /
(scale √2))``, the inverse-CDF method decided exactly: scipy's ``ndtri`` in float64
proposes m, and wherever the proposal lies within ``2^-44 (1 + |z|)`` standard deviations
of a bin edge (``ndtri`` and the float conversion of v are good to about 2^-50 (1 + |z|)
there, which ``tests/test_dp_grid.py`` measures), mpmath at 256 bits decides. So each
bin's probability is the ideal one to within one grid point, 2^-127, the draws reach
13.1 standard deviations, and the total variation between the sampler and the ideal
rounded Gaussian is at most :func:`rounded_gaussian_tv_bound` per value, ``((13.3 scale +
2) 2^-127 + 2^-128) / 2``: 5.2e-30 at the largest scale the grid uses (2^27). A
total-variation mass η adds ``(1 + e^ε) η`` to δ (if M' is within η of an (ε, δ)-DP M on
every input, M' is (ε, δ + (1 + e^ε) η)-DP): for 10^8 values a round, 10^4 rounds and
ε = 10, 1.2e-13.

:func:`secure_gaussian` (HE + DP noise shares, DP-SGD's gradient noise, the flooding of
HE decryptions) draws float64 values from 64 bits each: one for the sign, 63 for a
uniform u in (0, 1), mapped to the magnitude |Z| = −Φ⁻¹(u/2). The smallest u is 2⁻⁶⁴, so
the tails are Gaussian out to 9.16 σ on both sides (``tests/test_dp_noise.py`` checks
the extreme draw); beyond lies a mass of 5.4e-20 per value, which adds (1 + e^ε) times
that to δ: for 10⁵ values x 10³ shares x 10³ rounds at ε = 3, 1.1e-7, against δ = 1e-5.
Its float64 values are not those of a Gaussian in their low bits (a 53-bit u, a float64
quantile), so a release that showed them at full precision would be open to the
floating-point attacks above: central DP-FedAvg does not use it, and HE + DP shares reach
a release only inside a decrypted sum rounded to a power-of-two grid
(:mod:`lepton_flwr.he.publish`); that this rounding leaves no such artefact is not
argued here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import mpmath
import numpy as np
from scipy.special import ndtri

RandomBytes = Callable[[int], bytes]

UNIFORM_BITS = 127  # bits of the uniform behind each rounded Gaussian value
TAIL_REACH = 13.3  # standard deviations the 127-bit uniform reaches (13.2, rounded up)
MAX_SCALE = 2.0**40  # larger scales would need more float64 bits than the proposal has
PROPOSAL_MARGIN = 2.0**-44  # bin-edge distance (x (1 + |z|) std) below which mpmath decides
EXACT_BITS = 256  # mpmath's working precision for the undecided draws


def secure_gaussian(shape: tuple[int, ...] | int, std: float) -> np.ndarray:
    """Draw N(0, std²) values of ``shape`` (float64) from ``os.urandom``."""
    count = math.prod(shape) if isinstance(shape, tuple) else int(shape)
    raw = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
    sign = np.where(raw & np.uint64(1), 1.0, -1.0)
    uniform = ((raw >> np.uint64(1)).astype(np.float64) + 0.5) / 2.0**63
    return (sign * -ndtri(uniform / 2) * std).reshape(shape)


def rounded_gaussian_tv_bound(scale: float) -> float:
    """Total variation between :func:`rounded_gaussian` and round(N(0, scale²)), per value.

    The sign is one fair bit, so it is the magnitude's: each of the at most
    ``TAIL_REACH · scale + 2`` bins that hold a grid point is off by at most one point,
    2^-127, and the bins beyond hold less than the smallest v, 2^-128, so
    ``TV ≤ ((TAIL_REACH · scale + 2) 2^-127 + 2^-128) / 2``.
    """
    return ((TAIL_REACH * scale + 2) * 2.0**-UNIFORM_BITS + 2.0**-128) / 2


def rounded_gaussian(
    shape: tuple[int, ...] | int, scale: float, random_bytes: RandomBytes = os.urandom
) -> np.ndarray:
    """Draw ``round(N(0, scale²))`` values of ``shape`` as int64, decided exactly.

    Parameters
    ----------
    shape : tuple[int, ...] | int
        The shape of the draw.
    scale : float
        The standard deviation, in (0, 2^40].
    random_bytes : Callable[[int], bytes] (default: ``os.urandom``)
        Where the 128 bits of each value come from (a seeded generator's ``bytes`` in
        tests, which is then not private).

    Raises
    ------
    ValueError
        If ``scale`` is not in (0, 2^40].
    """
    if not 0 < scale <= MAX_SCALE:
        raise ValueError(f"the rounded Gaussian's scale must be in (0, 2^40], got {scale}")
    count = math.prod(shape) if isinstance(shape, tuple) else int(shape)
    raw = np.frombuffer(random_bytes(16 * count), dtype="<u8").reshape(count, 2)
    high, low = raw[:, 0], raw[:, 1]
    negative = (high >> np.uint64(63)).astype(bool)
    top = high & np.uint64(2**63 - 1)
    # v = (top · 2^64 + low + 1/2) / 2^127, to float64 within a relative 2^-52.
    uniform = top.astype(np.float64) * 2.0**-63 + (low.astype(np.float64) + 0.5) * 2.0**-127
    magnitude = -ndtri(uniform / 2)
    shifted = scale * magnitude + 0.5  # bin m holds shifted in [m, m + 1)
    proposal = np.floor(shifted)
    edge_distance = np.abs(shifted - np.rint(shifted))
    undecided = np.flatnonzero(edge_distance <= scale * (1 + magnitude) * PROPOSAL_MARGIN)
    bins = proposal.astype(np.int64)
    for index in undecided:
        bins[index] = _exact_bin(int(top[index]), int(low[index]), scale, int(bins[index]))
    return np.where(negative, -bins, bins).reshape(shape)


def _exact_bin(top: int, low: int, scale: float, guess: int) -> int:
    """The magnitude bin of v = (top · 2^64 + low + 1/2) / 2^127, at 256 bits."""
    with mpmath.workprec(EXACT_BITS):
        uniform = mpmath.ldexp(mpmath.mpf(2 * ((top << 64) + low) + 1), -128)
        width = mpmath.mpf(scale) * mpmath.sqrt(2)

        def reaches(m: int) -> bool:  # |Z| ≥ (m − 1/2) / scale, i.e. the bin is ≥ m
            return m <= 0 or uniform <= mpmath.erfc((m - mpmath.mpf(0.5)) / width)

        while not reaches(guess):
            guess -= 1
        while reaches(guess + 1):
            guess += 1
        return max(guess, 0)
