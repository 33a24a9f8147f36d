"""The privacy audit finds what leaks, and never more than the claimed ε (issue 14)."""

import logging
import math

import pytest
from lepton_flwr.strategies import DPFedAvg, HEDPFedAvg

from lepton_flwr.audit.canaries import audit_client_level
from lepton_flwr.audit.epsilon import epsilon_lower_bound, p_value
from lepton_flwr.audit.lira import lira_attack
from lepton_flwr.audit.scenarios import audit_pool, fit_as_configured
from lepton_flwr.he import CKKSParams, decrypt_arrays, write_keys
from lepton_flwr.mods import make_he_dp_mod


def test_the_one_run_bound_matches_its_closed_form_without_delta():
    """All r guesses right, δ = 0: the bound is logit(α^(1/r)), α = 1 − confidence."""
    for r in (10, 100, 400):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(1000, r, r, 0.0) == pytest.approx(
            math.log(q / (1 - q)), rel=1e-6
        )
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0  # chance level proves nothing
    assert p_value(1000, 100, 90, 2.0, 1e-5) > p_value(1000, 100, 90, 2.0, 0.0)


def _dp(z, nodes, seed=5, **variant):
    return DPFedAvg(
        noise_multiplier=z,
        clip_norm=1.0,
        delta=1e-5,
        sample_rate=0.5,
        min_available_nodes=nodes,
        fraction_evaluate=0.0,
        seed=seed,  # seeded sampling and noise (not private): the test is repeatable
        **variant,
    )


@pytest.mark.parametrize(("z", "least_bound"), [(0.3, 1.5), (3.0, 0.0)])
def test_dp_fedavg_canaries_stay_below_the_claimed_epsilon(caplog, z, least_bound):
    """Weak DP: the canaries are found (bound well above 0); strong DP: the bound stays
    low. Either way it never passes the ε the strategy reports."""
    caplog.set_level(logging.WARNING, logger="flwr")
    strategy = _dp(z, 600)
    audit = audit_client_level(strategy, strategy.epsilon, 1e-5, 1.0, rounds=5, seed=1)
    assert least_bound <= audit["epsilon_lower_bound"] < audit["claimed_epsilon"], audit
    if z == 3.0:
        assert audit["epsilon_lower_bound"] < 1.0, audit


@pytest.mark.parametrize(
    "variant",
    [
        {"adaptive": True},
        {"accountant": "pld"},
        {"sampling": "fixed"},
        {"clipping_side": "client"},
    ],
    ids=["adaptive clipping", "PLD accountant", "fixed-size sampling", "client-side clipping"],
)
def test_every_dp_fedavg_variant_stays_below_its_claimed_epsilon(caplog, variant):
    """Each mechanism and accountant the strategy offers, audited at weak DP (z = 0.5)."""
    from lepton_flwr.mods import dp_clip_mod

    caplog.set_level(logging.WARNING, logger="flwr")
    strategy = _dp(0.5, 600, seed=7, **variant)
    mods = [dp_clip_mod] if variant.get("clipping_side") == "client" else []
    audit = audit_client_level(strategy, strategy.epsilon, 1e-5, 1.0, rounds=5, seed=3, mods=mods)
    assert 1.0 <= audit["epsilon_lower_bound"] < audit["claimed_epsilon"], audit


def test_he_dp_canaries_stay_below_the_claimed_epsilon(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="flwr")
    secret, public = write_keys(CKKSParams(), tmp_path)
    strategy = HEDPFedAvg(
        public,
        noise_multiplier=0.3,
        clip_norm=1.0,
        delta=1e-5,
        sample_rate=0.5,
        min_available_nodes=350,
        workers=1,
    )
    audit = audit_client_level(
        strategy,
        strategy.epsilon,
        1e-5,
        1.0,
        rounds=3,
        canaries=300,
        others=50,
        dim=2048,
        seed=2,
        mods=[make_he_dp_mod(secret, workers=1)],
        decrypt=lambda arrays: decrypt_arrays(arrays, secret),
    )
    assert 1.0 <= audit["epsilon_lower_bound"] < audit["claimed_epsilon"], audit


def _digits_mlp(*overrides):
    """Digits with a 256-unit MLP (memorises 200 examples in 100 epochs), and 400 of them."""
    from lepton_flwr.config import load_config

    cfg = load_config(["dataset=digits", "model=mlp", "model.hidden=[256]", *overrides])
    return cfg, audit_pool(cfg, 400)


PLAIN = ["train.lr=0.1", "train.momentum=0.9"]
# Seeded DP-SGD noise (reproducible=true, not private): the tests are repeatable.
DPSGD = ["privacy=dpsgd", "privacy.reproducible=true", "train.lr=0.5", "train.momentum=0.0"]


def test_lira_finds_members_of_an_overfitted_model_and_not_under_strong_dpsgd():
    cfg, (x, y, _) = _digits_mlp(*PLAIN)
    plain = lira_attack(fit_as_configured(cfg, epochs=100), x, y, shadows=8)
    cfg, _ = _digits_mlp(*DPSGD, "privacy.noise_multiplier=4.0")
    private = lira_attack(fit_as_configured(cfg, epochs=15), x, y, shadows=8)
    assert plain["auc"] > 0.6 and plain["claimed_epsilon"] == math.inf, plain
    assert abs(private["auc"] - 0.5) < 0.07, private
    assert private["auc"] < plain["auc"] - 0.08


@pytest.mark.parametrize("noise", [None, 0.5, 1.0])
def test_dpsgd_canary_examples_stay_below_the_claimed_epsilon(noise):
    """Mislabelled noise images: memorised without DP (bound > 1.5), not under DP-SGD."""
    from lepton_flwr.audit.canaries import audit_record_level

    if noise is None:
        cfg, (x, y, data) = _digits_mlp(*PLAIN)
        fit = fit_as_configured(cfg, epochs=100)
    else:
        cfg, (x, y, data) = _digits_mlp(*DPSGD, f"privacy.noise_multiplier={noise}")
        fit = fit_as_configured(cfg, epochs=30)
    audit = audit_record_level(fit, x, y, data, 1e-5)
    assert audit["epsilon_lower_bound"] < audit["claimed_epsilon"], audit
    if noise is None:
        assert audit["epsilon_lower_bound"] > 1.5 and audit["auc"] > 0.9, audit
    else:
        assert audit["epsilon_lower_bound"] < 1.0, audit
