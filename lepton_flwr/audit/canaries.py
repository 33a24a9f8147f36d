"""Client-level canaries: audit a DP strategy's mechanism and accounting in one run.

``m`` canary clients join a federation of ordinary ones. Each canary i is "in" with
probability 1/2: then every time it is sampled it sends the update C·uᵢ (uᵢ a random
unit direction of its own, so clipping keeps all of it); "out", it sends a zero update,
the zero-out neighbour our client-level ε is stated for. The auditor, who sees only the
final model θ_T (any party that sees the released model), scores each canary by
⟨θ_T − θ₀, uᵢ⟩ and the one-run test (:mod:`lepton_flwr.audit.epsilon`) turns its
guesses into a lower bound on ε, to compare with the ε the strategy reports. The
strategy runs unchanged in Flower's own loop (``start``), with its own mods on the
clients, so what is audited is what a user runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import Strategy

from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.audit.epsilon import audit_scores
from lepton_flwr.audit.membership import membership_figures
from lepton_flwr.data import CentralData

FIRST_NODE = 100  # InProcessGrid numbers its nodes from 100


def _directions(count: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    directions = rng.normal(size=(count, dim))
    return directions / np.linalg.norm(directions, axis=1, keepdims=True)


def canary_federation(
    canaries: int,
    others: int,
    dim: int,
    clip_norm: float,
    seed: int,
    mods: Sequence = (),
) -> tuple[ClientApp, np.ndarray, np.ndarray]:
    """A ClientApp for ``canaries + others`` nodes, and the canaries' directions and bits.

    Nodes ``100 .. 100 + canaries - 1`` are the canaries; the others send random updates
    of norm up to ``clip_norm``, in directions unrelated to the canaries'.
    """
    rng = np.random.default_rng(seed)
    directions = _directions(canaries, dim, rng)
    included = rng.random(canaries) < 0.5
    noise_seed = int(rng.integers(2**32))
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg: Message, context) -> Message:
        index = context.node_id - FIRST_NODE
        weights = msg.content["arrays"]["w"].numpy().astype(np.float64)
        if index < canaries:
            update = clip_norm * directions[index] if included[index] else np.zeros(dim)
        else:
            local = np.random.default_rng([noise_seed, index, int(weights.sum() * 1e6) % 2**32])
            step = local.normal(size=dim)
            update = step / np.linalg.norm(step) * clip_norm * local.random()
        new = ArrayRecord({"w": Array((weights + update).astype(np.float32))})
        metrics = MetricRecord({"num-examples": 1})
        return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)

    return app, directions, included


def audit_client_level(
    strategy: Strategy,
    epsilon_of: Callable[[], float],
    delta: float,
    clip_norm: float,
    rounds: int,
    canaries: int = 500,
    others: int = 100,
    dim: int = 4096,
    seed: int = 0,
    mods: Sequence = (),
    decrypt: Callable[[ArrayRecord], ArrayRecord] | None = None,
    confidence: float = 0.95,
) -> dict:
    """Run ``strategy`` on a canary federation; return the claimed ε and the audited bound.

    Parameters
    ----------
    strategy : Strategy
        A DP strategy, built with ``min_available_nodes = canaries + others``.
    epsilon_of : Callable[[], float]
        The strategy's reported ε after the run (``strategy.epsilon``).
    delta, clip_norm, rounds
        The strategy's δ and C, and the rounds to run.
    canaries, others, dim, seed
        The federation: canary and ordinary clients, model size, randomness.
    mods : Sequence
        The clients' mods (``he_dp_mod`` for HE + DP).
    decrypt : Callable[[ArrayRecord], ArrayRecord] | None
        Turns the final model into plaintext (HE: the key holder's decryption).
    confidence : float
        Of the lower bound.

    Returns
    -------
    dict
        ``claimed_epsilon``, ``epsilon_lower_bound``, ``guesses``, ``correct``,
        ``epsilon_ceiling`` (the bound had every guess been right: a claim at or above
        it cannot be refuted by this audit), the client-level membership attack's
        ``auc`` and TPR at 0.1 % / 1 % FPR (the canary scores as its scores),
        ``canaries``, ``included``, and the raw ``scores`` and ``members``.
    """
    app, directions, included = canary_federation(canaries, others, dim, clip_norm, seed, mods)
    grid = InProcessGrid(app, canaries + others, keep_replies=False)
    start = ArrayRecord({"w": Array(np.zeros(dim, dtype=np.float32))})
    result = strategy.start(grid, start, num_rounds=rounds)
    final = decrypt(result.arrays) if decrypt is not None else result.arrays
    released = final["w"].numpy().astype(np.float64)
    scores = directions @ released
    audit = audit_scores(scores, included, delta, confidence)
    return {
        "claimed_epsilon": float(epsilon_of()),
        **audit,
        **membership_figures(scores, included),  # client-level membership inference
        "canaries": canaries,
        "included": int(included.sum()),
        "scores": scores.tolist(),
        "members": included.tolist(),
    }


def audit_record_level(
    train_fn: Callable[[np.ndarray, np.ndarray, int], tuple[torch.nn.Module, float]],
    x: np.ndarray,
    y: np.ndarray,
    data: CentralData,
    delta: float,
    canaries: int = 500,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """One-run audit of a record-level mechanism (DP-SGD) with canary examples.

    Each canary (noise in the data's value range with a random label) joins the
    training data ``x, y`` with probability 1/2; the model trained by ``train_fn``
    (which returns it and the ε it claims) scores each canary by its logit-scaled
    confidence in the canary's label. With the default 500 canaries and guess counts the
    bound's ceiling at δ = 1e-5 is 4.43 (200 canaries: 3.80), as for the client level.

    Returns
    -------
    dict
        ``claimed_epsilon``, ``epsilon_lower_bound``, ``guesses``, ``correct``,
        ``epsilon_ceiling`` and the canaries' membership figures (``auc``, TPR at
        0.1 % / 1 % FPR).
    """
    from lepton_flwr.audit.lira import logit_confidence
    from lepton_flwr.audit.scenarios import canary_examples

    images, labels, included = canary_examples(canaries, data, seed)
    model, claimed = train_fn(
        np.concatenate([x, images[included]]), np.concatenate([y, labels[included]]), seed
    )
    scores = logit_confidence(model, images, labels)
    return {
        "claimed_epsilon": float(claimed),
        **audit_scores(scores, included, delta, confidence),
        **membership_figures(scores, included),
    }
