"""CKKS parameters and their check against the Homomorphic Encryption Standard (128-bit)."""

from __future__ import annotations

from dataclasses import dataclass

# Largest total coefficient-modulus bit count for 128-bit classical security with a
# ternary secret, per poly modulus degree (HomomorphicEncryption.org standard, as SEAL
# enforces it with sec_level_type.tc128).
MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
MAX_PRIME_BITS = 60


def headroom(data_prime_bits: int, scale_bits: int) -> float:
    """Largest magnitude a (summed) value may reach before CKKS wraps it around silently.

    A value v is encoded as v * 2**scale_bits and decodes correctly while that stays
    below half the data prime q; a b-bit prime is above 2**(b-1), so |v| < 2**(b-2-scale)
    is safe. CKKS raises no error when it is not.
    """
    return 2.0 ** (data_prime_bits - scale_bits - 2)


class HEParamsError(ValueError):
    """CKKS parameters that are insecure or unusable; the message says what would work."""


@dataclass(frozen=True)
class CKKSParams:
    """CKKS encryption parameters for additive aggregation.

    Parameters
    ----------
    poly_modulus_degree : int
        N, a power of two; a ciphertext holds N/2 values (slots).
    coeff_mod_bit_sizes : tuple[int, ...]
        Bit sizes of the coefficient-modulus primes. The last one is SEAL's special
        prime (key switching only); the others carry data. Sums need no rescaling, so
        one data prime is enough: ``(56, 53)`` at N=4096 uses the 109 bits that 128-bit
        security allows; a 56-bit data prime compresses to 7 bytes per coefficient.
    scale_bits : int
        log2 of the encoding scale: about the precision in bits after the point.
    """

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (56, 53)
    scale_bits: int = 36

    @property
    def slots(self) -> int:
        """Values per ciphertext (N/2)."""
        return self.poly_modulus_degree // 2

    @property
    def headroom(self) -> float:
        """Largest magnitude a (summed) value may reach before it wraps around silently."""
        return headroom(self.coeff_mod_bit_sizes[0], self.scale_bits)

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
                f"and SEAL's special prime, e.g. [60, 49] at N=4096."
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
                f"{hint}, or primes totalling <= {limit} bits (e.g. [60, {limit - 60}])."
            )
        if not 20 <= self.scale_bits <= bits[0] - 10:
            raise HEParamsError(
                f"scale_bits={self.scale_bits} must be between 20 and "
                f"{bits[0] - 10} (the first prime's {bits[0]} bits minus 10 bits of "
                f"headroom for the summed values)."
            )

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
