"""The privacy audit finds what leaks, and never more than the claimed ε (issue 14).

"Bound below the claim" is only a test where the claim is below the bound's ceiling
(the bound with every guess right, :func:`epsilon_ceiling`): every such assertion here
also asserts that, so raising a claim above the ceiling fails the test instead of
passing it vacuously (issue 19).
"""

import logging
import math

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg
from lepton_flwr.strategies import DPFedAvg, HEDPFedAvg

from lepton_flwr.audit.canaries import audit_client_level
from lepton_flwr.audit.epsilon import (
    audit_scores,
    comparison_can_fail,
    epsilon_ceiling,
    epsilon_lower_bound,
    p_value,
)
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


def test_the_ceiling_is_what_the_bound_reaches_when_every_guess_is_right():
    """Issue 19's figures (δ = 1e-5, 95 %, Bonferroni over the guess counts that fit):
    500 canaries 4.43, 300 canaries 3.79 (the HE + DP test), 200 canaries with guess
    counts 10/20/40 (the old record-level audit) 2.94, and 200 with the default counts
    3.80 (``audit_record_level``'s docstring)."""
    assert epsilon_ceiling(500, 1e-5) == pytest.approx(4.428, abs=1e-3)
    assert epsilon_ceiling(300, 1e-5) == pytest.approx(3.794, abs=1e-3)
    assert epsilon_ceiling(200, 1e-5, guess_counts=(10, 20, 40)) == pytest.approx(2.937, abs=1e-3)
    assert epsilon_ceiling(200, 1e-5) == pytest.approx(3.799, abs=1e-3)
    # δ = 0, independently: 400 guesses all right at α = 0.05 / 5 give logit(α^(1/400))
    q = (0.05 / 5) ** (1 / 400)
    assert epsilon_ceiling(500, 0.0) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)
    # the same path as the bound: a perfect attack reaches the ceiling exactly, any
    # other stays at or below it
    rng = np.random.default_rng(0)
    included = rng.random(500) < 0.5
    perfect = audit_scores(included + rng.random(500) * 0.1, included, 1e-5)
    ceiling = epsilon_ceiling(500, 1e-5)
    assert perfect["epsilon_lower_bound"] == perfect["epsilon_ceiling"] == ceiling
    for signal in (0.0, 0.5, 2.0, 5.0):
        noisy = audit_scores(signal * included + rng.normal(size=500), included, 1e-5)
        assert noisy["epsilon_lower_bound"] <= noisy["epsilon_ceiling"], (signal, noisy)
    assert comparison_can_fail(3.12, 4.43) and not comparison_can_fail(23.5, 4.43)
    assert not comparison_can_fail(math.inf, 4.43)


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


def _assert_refutable_and_held(audit):
    """The claim is below the ceiling (so the check can fail), and the bound below it."""
    assert audit["claimed_epsilon"] < audit["epsilon_ceiling"], audit
    assert audit["epsilon_lower_bound"] < audit["claimed_epsilon"], audit


def test_a_noiseless_release_claiming_a_refutable_epsilon_fails_the_audit(caplog):
    """The check has teeth: FedAvg (no noise) passed off as DP-FedAvg's z = 2 claim
    (3.12) is caught: nearly every guess is right, the bound near the ceiling of 4.43."""
    caplog.set_level(logging.WARNING, logger="flwr")
    plain = FedAvg(min_available_nodes=600, min_train_nodes=600, fraction_evaluate=0.0)
    audit = audit_client_level(plain, lambda: 3.12, 1e-5, 1.0, rounds=5, seed=1)
    assert audit["claimed_epsilon"] < audit["epsilon_ceiling"]
    assert 3.12 < audit["epsilon_lower_bound"] <= audit["epsilon_ceiling"], audit


def test_weak_dp_fedavg_lets_the_canaries_be_found(caplog):
    """z = 0.3 (claim 52.6, far above the ceiling: no claim is checked here): the attack
    still finds the canaries, so a small bound elsewhere is the noise, not a blind attack."""
    caplog.set_level(logging.WARNING, logger="flwr")
    strategy = _dp(0.3, 600)
    audit = audit_client_level(strategy, strategy.epsilon, 1e-5, 1.0, rounds=5, seed=1)
    assert 1.5 <= audit["epsilon_lower_bound"] <= audit["epsilon_ceiling"], audit


@pytest.mark.parametrize("z", [2.0, 3.0])
def test_dp_fedavg_canaries_stay_below_a_claim_below_the_ceiling(caplog, z):
    """z = 2 (claim 3.12) and z = 3 (1.85), both below the ceiling of 4.43."""
    caplog.set_level(logging.WARNING, logger="flwr")
    strategy = _dp(z, 600)
    audit = audit_client_level(strategy, strategy.epsilon, 1e-5, 1.0, rounds=5, seed=1)
    _assert_refutable_and_held(audit)


