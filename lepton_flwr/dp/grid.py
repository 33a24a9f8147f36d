"""Central DP releases in exact integers on a power-of-two grid.

Float arithmetic between the noise and the release lets the released bits reveal more
than the Gaussian mechanism allows (Mironov, CCS 2012; Jin et al., S&P 2022). Here every
floating-point operation happens either before the sensitivity bound is enforced on one
client's contribution or after the noise, on public values:

1. each accepted update, clipped to ``C (1 − 2^-20)`` (the margin covers float64's error
   in computing the norm), becomes integers in units of the grid spacing g by rounding
   each coordinate toward zero (:func:`to_grid`): no coordinate grows, so the integer
   vector's L2 norm is at most C/g, whatever the number of weights;
2. the integers add up exactly (int64: :func:`spacing` keeps every sum below 2^62);
3. the noise is ``round(N(0, (σ/g)²))`` per coordinate
   (:func:`lepton_flwr.dp.noise.rounded_gaussian`). An integer plus a rounded Gaussian is
   the rounding of the integer plus a continuous Gaussian: the released integer vector
   is a post-processing of the Gaussian mechanism on the integer sum, whose zero-out L2
   sensitivity is C/g against noise σ/g, multiplier σ/C as before, so the accountant is
   unchanged (under replace-one neighbours, 2C/g against σ/g, as before too);
4. what is released is a deterministic function of that integer vector and public
   values (θ, g, the denominator d): ``float32(θ + g · (S + K) / d)``
   (:func:`release`), a post-processing.

The only residual is the sampler's own distance from the ideal rounded Gaussian,
:func:`lepton_flwr.dp.noise.rounded_gaussian_tv_bound` per value (5.2e-30 at most).
The spacing is a power of two at or below ``σ · 2^-26`` (:data:`BELOW_NOISE`): rounding
toward zero costs each coordinate of the sum less than ``n · g``, 1.5e-8 σ per client.

Adaptive clipping's count (each client adds b − 1/2) is released the same way on the
grid :func:`count_spacing` (a power of two that divides 1/2), and the next clip norm is
computed from the released count only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np

from lepton_flwr.dp.clipping import clip
from lepton_flwr.dp.noise import TAIL_REACH, rounded_gaussian

BELOW_NOISE = 2.0**-26  # the spacing is at most this fraction of the noise std
CLIP_MARGIN = 2.0**-20  # updates are clipped to C (1 − CLIP_MARGIN) before the grid
MAX_MAGNITUDE = 2.0**62  # bound on every integer the release adds up (int64 holds 2^63)


def power_of_two_at_or_below(value: float) -> float:
    """The largest power of two ≤ ``value`` (> 0), exactly."""
    mantissa, exponent = math.frexp(value)  # value = mantissa · 2^exponent, mantissa in [½, 1)
    return math.ldexp(1.0, exponent - 1)


def power_of_two_at_or_above(value: float) -> float:
    """The smallest power of two ≥ ``value`` (> 0), exactly."""
    mantissa, exponent = math.frexp(value)
    return math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)


def spacing(noise_std: float, clip_norm: float, population: int) -> float:
    """The grid g of a release: a power of two, at most ``σ · 2^-26`` unless int64 needs more.

    Each of at most ``population`` updates contributes at most C/g to a coordinate, and
    the noise at most ``TAIL_REACH · σ/g + 1`` (the sampler's reach), so g is also at
    least ``(population · C + (TAIL_REACH + 1) σ) / 2^62``: no sum leaves int64.
    """
    fine = power_of_two_at_or_below(noise_std * BELOW_NOISE)
    largest = population * clip_norm + (TAIL_REACH + 1) * noise_std
    return max(fine, power_of_two_at_or_above(largest / MAX_MAGNITUDE))


def count_spacing(count_std: float) -> float:
    """The grid of adaptive clipping's centred count: a power of two ≤ 1/2 and ≤ σ · 2^-26."""
    return min(0.5, power_of_two_at_or_below(count_std * BELOW_NOISE))


def to_grid(update: list[np.ndarray], clip_norm: float, grid: float) -> list[np.ndarray]:
    """``update`` clipped to ``C (1 − 2^-20)``, in units of ``grid``, rounded toward zero.

    The result (int64) has L2 norm at most ``clip_norm / grid``: clipping leaves a norm of
    at most ``C (1 − 2^-20)`` up to float64's relative error (far below 2^-20 for any
    model that fits in memory), and rounding toward zero shrinks every coordinate.
    """
    clipped, _ = clip(update, clip_norm * (1 - CLIP_MARGIN))
    return [np.trunc(c / grid).astype(np.int64) for c in clipped]


def zeros_like(model: list[np.ndarray]) -> list[np.ndarray]:
    """An all-zero integer vector shaped like ``model``."""
    return [np.zeros(m.shape, dtype=np.int64) for m in model]


def add_noise(
    total: list[np.ndarray], scale: float, random_bytes: Callable[[int], bytes]
) -> list[np.ndarray]:
    """The exact integer sum plus ``round(N(0, scale²))`` on each coordinate (int64)."""
    return [t + rounded_gaussian(t.shape, scale, random_bytes) for t in total]


def release(
    model: list[np.ndarray], noisy_total: list[np.ndarray], grid: float, denominator: float
) -> list[np.ndarray]:
    """``θ + grid · noisy_total / denominator`` (float64): public values and the integers."""
    return [
        m + n.astype(np.float64) * grid / denominator
        for m, n in zip(model, noisy_total, strict=True)
    ]


def random_bytes_of(seeded: bool, rng: np.random.Generator) -> Callable[[int], bytes]:
    """The randomness of the noise: the seeded generator (tests, not private) or the OS's."""
    return rng.bytes if seeded else os.urandom
