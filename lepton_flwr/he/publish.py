"""Decryptions that may leave the key holder: flooded with noise, then rounded.

CKKS decryption returns the message plus an error term that depends on the secret key.
Whoever holds a ciphertext and its exact decryption can solve for the key (Li and
Micciancio, "On the security of homomorphic encryption on approximate numbers",
EUROCRYPT 2021), and with the one shared key read every client's upload. SEAL, and so
TenSEAL, leaves the defence to the application. Every decryption in this pack (a
client's view of the global model, the key holder's evaluation, ``decrypt_arrays`` and
``lepton-flwr decrypt``) goes through :func:`publishable`, which

1. bounds the error of the whole published vector: a fresh ciphertext's error
   polynomial has coefficients of standard deviation at most ``COEFF_STD`` = 16 at
   N = 4096 (SEAL's σ = 3.2 for secret-key encryption; about 15 after public-key
   encryption and the switch to the data level; it grows like sqrt(N) above, and
   :func:`coefficient_std` scales the bound with it), a sum of K of them sqrt(K) times
   that, and each published value carries ``σ_v = std * sqrt(K * N / 2) / Δ`` of it
   (:func:`value_error_std`;
   K = ``MAX_SUMMED`` = 2^16 ciphertexts summed, clients × rounds). Packed ciphertexts
   (:mod:`lepton_flwr.he.packed`) add rounding terms, each a function of c0, which is
   uniform mod Q (c0 hides the message under -a·s, a uniform), so each term is uniform
   on [-2^(d-1), 2^(d-1)] and independent of the encryption's error (mean 0, variance
   :func:`rounding_variance`). An upload's c0 loses its d <= ``MAX_UPLOAD_DROP`` = 4
   low bits: the error becomes e + r with r bounded by 2^(d-1), hence 2^(d-1)-sub-Gaussian
   (Hoeffding), and even at that parameter sqrt(3.2² + 4^(d-1)) = 8.6 <= ``COEFF_STD``
   at d = 4 (:func:`upload_coefficient_std`; d = 5 would give 16.3). The server keeps
   its sum exact and rounds only the copy it sends, once, at d_down <=
   ``MAX_DOWNLOAD_DROP`` = 12: std 1,182 a coefficient (:func:`rounding_variance`), the
   variance of 5,462 fresh ciphertexts at ``COEFF_STD``, so a downloaded sum may hold at
   most ``summed_limit(12)`` = 2^16 - 5,462 = 60,074 uploads (:func:`check_summed`),
   and K·COEFF_STD² plus that rounding stays within MAX_SUMMED·COEFF_STD². The n values of a
   model are orthogonal projections of the ciphertexts' independent errors, so the L2
   norm of their error vector is at most E = σ_v (sqrt(n) + ``TAIL``) but with
   probability e^(-TAIL² / 2) = 2^-104, TAIL = 12 (:func:`error_bound`; Gaussian
   concentration of a 1-Lipschitz function);
2. adds Gaussian noise of standard deviation σ_f with log2 σ_f = log2 E + s/2 +
   log2(64 t)/2, the flooding that the Gaussian-mechanism argument needs for s bits of
   statistical security over t decryptions, as Li, Micciancio, Schultz and Sorrell
   ("Securing approximate homomorphic encryption using differential privacy", CRYPTO
   2022, §6.2) state it (their Theorem 3 needs less under a finer definition of bit
   security; we keep this larger one). E there bounds the L2 norm of the error of all
   that one decryption releases, not of one value: a bound on one value's error would
   leave 25.5 bits, not 30, at the defaults. Here s = 30 (OpenFHE's default) and
   t = ``DECRYPTIONS`` = 1024 decryptions of a model under one key, the unit that the
   decryption counts keep (:mod:`lepton_flwr.he.ledger`): a model is one query however
   many ciphertexts it spans, its n values together (c ciphertexts counted as c queries
   of n/c values each would need about as much: the squared bounds add up). The noise
   comes from the operating system's secure randomness;
3. rounds to the power of two at or below σ_f (the stated precision), before dividing by
   the model's weight.

σ_f grows with the square root of the model's size. At the default parameters
(N = 4096, Δ = 2^58) it is 3.1e-4 in units of the summed values for one ciphertext's
2,048 values, and 1.1e-3 for the main job's 39,700-weight ScatterNet, whose released
model has weight 1 under HE + DP and DP noise zC/d = 1.29 / 100 = 0.013 per weight
(11 times σ_f: it adds 0.4 % to the noise's standard deviation); HE-FedAvg divides
σ_f by the total weight. At the old 2^36 scale the flooding would have been 4e6 times
larger, which is why the defaults changed.

Not protected: this is a defence against parties that see honestly computed
ciphertexts and their decryptions (IND-CPA-D). A malicious server that crafts the
ciphertext a key holder decrypts and publishes (one whose error it chose) can still
learn about the key from the result; decrypt and publish only models from a server
you trust to follow the protocol. Decryptions are counted per party and key, not across
all the parties that share a key (each client, and the key holder, has its own budget).
"""

