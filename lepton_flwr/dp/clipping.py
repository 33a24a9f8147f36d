"""Clipping of model updates, fixed or adaptive (Andrew et al., 2021)."""

from __future__ import annotations

import math

import numpy as np


def l2_norm(tensors: list[np.ndarray]) -> float:
    """Global L2 norm of a list of tensors, as one flat vector."""
    return math.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64))) for t in tensors))


def clip(tensors: list[np.ndarray], clip_norm: float) -> tuple[list[np.ndarray], float]:
    """Scale tensors so that their global L2 norm is at most ``clip_norm``.

    Returns
    -------
    tuple[list[np.ndarray], float]
        The clipped tensors and the norm before clipping.
    """
    norm = l2_norm(tensors)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return [t * factor for t in tensors], norm


def adapt_clip_norm(
    clip_norm: float, unclipped_fraction: float, target_quantile: float, lr: float
) -> float:
    """Geometric update of the clipping norm toward the target quantile of update norms.

    ``C <- C * exp(-lr * (b - target_quantile))``, where ``b`` is the (noisy) fraction of
    clients whose update norm was at most C (Andrew et al., "Differentially Private
    Learning with Adaptive Clipping", 2021), estimated from the centred count
    ``1/2 + (Σ (b_i − 1/2) + noise) / d``.
    """
    return clip_norm * math.exp(-lr * (unclipped_fraction - target_quantile))


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Noise multiplier left for the update when the unclipped count is noised too.

    Adaptive clipping releases a noisy count (std ``count_stddev``) besides the noisy
    sum. The count adds up centred bits b − 1/2, so one client moves it by at most 1/2
    (and the sum by at most C); both together are a Gaussian mechanism of multiplier
    ``noise_multiplier`` when the update gets ``(z^-2 - (2 count_stddev)^-2)^(-1/2)``
    (Andrew et al., Theorem 1). With uncentred bits (sensitivity 1) this split would
    understate ε.

    Raises
    ------
    ValueError
        If ``count_stddev <= z / 2`` (the count alone would spend the whole budget).
    """
    if count_stddev <= noise_multiplier / 2:
        raise ValueError(
            f"count_stddev={count_stddev} must exceed noise_multiplier / 2 = "
            f"{noise_multiplier / 2}; the count would use up the whole privacy budget."
        )
    return (noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5
