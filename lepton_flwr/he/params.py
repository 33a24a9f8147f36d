"""CKKS parameters and their check against the Homomorphic Encryption Standard (128-bit)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lepton_flwr.he.publish import MAX_FLOODING_STD, TooCoarseError, check_floodable

# Largest total coefficient-modulus bit count for 128-bit classical security with a
# ternary secret, per poly modulus degree (HomomorphicEncryption.org standard, as SEAL
# enforces it with sec_level_type.tc128).
MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
MAX_PRIME_BITS = 60


def headroom(data_prime_bits: Sequence[int], scale_bits: int) -> float:
    """Largest magnitude a (summed) value may reach before CKKS wraps it around silently.

    Values travel in complex slots, two to a slot (:func:`lepton_flwr.he.codec.complex_slots`).
    The encoded polynomial's coefficients are bounded by the largest slot modulus times
    the scale, and a slot holding two values of magnitude at most v has modulus up to
    sqrt(2) v. A sum decodes correctly while its coefficients stay below half the data
    modulus Q, the product of the data primes; a b-bit prime is above 2**(b-1), so
    |v| < 2**(sum(b - 1) - 1 - scale) / sqrt(2) is safe (half a bit less than with real
    slots). CKKS raises no error when it is not.
    """
    return 2.0 ** (sum(b - 1 for b in data_prime_bits) - 1 - scale_bits) / math.sqrt(2)


class HEParamsError(ValueError):
    """CKKS parameters that are insecure or unusable; the message says what would work."""


@dataclass(frozen=True)
class CKKSParams:
    """CKKS encryption parameters for additive aggregation.

    Parameters
    ----------
    poly_modulus_degree : int
        N, a power of two; a ciphertext holds N values (the real and imaginary parts of
        its N/2 complex slots).
    coeff_mod_bit_sizes : tuple[int, ...]
        Bit sizes of the coefficient-modulus primes. The last one is SEAL's special
        prime (key switching, which sums never do; public-key encryption divides its
        noise by it); the others carry data, their product Q bounding scale × values.
        ``(40, 40, 29)`` at N=4096 uses the 109 bits that 128-bit security allows.
    scale_bits : int
        log2 of the encoding scale Δ. Decryption error is about 5e-16 per fresh value
        at 2^58: small enough that published decryptions can be flooded with noise
        (:mod:`lepton_flwr.he.publish`) at no cost in accuracy, with 2^18.5 of headroom
        (:func:`headroom`).
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (40, 40, 29)
    scale_bits: int = 58

    @property
    def slots(self) -> int:
        """Values per ciphertext: N (two to each of the N/2 complex slots)."""
        return self.poly_modulus_degree

    @property
    def headroom(self) -> float:
        """Largest magnitude a (summed) value may reach before it wraps around silently."""
        return headroom(self.coeff_mod_bit_sizes[:-1], self.scale_bits)

    def validate(self) -> None:
        """Refuse parameters below 128-bit security or unusable for aggregation.

        Raises
        ------
        HEParamsError
            Saying which parameter is wrong and what would work.
        """
        n, bits = self.poly_modulus_degree, list(self.coeff_mod_bit_sizes)
        if n not in MAX_COEFF_BITS_128:
            raise HEParamsError(
                f"poly_modulus_degree={n} is not supported; use one of "
                f"{sorted(MAX_COEFF_BITS_128)} (4096 or 8192 suit aggregation)."
            )
        if len(bits) < 2:
            raise HEParamsError(
                f"coeff_mod_bit_sizes={bits} needs at least two primes: one data prime "
                f"and SEAL's special prime, e.g. [40, 40, 29] at N=4096."
            )
        if any(not 20 <= b <= MAX_PRIME_BITS for b in bits):
            raise HEParamsError(
                f"coeff_mod_bit_sizes={bits}: each prime must have 20 to {MAX_PRIME_BITS} bits."
            )
        limit = MAX_COEFF_BITS_128[n]
        if sum(bits) > limit:
            bigger = [d for d, m in sorted(MAX_COEFF_BITS_128.items()) if m >= sum(bits)]
            hint = f"use poly_modulus_degree={bigger[0]}" if bigger else "use fewer bits"
            raise HEParamsError(
                f"Insecure CKKS parameters: coeff_mod_bit_sizes={bits} total {sum(bits)} "
                f"bits, but N={n} allows at most {limit} bits for 128-bit security; "
                f"{hint}, or primes totalling <= {limit} bits (e.g. [40, 40, {limit - 80}])."
            )
        data_bits = sum(bits[:-1])
        if not 20 <= self.scale_bits <= data_bits - 10:
            raise HEParamsError(
                f"scale_bits={self.scale_bits} must be between 20 and "
                f"{data_bits - 10} (the data primes' {data_bits} bits minus 10 bits of "
                f"headroom for the summed values)."
            )
        try:
            check_floodable(n, 2.0**self.scale_bits)
        except TooCoarseError as err:
            raise HEParamsError(
                f"scale_bits={self.scale_bits} is too coarse at N={n}: published decryptions "
                f"need noise flooding of std {err.std:.3g} per value (over "
                f"{MAX_FLOODING_STD:g}) to keep the key safe; use scale_bits >= "
                f"{err.min_scale_bits} (58 with coeff_mod_bit_sizes [40, 40, 29] at N=4096)."
            ) from err

    @classmethod
    def from_config(cls, he_cfg: dict) -> CKKSParams:
        """Build and validate parameters from the ``he`` config group."""
        params = cls(
            poly_modulus_degree=int(he_cfg["poly_modulus_degree"]),
            coeff_mod_bit_sizes=tuple(int(b) for b in he_cfg["coeff_mod_bit_sizes"]),
            scale_bits=int(he_cfg["scale_bits"]),
        )
        params.validate()
        return params