from __future__ import annotations

import math

import numpy as np

from lepton_flwr.dp.grid import power_of_two_at_or_below
from lepton_flwr.dp.noise import secure_gaussian

COEFF_STD = 16.0
TAIL = 12.0
MAX_SUMMED = 2**16
STATISTICAL_SECURITY = 30
DECRYPTIONS = 1024
# Largest flooding std (in units of the summed values) a key may need for a model of
# REFERENCE_VALUES values (one ciphertext at N = 4096; σ_f grows with about the square
# root of a model's size): a coarser scale would cost accuracy, so such parameters are
# refused (CKKSParams.validate) and such keys cannot publish.
MAX_FLOODING_STD = 1e-3
REFERENCE_VALUES = 2048
SECRET_KEY_STD = 3.2  # SEAL's error std for secret-key encryption (clients' uploads)
MAX_UPLOAD_DROP = 4  # low bits of an upload's c0 the bound covers (upload_coefficient_std)
MAX_DOWNLOAD_DROP = 12  # low bits of a sent sum's c0: costs 1/12 of MAX_SUMMED (summed_limit)


class TooCoarseError(ValueError):
    """CKKS parameters whose decryptions cannot be flooded without costing accuracy.

    ``std`` is the flooding they would need for ``REFERENCE_VALUES`` values,
    ``min_scale_bits`` the smallest log2 scale that would do at the same N.
    """

    def __init__(self, message: str, std: float, min_scale_bits: int) -> None:
        super().__init__(message)
        self.std, self.min_scale_bits = std, min_scale_bits


def coefficient_std(poly_modulus_degree: int) -> float:
    """The bound on a fresh ciphertext's error coefficients' std at this N.

    ``COEFF_STD`` at N = 4096 and below; public-key encryption's error grows like
    sqrt(N) (about sqrt(N / 18): 15.1 at 4096, 21.3 at 8192), so larger rings scale the
    bound with it, keeping the margin it has at 4096.
    """
    return COEFF_STD * math.sqrt(max(1.0, poly_modulus_degree / 4096))


def value_error_std(poly_modulus_degree: int, scale: float, summed: int = MAX_SUMMED) -> float:
    """σ_v: the standard deviation of one decrypted value's error, in summed-value units."""
    return (
        coefficient_std(poly_modulus_degree) * math.sqrt(summed * poly_modulus_degree / 2) / scale
    )


def error_bound(
    poly_modulus_degree: int, scale: float, values: int, summed: int = MAX_SUMMED
) -> float:
    """E = σ_v (sqrt(values) + TAIL): the bound on the L2 norm of ``values`` values' error."""
    return value_error_std(poly_modulus_degree, scale, summed) * (math.sqrt(values) + TAIL)


def flooding_std(
    poly_modulus_degree: int,
    scale: float,
    values: int,
    security_bits: int = STATISTICAL_SECURITY,
    decryptions: int = DECRYPTIONS,
) -> float:
    """σ_f = E · 2^(s/2) · sqrt(64 t): the noise added to each of ``values`` published values."""
    return (
        error_bound(poly_modulus_degree, scale, values)
        * 2.0 ** (security_bits / 2)
        * math.sqrt(64 * decryptions)
    )


