"""Decryptions that may leave the key holder: flooded with noise, then rounded.

CKKS decryption returns the message plus an error term that depends on the secret key.
Whoever holds a ciphertext and its exact decryption can solve for the key (Li and
Micciancio, "On the security of homomorphic encryption on approximate numbers",
EUROCRYPT 2021), and with the one shared key read every client's upload. SEAL, and so
TenSEAL, leaves the defence to the application. Every decryption in this pack (a
client's view of the global model, the key holder's evaluation, ``decrypt_arrays`` and
``lepton-flwr decrypt``) goes through :func:`publishable`, which

1. bounds the error: a fresh ciphertext's error polynomial has coefficients of standard
   deviation at most ``COEFF_STD`` = 16 (SEAL's σ = 3.2 for secret-key encryption; about
   15 after public-key encryption and the switch to the data level), a sum of K of them
   sqrt(K) times that, and a slot decodes it with standard deviation
   ``COEFF_STD * sqrt(K * N / 2) / Δ``; E is ``TAIL`` = 12 of those, for up to
   ``MAX_SUMMED`` = 2^16 ciphertexts summed (clients × rounds);
2. adds Gaussian noise of standard deviation σ_f with log2 σ_f = log2 E + s/2 +
   log2(64 t)/2, the flooding that Li, Micciancio, Schultz and Sorrell ("Securing
   approximate homomorphic encryption using differential privacy", CRYPTO 2022, §6.2)
   give for s bits of statistical security over t decryptions, here s = 30 (OpenFHE's
   default) and t = 1024 decryptions under one key; the noise comes from the operating
   system's secure randomness;
3. rounds to the power of two at or below σ_f (the stated precision), before dividing by
   the model's weight.

At the default parameters (N = 4096, Δ = 2^58) σ_f is 6.5e-5 in units of the summed
values (divided by the total weight for HE-FedAvg, about 1e-6 on Fashion-MNIST's ten
clients; 6.5e-5 per weight under HE + DP, whose DP noise is a thousand times larger):
nothing an accuracy figure shows. At the old 2^36 scale the same flooding would have
been 4e6 times larger, which is why the defaults changed.

Not protected: this is a defence against parties that see honestly computed
ciphertexts and their decryptions (IND-CPA-D). A malicious server that crafts the
ciphertext a key holder decrypts and publishes (one whose error it chose) can still
learn about the key from the result; decrypt and publish only models from a server
you trust to follow the protocol.
"""

from __future__ import annotations

import math

import numpy as np

from lepton_flwr.dp.noise import secure_gaussian

COEFF_STD = 16.0
TAIL = 12.0
MAX_SUMMED = 2**16
STATISTICAL_SECURITY = 30
DECRYPTIONS = 1024
# Largest flooding std (in units of the summed values) a context may need: a coarser
# scale would cost accuracy, so such parameters are refused (CKKSParams.validate) and
# such keys cannot publish.
MAX_FLOODING_STD = 1e-3


class TooCoarseError(ValueError):
    """CKKS parameters whose decryptions cannot be flooded without costing accuracy."""


def error_bound(poly_modulus_degree: int, scale: float, summed: int = MAX_SUMMED) -> float:
    """E: the bound on a decrypted slot's error, in units of the summed values."""
    return TAIL * COEFF_STD * math.sqrt(summed * poly_modulus_degree / 2) / scale


def flooding_std(
    poly_modulus_degree: int,
    scale: float,
    security_bits: int = STATISTICAL_SECURITY,
    decryptions: int = DECRYPTIONS,
) -> float:
    """σ_f = E · 2^(s/2) · sqrt(64 t): the noise added to every published decryption."""
    return (
        error_bound(poly_modulus_degree, scale)
        * 2.0 ** (security_bits / 2)
        * math.sqrt(64 * decryptions)
    )


def precision(std: float) -> float:
    """The rounding quantum: the power of two at or below ``std``."""
    return 2.0 ** math.floor(math.log2(std))


def publishable(
    decrypted: np.ndarray, weight: float, poly_modulus_degree: int, scale: float
) -> np.ndarray:
    """Flood a decrypted sum with noise, divide by its weight, round to the stated precision.

    Parameters
    ----------
    decrypted : np.ndarray
        The decrypted (weighted) sum, before division by ``weight``.
    weight : float
        The sum's total weight.
    poly_modulus_degree, scale : int, float
        N and Δ of the context that decrypted it.

    Returns
    -------
    np.ndarray
        ``round((decrypted + N(0, σ_f²)) / weight)`` to a multiple of
        ``precision(σ_f / weight)``.

    Raises
    ------
    TooCoarseError
        If σ_f passes ``MAX_FLOODING_STD`` (keys made with a coarse scale).
    """
    std = flooding_std(poly_modulus_degree, scale)
    if std > MAX_FLOODING_STD:
        raise TooCoarseError(
            f"CKKS scale 2^{math.log2(scale):.0f} at N={poly_modulus_degree} needs flooding "
            f"noise {std:.3g} on every published value (more than {MAX_FLOODING_STD:g}); make "
            f"keys with the default parameters (`lepton-flwr keygen`), scale 2^54 or more"
        )
    flooded = (decrypted + secure_gaussian(decrypted.shape, std)) / weight
    quantum = precision(std / weight)
    return np.round(flooded / quantum) * quantum
