"""Gaussian noise from the operating system's cryptographically secure randomness.

DP noise must be unpredictable to everyone, including whoever knows the code, the config
and any seed. Each value takes 64 bits from ``os.urandom``: one for the sign, 63 for a
uniform u in (0, 1), mapped to the magnitude |Z| = −Φ⁻¹(u/2) (inverse-CDF method, scipy's
``ndtri``). The smallest u is 2⁻⁶⁴, so the tails are Gaussian out to 9.16 σ on both
sides (``tests/test_dp_noise.py`` checks the extreme draw); beyond that lies a probability
mass of 5.4e-20 per value, which is added to δ (5.4e-20 x 10⁵ values x 10³ shares x 10³
rounds = 5.4e-9, against δ = 1e-5). Values are drawn in float64; clients then cast to float32
(relative rounding 6e-8, about 1e-7 of the noise std at our scales) and CKKS encodes them
with an absolute error near 1e-15: far below anything an attack on floating-point noise has
been shown to use (the review found none).
"""

from __future__ import annotations

import math
import os

import numpy as np
from scipy.special import ndtri


def secure_gaussian(shape: tuple[int, ...] | int, std: float) -> np.ndarray:
    """Draw N(0, std²) values of ``shape`` (float64) from ``os.urandom``."""
    count = math.prod(shape) if isinstance(shape, tuple) else int(shape)
    raw = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
    sign = np.where(raw & np.uint64(1), 1.0, -1.0)
    uniform = ((raw >> np.uint64(1)).astype(np.float64) + 0.5) / 2.0**63
    return (sign * -ndtri(uniform / 2) * std).reshape(shape)