def check_floodable(poly_modulus_degree: int, scale: float) -> float:
    """The flooding std of ``REFERENCE_VALUES`` values, if the key's scale allows it.

    Raises
    ------
    TooCoarseError
        If it passes ``MAX_FLOODING_STD`` (keys made with a coarse scale), naming the
        smallest scale that would do.
    """
    std = flooding_std(poly_modulus_degree, scale, REFERENCE_VALUES)
    if std > MAX_FLOODING_STD:
        enough = math.ceil(math.log2(scale) + math.log2(std / MAX_FLOODING_STD))
        raise TooCoarseError(
            f"CKKS scale 2^{math.log2(scale):.0f} at N={poly_modulus_degree} needs flooding "
            f"noise {std:.3g} on every value of a {REFERENCE_VALUES}-value model (more than "
            f"{MAX_FLOODING_STD:g}); make keys with the default parameters (`lepton-flwr "
            f"keygen`), scale 2^{enough} or more",
            std,
            enough,
        )
    return std


def precision(std: float) -> float:
    """The rounding quantum: the power of two at or below ``std``."""
    return power_of_two_at_or_below(std)


def publishable(
    decrypted: np.ndarray, weight: float, poly_modulus_degree: int, scale: float
) -> np.ndarray:
    """Flood a decrypted sum with noise, divide by its weight, round to the stated precision.

    Parameters
    ----------
    decrypted : np.ndarray
        The decrypted (weighted) sum, before division by ``weight``: every value that
        one decryption releases (the noise is sized for their number).
    weight : float
        The sum's total weight.
    poly_modulus_degree, scale : int, float
        N and Δ of the context that decrypted it.

    Returns
    -------
    np.ndarray
        ``round((decrypted + N(0, σ_f²)) / weight)`` to a multiple of
        ``precision(σ_f / weight)``, σ_f = ``flooding_std(N, Δ, decrypted.size)``.

    Raises
    ------
    TooCoarseError
        If the key's scale is too coarse to flood (:func:`check_floodable`).
    """
    check_floodable(poly_modulus_degree, scale)
    std = flooding_std(poly_modulus_degree, scale, decrypted.size)
    flooded = (decrypted + secure_gaussian(decrypted.shape, std)) / weight
    quantum = precision(std / weight)
    return np.round(flooded / quantum) * quantum


def rounding_variance(drop: int) -> float:
    """Variance of the error of rounding a uniform integer to a multiple of 2^drop.

    Ties go to even (:mod:`lepton_flwr.he.packed`), so the error of a word uniform mod
    2^drop takes the values -(a-1)..(a-1) with probability 1/(2a) each and ±a with
    1/(4a) each, a = 2^(drop-1): mean 0, variance (2a² + 1) / 6 (about 4^drop / 12).
    """
    if drop == 0:
        return 0.0
    half = 2.0 ** (drop - 1)
    return (2 * half * half + 1) / 6


def upload_coefficient_std(drop: int) -> float:
    """A bound on the error of a packed upload's coefficient: sqrt(σ² + 4^(drop-1)).

    σ = ``SECRET_KEY_STD``; the rounding error is bounded by 2^(drop-1), so it is
    2^(drop-1)-sub-Gaussian (Hoeffding) whatever its distribution, and independent of the
    encryption's error. ``MAX_UPLOAD_DROP`` is the largest drop for which this stays
    within ``COEFF_STD``.
    """
    rounding = 0.0 if drop == 0 else 4.0 ** (drop - 1)
    return math.sqrt(SECRET_KEY_STD**2 + rounding)


def summed_limit(download_drop: int) -> int:
    """Uploads a downloaded sum may hold when the copy sent loses ``download_drop`` bits.

    The bound covers MAX_SUMMED·COEFF_STD² of variance a coefficient; one rounding of the
    sum takes ceil(rounding_variance / COEFF_STD²) uploads' worth of it (5,462 at 12).
    """
    return MAX_SUMMED - math.ceil(rounding_variance(download_drop) / COEFF_STD**2)


class TooManySummedError(ValueError):
    """A sum of more ciphertexts than the flooding covers (``summed_limit``)."""


def check_summed(count: int, download_drop: int = 0) -> int:
    """``count`` if a sum of that many uploads, rounded at ``download_drop``, is covered.

    Raises
    ------
    TooManySummedError
        If ``count`` passes :func:`summed_limit` (or is negative).
    """
    limit = summed_limit(download_drop)
    if not 0 <= count <= limit:
        raise TooManySummedError(
            f"a sum of {count} uploads, sent with {download_drop} low bits dropped: the "
            f"flooding covers at most {limit} (MAX_SUMMED = {MAX_SUMMED})"
        )
    return count