@pytest.mark.parametrize(
    ("z", "variant"),
    [
        (2.0, {"adaptive": True}),
        (2.0, {"accountant": "pld"}),
        (5.0, {"sampling": "fixed"}),  # replace-one neighbours: z = 2 claims 10.4
        (2.0, {"clipping_side": "client"}),
    ],
    ids=["adaptive clipping", "PLD accountant", "fixed-size sampling", "client-side clipping"],
)
def test_every_dp_fedavg_variant_stays_below_its_claimed_epsilon(caplog, z, variant):
    """Each mechanism and accountant the strategy offers, at a claim below the ceiling."""
    from lepton_flwr.mods import dp_clip_mod

    caplog.set_level(logging.WARNING, logger="flwr")
    strategy = _dp(z, 600, seed=7, **variant)
    mods = [dp_clip_mod] if variant.get("clipping_side") == "client" else []
    audit = audit_client_level(strategy, strategy.epsilon, 1e-5, 1.0, rounds=5, seed=3, mods=mods)
    _assert_refutable_and_held(audit)


@pytest.mark.parametrize("z", [0.3, 2.0])
def test_he_dp_canaries_are_found_when_weak_and_stay_below_a_refutable_claim(tmp_path, caplog, z):
    """300 canaries, 3 rounds (ceiling 3.79): at z = 0.3 the decrypted release gives the
    canaries away (bound ≥ 1); at z = 2 (claim about 2.5) the bound stays below it."""
    caplog.set_level(logging.WARNING, logger="flwr")
    secret, public = write_keys(CKKSParams(), tmp_path)
    strategy = HEDPFedAvg(
        public,
        noise_multiplier=z,
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
    if z < 1:
        assert 1.0 <= audit["epsilon_lower_bound"] <= audit["epsilon_ceiling"], audit
    else:
        _assert_refutable_and_held(audit)


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


@pytest.mark.parametrize("noise", [None, 2.0])
def test_dpsgd_canary_examples_stay_below_the_claimed_epsilon(noise):
    """500 mislabelled noise images (ceiling 4.43): memorised without DP (bound near the
    ceiling, so a claim below 3.5 would be caught); under DP-SGD at z = 2 (claim about
    3, below the ceiling) the bound stays below the claim."""
    from lepton_flwr.audit.canaries import audit_record_level

    if noise is None:
        cfg, (x, y, data) = _digits_mlp(*PLAIN)
        fit = fit_as_configured(cfg, epochs=100)
    else:
        cfg, (x, y, data) = _digits_mlp(*DPSGD, f"privacy.noise_multiplier={noise}")
        fit = fit_as_configured(cfg, epochs=30)
    audit = audit_record_level(fit, x, y, data, 1e-5)
    assert audit["epsilon_ceiling"] == pytest.approx(4.428, abs=1e-3)
    if noise is None:
        assert audit["epsilon_lower_bound"] > 3.5 and audit["auc"] > 0.9, audit
    else:
        _assert_refutable_and_held(audit)
        assert audit["epsilon_lower_bound"] < 1.0, audit


def test_the_report_says_whether_bound_below_claim_could_fail(tmp_path):
    """audit.md's line and the table's ceiling column: a claim above the ceiling is
    reported as a comparison that cannot fail; the table is rebuilt from stored rows."""
    import json

    from simulations.audit import can_fail_line, table_row
    from simulations.audit_table import ROWS, STORED, _arguments, write_table

    assert can_fail_line(3.12, 4.43, 500).startswith("can fail")
    assert can_fail_line(23.5, 4.43, 500).startswith("cannot fail")
    assert can_fail_line(math.inf, 4.43, 500).startswith("cannot fail")
    stored = json.loads(STORED.read_text())
    assert set(stored) == set(ROWS)
    for name, report in stored.items():
        level = "record_" if "record_claimed_epsilon" in report else ""
        claim, ceiling = report[f"{level}claimed_epsilon"], report[f"{level}epsilon_ceiling"]
        assert report[f"{level}bound_below_claim_can_fail"] == (claim < ceiling), name
        assert f"| {ceiling:.3g}" in table_row(report), name
    table = write_table(stored, tmp_path / "table.md")
    assert "| ε ceiling |" in table and len(table.splitlines()) == 2 + len(ROWS)
    with pytest.raises(SystemExit, match="no report for rows"):
        write_table({}, tmp_path / "empty.md")
    assert _arguments(["--rows", "a,b", "audit.shadows=4"]) == (["audit.shadows=4"], ["a", "b"])
