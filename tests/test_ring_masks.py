"""Ring masks (issue 20's first block): exactly uniform, deterministic, cancelling in pairs."""

import numpy as np
import pytest
from scipy import stats

from lepton_flwr.he.ring_masks import add_mod, ring_mask, sub_mod, sum_mod, uniform_mod

PRIMES = [1099511390209, 1099511480321]  # the default context's two 40-bit data primes
SEED = bytes(range(32))


def test_a_mask_is_a_function_of_seed_and_label_and_longer_draws_extend_it():
    short = uniform_mod(SEED, b"label", PRIMES[0], 100)
    long = uniform_mod(SEED, b"label", PRIMES[0], 5000)
    np.testing.assert_array_equal(short, long[:100])
    assert not np.array_equal(short, uniform_mod(SEED, b"other", PRIMES[0], 100))
    assert not np.array_equal(short, uniform_mod(bytes(32), b"label", PRIMES[0], 100))


@pytest.mark.parametrize("prime", [PRIMES[0], 1048583, 65537])
def test_values_are_uniform_below_the_prime(prime):
    """65537 and 1048583 lie just above a power of two: about half the words are rejected,
    so without the rejection values would reach 2^17 or 2^21 (fixed seed: exact test)."""
    values = uniform_mod(SEED, b"uniform", prime, 200_000)
    assert values.dtype == np.uint64 and values.max() < prime
    buckets = np.bincount((values.astype(np.float64) * 64 / prime).astype(int), minlength=64)
    assert stats.chisquare(buckets).pvalue > 1e-3
    low_half = np.mean(values < prime // 2)
    assert abs(low_half - 0.5) < 0.01


def test_each_role_round_and_chunk_gets_its_own_mask():
    base = ring_mask(SEED, b"self", 3, 0, PRIMES, 4096)
    assert base.shape == (2, 4096) and (base < np.array(PRIMES, np.uint64)[:, None]).all()
    for other in (
        ring_mask(SEED, b"pair", 3, 0, PRIMES, 4096),
        ring_mask(SEED, b"self", 4, 0, PRIMES, 4096),
        ring_mask(SEED, b"self", 3, 1, PRIMES, 4096),
    ):
        assert not np.array_equal(base, other)
    np.testing.assert_array_equal(base, ring_mask(SEED, b"self", 3, 0, PRIMES, 4096))


def test_pairwise_masks_cancel_in_the_sum_and_self_masks_come_off():
    """Client i adds +m_ij for j > i and −m_ij for j < i, plus its self-mask b_i: the sum
    of the masked values minus Σ b_i is the sum of the values, word for word."""
    clients, degree = 4, 4096
    rng = np.random.default_rng(0)
    values = [
        rng.integers(0, PRIMES[0], (2, degree), dtype=np.uint64)
        % np.array(PRIMES, np.uint64)[:, None]
        for _ in range(clients)
    ]
    pair_seed = {(i, j): bytes([i, j] * 16) for i in range(clients) for j in range(i + 1, clients)}
    self_seed = [bytes([100 + i] * 32) for i in range(clients)]
    masked_sum = np.zeros((2, degree), np.uint64)
    plain_sum = np.zeros((2, degree), np.uint64)
    for i in range(clients):
        upload = add_mod(values[i], ring_mask(self_seed[i], b"self", 1, 0, PRIMES, degree), PRIMES)
        for j in range(clients):
            if i == j:
                continue
            m = ring_mask(pair_seed[min(i, j), max(i, j)], b"pair", 1, 0, PRIMES, degree)
            upload = add_mod(upload, m, PRIMES) if i < j else sub_mod(upload, m, PRIMES)
        assert not np.array_equal(upload, values[i])
        masked_sum = add_mod(masked_sum, upload, PRIMES)
        plain_sum = add_mod(plain_sum, values[i], PRIMES)
    for i in range(clients):
        masked_sum = sub_mod(
            masked_sum, ring_mask(self_seed[i], b"self", 1, 0, PRIMES, degree), PRIMES
        )
    np.testing.assert_array_equal(masked_sum, plain_sum)


def test_every_row_of_a_ring_element_is_uniform_below_its_prime():
    """All rows come from one stream; a row with a word to reject (always for 65537 and
    97, about one in a thousand for a data prime) is drawn again on its own stream: no
    value reaches its prime, and each prime's values pass a chi-square test."""
    primes = [65537, PRIMES[0], 97]
    elements = np.stack([ring_mask(SEED, b"pair", 2, chunk, primes, 4096) for chunk in range(40)])
    for row, prime in enumerate(primes):
        values = elements[:, row, :].ravel()
        assert values.max() < prime
        if prime < 1000:  # every value its own bucket
            buckets = np.bincount(values.astype(np.int64), minlength=prime)
        else:
            buckets = np.bincount(
                (values.astype(np.float64) * 32 / prime).astype(int), minlength=32
            )
        assert stats.chisquare(buckets).pvalue > 1e-3, prime
    with pytest.raises(ValueError, match="primes"):
        ring_mask(SEED, b"pair", 2, 0, [1 << 62], 16)


def test_a_bad_seed_or_prime_is_refused():
    with pytest.raises(ValueError, match="32 bytes"):
        uniform_mod(b"short", b"x", PRIMES[0], 4)
    with pytest.raises(ValueError, match="outside"):
        uniform_mod(SEED, b"x", 1 << 62, 4)


@pytest.mark.parametrize("primes", [[1099511390209, 1099511480321], [(1 << 62) - 57, 97]])
@pytest.mark.parametrize("count", [0, 1, 3, 4, 7, 40])
def test_sum_mod_is_the_sum_mod_each_prime(primes, count):
    """Lazy reduction (a batch of 3 for a 62-bit prime) equals Python's exact sum."""
    rng = np.random.default_rng(count)
    elements = [
        np.stack([rng.integers(0, q, size=16, dtype=np.uint64) for q in primes])
        for _ in range(count)
    ]
    exact = [
        [sum(int(e[j, i]) for e in elements) % q for i in range(16)] for j, q in enumerate(primes)
    ]
    assert np.array_equal(sum_mod(elements, primes, 16), np.array(exact, dtype=np.uint64))
    # the largest words: every batch at its limit
    top = [np.array([[q - 1] * 16 for q in primes], dtype=np.uint64)] * count
    expected = np.array([[(count * (q - 1)) % q] * 16 for q in primes], dtype=np.uint64)
    assert np.array_equal(sum_mod(top, primes, 16), expected)
