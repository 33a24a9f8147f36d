"""The RDP epsilon the server reports every round is Opacus' own, to the last bit.

Holds for today's accountant (it hands its history to Opacus) and for any faster one
(e.g. each (z, q)'s per-step RDP computed once per process): the same releases must give
exactly Opacus' number, before and after more rounds are composed.
"""

from __future__ import annotations

import random

import numpy as np
from opacus.accountants import RDPAccountant

from lepton_flwr.dp import ClientLevelAccountant, accounting


def opacus_epsilon(history, delta):
    reference = RDPAccountant()
    reference.history = list(history)
    return float(reference.get_epsilon(delta))


def test_rdp_epsilon_equals_opacus_bit_for_bit_as_rounds_are_composed():
    rng = random.Random(22)
    for _ in range(6):
        ours = ClientLevelAccountant("rdp", "poisson")
        delta = rng.choice([1e-5, 1e-6, 1e-3])
        for _ in range(rng.randint(1, 4)):
            z, q = rng.choice([0.8, 1.1, 2.5]), rng.choice([0.01, 0.1, 0.3])
            ours.compose(z, q, rng.randint(1, 20))
            assert ours.epsilon(delta) == opacus_epsilon(ours.history, delta)
            trial = ours.epsilon_after(z, q, delta, rounds=3)
            assert trial == opacus_epsilon(
                [*ours.history[:-1], (*ours.history[-1][:2], ours.history[-1][2] + 3)], delta
            )


# Review T: a cache keyed by value served np.float32(1.1)'s figure (float32 arithmetic in
# Opacus) to the equal Python float, so epsilon depended on what the process computed first.
def test_an_earlier_float32_noise_multiplier_does_not_change_a_float_history_epsilon():
    accounting._rdp_per_step.cache_clear()
    z32, q, delta = np.float32(1.1), 0.013, 1e-5
    first = ClientLevelAccountant()
    first.compose(z32, q, 100)
    first.epsilon(delta)  # fills the cache with float32 arithmetic
    later = ClientLevelAccountant()
    later.compose(float(z32), q, 100)
    try:
        assert later.epsilon(delta) == opacus_epsilon([(float(z32), q, 100)], delta)
    finally:
        accounting._rdp_per_step.cache_clear()
