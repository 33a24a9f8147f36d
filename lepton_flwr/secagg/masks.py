"""A sum of self-masks and signed pairwise masks, one ring element per ciphertext chunk.

Both ends of the protocol need one: a client adds b_u's mask and, for each peer v it
masked with, +m_uv if u < v and −m_uv if u > v; the server subtracts the survivors'
self-masks and the pairwise terms they added for peers that dropped. Masks are
:func:`lepton_flwr.he.ring_masks.ring_mask` rows (NTT form, one row per RNS prime),
purpose ``b"self"`` or ``b"pair"``, labelled with the round and the chunk.
"""

from __future__ import annotations

import numpy as np

from lepton_flwr.he.ring_masks import MAX_PRIME_BITS, add_mod, ring_mask, sub_mod, sum_mod
from lepton_flwr.numbers import is_int
from lepton_flwr.secagg.keys import SECRET_BYTES, check_round

SELF = b"self"
PAIR = b"pair"


def check_ring(primes: object, degree: object) -> tuple[list[int], int]:
    """(primes, degree) if they describe a ring the masks can live in; else ValueError."""
    if (
        not isinstance(primes, list | tuple)
        or not primes
        or not all(is_int(q) and 2 <= q < 1 << MAX_PRIME_BITS for q in primes)
    ):
        raise ValueError(f"primes must be a non-empty list of integers in [2, 2^{MAX_PRIME_BITS})")
    if not is_int(degree) or degree < 1:
        raise ValueError("degree must be a positive integer")
    return [int(q) for q in primes], int(degree)


class MaskSum:
    """chunk index -> Σ self-masks + Σ sign · pairwise masks, uint64 of shape (primes, degree).

    Parameters
    ----------
    server_round
        The round the masks are labelled with.
    self_seeds
        32-byte seeds of the self-masks added.
    pair_terms
        (sign, 32-byte seed) of each pairwise mask, sign +1 (added) or −1 (subtracted).
    primes, degree
        The ring: the RNS primes of the level the masks are added at, and N.
    """

    def __init__(
        self,
        server_round: int,
        self_seeds: list[bytes],
        pair_terms: list[tuple[int, bytes]],
        primes: list[int],
        degree: int,
    ) -> None:
        self.server_round = check_round(server_round)
        self.primes, self.degree = check_ring(primes, degree)
        for seed in [*self_seeds, *(seed for _, seed in pair_terms)]:
            if not isinstance(seed, bytes) or len(seed) != SECRET_BYTES:
                raise ValueError(f"a mask seed is {SECRET_BYTES} bytes")
        if any(sign not in (1, -1) for sign, _ in pair_terms):
            raise ValueError("a pairwise mask's sign is +1 or -1")
        self._self_seeds = list(self_seeds)
        self._added = [seed for sign, seed in pair_terms if sign == 1]
        self._subtracted = [seed for sign, seed in pair_terms if sign == -1]

    @property
    def terms(self) -> int:
        """How many masks each chunk's sum expands."""
        return len(self._self_seeds) + len(self._added) + len(self._subtracted)

    def _sum(self, seeds: list[bytes], purpose: bytes, chunk: int) -> np.ndarray:
        masks = (
            ring_mask(seed, purpose, self.server_round, chunk, self.primes, self.degree)
            for seed in seeds
        )
        return sum_mod(masks, self.primes, self.degree)

    def __call__(self, chunk_index: int) -> np.ndarray:
        """The ring element for ciphertext chunk ``chunk_index``."""
        if not is_int(chunk_index) or not 0 <= chunk_index < 1 << 63:
            raise ValueError(f"a chunk index is an integer in [0, 2^63), not {chunk_index!r}")
        total = add_mod(
            self._sum(self._self_seeds, SELF, chunk_index),
            self._sum(self._added, PAIR, chunk_index),
            self.primes,
        )
        return sub_mod(total, self._sum(self._subtracted, PAIR, chunk_index), self.primes)
