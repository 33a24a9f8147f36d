"""Client-level accounting against dp-accounting (Google's library) as the reference."""

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from lepton_flwr.dp import ClientLevelAccountant, PrivacyConfigError, calibrate_noise_multiplier

GRID = [
    (0.8, 0.01, 100, 1e-5),
    (1.0, 0.1, 50, 1e-5),
    (1.5, 0.05, 200, 1e-6),
    (3.0, 0.2, 20, 1e-3),
    (0.6, 0.02, 500, 1e-5),
]


def _poisson(z, q):
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))


@pytest.mark.parametrize(("z", "q", "rounds", "delta"), GRID)
def test_poisson_rdp_matches_dp_accounting_rdp(z, q, rounds, delta):
    ours = ClientLevelAccountant("rdp", "poisson")
    ours.compose(z, q, rounds)
    reference = RdpAccountant()
    reference.compose(_poisson(z, q), rounds)
    assert ours.epsilon(delta) == pytest.approx(reference.get_epsilon(delta), rel=0.01)


@pytest.mark.parametrize(("z", "q", "rounds", "delta"), GRID)
def test_poisson_prv_matches_dp_accounting_pld(z, q, rounds, delta):
    ours = ClientLevelAccountant("prv", "poisson")
    ours.compose(z, q, rounds)
    reference = PLDAccountant()
    reference.compose(_poisson(z, q), rounds)
    assert ours.epsilon(delta) == pytest.approx(reference.get_epsilon(delta), rel=0.01)


@pytest.mark.parametrize(("z", "q", "rounds", "delta"), GRID)
def test_fixed_size_sampling_matches_autodp(z, q, rounds, delta):
    """autodp implements the sampling-without-replacement bound (Wang et al.) on its own."""
    from autodp import mechanism_zoo, transformer_zoo

    population = 1000
    ours = ClientLevelAccountant("rdp", "fixed", population)
    ours.compose(z, q, rounds)
    # Replace-one neighbours: the clipped sum moves by up to 2C, so noise zC is sigma = z/2.
    gaussian = mechanism_zoo.GaussianMechanism(sigma=z / 2)
    gaussian.neighboring = "replace_one"
    sampled = transformer_zoo.AmplificationBySampling(PoissonSampling=False)(
        gaussian, q, improved_bound_flag=True
    )
    reference = transformer_zoo.Composition()([sampled], [rounds])
    assert ours.epsilon(delta) == pytest.approx(reference.get_approxDP(delta), rel=0.01)


def test_rounds_with_different_noise_compose_as_they_happened():
    mixed = ClientLevelAccountant()
    mixed.compose(1.0, 0.1, 10)
    mixed.compose(0.8, 0.1, 5)  # a round with dropouts carries less noise
    reference = RdpAccountant()
    reference.compose(_poisson(1.0, 0.1), 10)
    reference.compose(_poisson(0.8, 0.1), 5)
    assert mixed.epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=0.01)
    again = ClientLevelAccountant.from_state_dict(mixed.state_dict())
    assert again.epsilon(1e-5) == mixed.epsilon(1e-5)
    assert mixed.epsilon_after(1.0, 0.1, 1e-5) > mixed.epsilon(1e-5)
    assert mixed.history == [(1.0, 0.1, 10), (0.8, 0.1, 5)]


@pytest.mark.parametrize(
    ("target", "q", "rounds"), [(1.0, 0.01, 100), (3.0, 0.1, 50), (8.0, 0.05, 200)]
)
def test_calibrated_noise_meets_the_target_tightly(target, q, rounds):
    z = calibrate_noise_multiplier(target, 1e-5, q, rounds)
    acc = ClientLevelAccountant()
    acc.compose(z, q, rounds)
    assert acc.epsilon(1e-5) <= target
    assert acc.epsilon_after(z * 0.97, q, 1e-5, rounds) - acc.epsilon(1e-5) > 0
    looser = ClientLevelAccountant()
    looser.compose(z * 0.97, q, rounds)
    assert looser.epsilon(1e-5) > target


def test_unreachable_target_and_bad_values_are_refused():
    with pytest.raises(PrivacyConfigError, match="cannot be reached"):
        calibrate_noise_multiplier(1e-4, 1e-5, 1.0, 10_000)
    with pytest.raises(PrivacyConfigError, match="delta"):
        ClientLevelAccountant().epsilon(1.0)
    with pytest.raises(PrivacyConfigError, match="noise multiplier"):
        ClientLevelAccountant().compose(0.0, 0.1)
    with pytest.raises(PrivacyConfigError, match="sampling rate"):
        ClientLevelAccountant().compose(1.0, 1.5)
    with pytest.raises(PrivacyConfigError, match="Allowed choices"):
        ClientLevelAccountant("moments")
    with pytest.raises(PrivacyConfigError, match="RDP only"):
        ClientLevelAccountant("prv", "fixed", 100)


def test_rdp_matches_dp_accounting_and_pld_is_tighter_for_the_same_releases():
    """Poisson sampling: Opacus' RDP against dp-accounting's RDP (1 %); PLD below both."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    ours = ClientLevelAccountant("rdp", "poisson")
    ours.compose(0.94, 0.1, 30)
    ours.compose(0.8, 0.1, 2)  # a round with dropouts
    rdp, pld = RdpAccountant(), PLDAccountant()
    for z, rounds in ((0.94, 30), (0.8, 2)):
        event = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(z))
        rdp.compose(event, rounds)
        pld.compose(event, rounds)
    assert ours.epsilon(1e-5) == pytest.approx(rdp.get_epsilon(1e-5), rel=0.01)
    assert ours.epsilon_by("pld", 1e-5) == pytest.approx(pld.get_epsilon(1e-5), rel=0.01)
    assert ours.epsilon_by("pld", 1e-5) < 0.95 * ours.epsilon(1e-5)
    # Calibrating with PLD needs less noise for the same ε.
    with_rdp = calibrate_noise_multiplier(3.0, 1e-5, 0.1, 30, "rdp")
    with_pld = calibrate_noise_multiplier(3.0, 1e-5, 0.1, 30, "pld")
    assert with_pld < 0.97 * with_rdp


def test_fixed_size_sampling_accounts_each_rounds_own_population():
    """N grows from 10 to 40 nodes, m = 5 each round: each round is (N, m) as it was."""
    ours = ClientLevelAccountant("rdp", "fixed", population=10)
    ours.compose(1.0, 5 / 10, 3)  # the population given at the start
    ours.compose(1.0, 5 / 40, 3, population=40)
    reference = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for population, rounds in ((10, 3), (40, 3)):
        event = dp_accounting.SampledWithoutReplacementDpEvent(
            population, 5, dp_accounting.GaussianDpEvent(0.5)
        )
        reference.compose(event, rounds)
    assert ours.epsilon(1e-3) == pytest.approx(reference.get_epsilon(1e-3), rel=1e-6)
    restored = ClientLevelAccountant.from_state_dict(ours.state_dict())
    assert restored.epsilon(1e-3) == ours.epsilon(1e-3)
