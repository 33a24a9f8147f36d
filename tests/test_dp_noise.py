"""DP noise from the OS's secure randomness: Gaussian, and no seed reproduces it."""

import numpy as np
import pytest
from scipy import stats

from lepton_flwr.dp.noise import secure_gaussian


def test_secure_gaussian_is_gaussian_with_the_std_asked_for():
    draws = secure_gaussian((400_000,), 2.5)
    assert draws.dtype == np.float64 and draws.shape == (400_000,)
    assert np.std(draws) == pytest.approx(2.5, rel=0.01)
    assert abs(np.mean(draws)) < 5 * 2.5 / np.sqrt(len(draws))
    assert stats.kstest(draws / 2.5, "norm").pvalue > 1e-4
    # Both tails, as a Gaussian's: P(|Z| > 3) = 0.0027.
    assert np.mean(draws > 3 * 2.5) == pytest.approx(0.00135, rel=0.25)
    assert np.mean(draws < -3 * 2.5) == pytest.approx(0.00135, rel=0.25)
    assert secure_gaussian((3, 4), 1.0).shape == (3, 4)


def test_no_library_seed_reproduces_the_noise():
    import torch

    draws = []
    for _ in range(2):
        np.random.seed(0)
        torch.manual_seed(0)
        draws.append(secure_gaussian(1000, 1.0))
    assert not np.array_equal(draws[0], draws[1])


def test_the_extreme_draws_reach_the_tail_the_docs_state(monkeypatch):
    """All-zero and all-one random bits give the largest magnitudes: ±9.16 σ."""
    from lepton_flwr.dp import noise

    for byte, sign in ((b"\x00", -1.0), (b"\x01", 1.0)):
        monkeypatch.setattr(noise.os, "urandom", lambda n, b=byte: b + b"\x00" * (n - 1))
        assert noise.secure_gaussian(1, 2.0)[0] == pytest.approx(sign * 9.155 * 2.0, rel=1e-3)


def test_dp_fedavg_draws_its_noise_from_the_secure_generator_unless_seeded(monkeypatch):
    from lepton_flwr.dp import rounds
    from lepton_flwr.dp.rounds import DPRounds

    calls = []
    monkeypatch.setattr(rounds, "secure_gaussian", lambda shape, std: calls.append(std) or 0.0)
    settings = dict(noise_multiplier=1.0, delta=1e-3, sample_rate=1.0)
    DPRounds(**settings).gaussian(3, 0.5)
    assert calls == [0.5]
    DPRounds(**settings, seed=1).gaussian(3, 0.5)  # a seed: numpy, reproducible, not private
    assert calls == [0.5]
