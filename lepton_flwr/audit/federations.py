"""Client-level membership inference: was this client's whole dataset in the federation.

The question client-level DP answers (a hospital took part or not). LiRA over clients
(Carlini et al. 2022, with a client's mean logit-scaled confidence φ over its own
examples as its statistic): a pool of client datasets is drawn from the config's
training data; ``shadows + 1`` federations each take half of the pool, at random, as
their clients and run the config's strategy, ClientApp and mods for a few rounds in Flower's
own loop (``Strategy.start``); each released model in turn is the target and the others
its shadows (:func:`lepton_flwr.audit.lira.leave_one_out`). The attacker sees only
released models; under HE they are the key holder's published decryptions.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from lepton_flwr.apps.build import build_strategy
from lepton_flwr.apps.client import make_client_app
from lepton_flwr.apps.common import model_for
from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.audit.lira import leave_one_out, logit_confidence
from lepton_flwr.audit.membership import membership_figures
from lepton_flwr.audit.scenarios import audit_pool
from lepton_flwr.audit.surface import SurfaceTally
from lepton_flwr.data import ClientData
from lepton_flwr.models import evaluate


def strategy_for(cfg: dict, nodes: int, every_client_every_round: bool = False) -> Strategy:
    """The config's strategy for a federation of ``nodes`` clients, without evaluation.

    ``every_client_every_round`` replaces the sampling by "all clients, every round"
    (one reply to attack; HE + DP then tolerates no colluder, or it would need more
    clients than there are).
    """
    strategy = {**cfg["strategy"], "min_available_nodes": nodes, "fraction_evaluate": 0.0}
    for key in ("min_train_nodes", "min_evaluate_nodes"):
        if key in strategy:
            strategy[key] = min(strategy[key], nodes)
    privacy = dict(cfg["privacy"])
    if every_client_every_round:
        privacy.update(sampling="fixed", sample_rate=1.0)
        if strategy["name"] == "he_dp_fedavg":
            strategy["tolerated_colluders"] = 0
    return build_strategy({**cfg, "strategy": strategy, "privacy": privacy})


def client_membership(
    cfg: dict,
    clients: int = 40,
    examples: int = 50,
    shadows: int = 8,
    rounds: int = 5,
    seed: int = 0,
    decrypt: Callable[[ArrayRecord, ArrayRecord], ArrayRecord] | None = None,
    test_examples: int = 2000,
) -> dict:
    """Run ``shadows + 1`` federations on halves of a client pool; attack each released model.

    Parameters
    ----------
    cfg : dict
        The run config: dataset, model, training, privacy, strategy and mods.
    clients, examples : int
        The pool: client datasets, and training examples each.
    shadows, rounds, seed
        Federations besides the first, rounds each, randomness.
    decrypt : Callable[[ArrayRecord, ArrayRecord], ArrayRecord] | None
        ``(released, like) -> plaintext`` for HE strategies (the key holder's
        publication, in the layout of ``like``).
    test_examples : int
        Of the global test set, for each released model's accuracy.

    Returns
    -------
    dict
        The attack's ``auc`` and TPR at 0.1 % / 1 % FPR over all (federation, client)
        pairs, the released models' median ``test_accuracy``, the strategy's
        ``claimed_epsilon`` (inf without DP), the pool's size, what the server read in
        every training reply of every federation (``surface``, rows of
        :meth:`lepton_flwr.audit.surface.SurfaceTally.rows`), and the raw ``scores``
        and ``members`` (for a ROC curve).
    """
    x, y, data = audit_pool(cfg, clients * examples, seed)
    pool = [
        ClientData(x[i * examples : (i + 1) * examples], y[i * examples : (i + 1) * examples],
                   x[:0], y[:0])
        for i in range(clients)
    ]  # fmt: skip
    rng = np.random.default_rng(seed)
    masks = np.stack([rng.permutation(clients) < clients // 2 for _ in range(shadows + 1)])
    phis, accuracies, claimed = [], [], float("inf")
    surface = SurfaceTally()  # what the server reads, over every federation's rounds
    for index, mask in enumerate(masks):
        members = np.flatnonzero(mask)
        strategy = strategy_for(cfg, len(members))
        app = make_client_app(
            cfg, client_data=lambda _cfg, node, _count, members=members: pool[members[node]]
        )
        torch.manual_seed(seed + index)
        model = model_for(cfg, data)
        start = ArrayRecord(model.state_dict())
        grid = InProcessGrid(app, len(members), keep_replies=False, observe=surface)
        result = strategy.start(grid, start, num_rounds=rounds)
        released = decrypt(result.arrays, start) if decrypt is not None else result.arrays
        model.load_state_dict(released.to_torch_state_dict())
        phis.append(logit_confidence(model, x, y).reshape(clients, examples).mean(axis=1))
        accuracies.append(
            evaluate(model, data.x_test[:test_examples], data.y_test[:test_examples],
                     num_outputs=data.num_outputs)["accuracy"]
        )  # fmt: skip
        if hasattr(strategy, "epsilon"):
            claimed = float(strategy.epsilon())
    scores, members = leave_one_out(np.stack(phis), masks)
    return {
        **membership_figures(scores, members),
        "test_accuracy": float(np.median(accuracies)),
        "claimed_epsilon": claimed,
        "clients": clients,
        "examples_per_client": examples,
        "federations": shadows + 1,
        "surface": surface.rows(),
        "scores": scores.tolist(),
        "members": members.tolist(),
    }
