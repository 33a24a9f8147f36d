"""Client-level membership inference with shadow federations (issue 14).

Each federation runs the config's strategy, ClientApp and mods in Flower's loop; the
attacker sees released models only. Seeded DP noise (``privacy.seed``, not private):
the test repeats.
"""

import logging
import math

from lepton_flwr.audit.federations import client_membership
from lepton_flwr.config import load_config

# Clients of 10 digits each, 20 local epochs of a 256-unit MLP: each client's data is
# memorised by its federation's model.
OVERFIT = [
    "dataset=digits",
    "model=mlp",
    "model.hidden=[256]",
    "train.lr=0.1",
    "train.momentum=0.9",
    "train.local_epochs=20",
]
STRONG_DP = [
    "strategy=dp_fedavg",
    "privacy.noise_multiplier=5.0",
    "privacy.sample_rate=1.0",
    "privacy.sampling=fixed",
    "privacy.seed=3",
]


def _attack(*overrides):
    cfg = {**load_config([*OVERFIT, *overrides]), "num_rounds": 2}
    return client_membership(cfg, clients=32, examples=10, shadows=8, rounds=2)


def test_whole_clients_are_found_without_dp_and_hidden_under_strong_client_level_dp(caplog):
    caplog.set_level(logging.ERROR, logger="flwr")
    plain = _attack("strategy=fedavg")
    private = _attack(*STRONG_DP)
    assert plain["auc"] > 0.75 and plain["claimed_epsilon"] == math.inf, plain
    assert plain["test_accuracy"] > 0.7, plain  # the attacked models are real models
    # Measured over seeds: plain 0.80-0.87, private 0.45-0.57 (288 scored pairs).
    assert abs(private["auc"] - 0.5) < 0.12, private
    assert private["auc"] < plain["auc"] - 0.2
    assert private["claimed_epsilon"] < 3, private
