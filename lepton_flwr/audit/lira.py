"""Record-level membership inference with shadow models (LiRA).

Carlini et al., "Membership inference attacks from first principles" (S&P 2022): the
attacker trains shadow models on random halves of a data pool, so that each example is
in about half of them; per example it fits one Gaussian to the model's logit-scaled
confidence φ = z_y − log Σ_{j≠y} e^{z_j} when the example was in, one when it was out,
and scores the target model's φ by the likelihood ratio of the two. Shadow models are
trained the way the target was (plain SGD or DP-SGD), as the attack assumes. The same
scores serve client-level membership (:mod:`lepton_flwr.audit.federations`), with a
client's mean φ in place of an example's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import norm

from lepton_flwr.audit.membership import membership_figures

TrainFn = Callable[[np.ndarray, np.ndarray, int], tuple[torch.nn.Module, float]]
"""(x, y, seed) -> (the trained model, the ε its training claims; inf without DP)."""


def logit_confidence(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """φ per example: the true class's logit against the log-sum of the others'."""
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(torch.tensor(x[i : i + 500])) for i in range(0, len(x), 500)])
        logits = logits.double()
    true = logits[torch.arange(len(y)), torch.tensor(y)]
    others = logits.clone()
    others[torch.arange(len(y)), torch.tensor(y)] = -torch.inf
    return (true - torch.logsumexp(others, dim=1)).numpy()


def likelihood_ratio(
    target: np.ndarray, shadows: np.ndarray, shadow_in: np.ndarray, min_std: float = 1e-3
) -> np.ndarray:
    """Per-example log-likelihood ratio of "in" against "out" for the target's φ.

    Parameters
    ----------
    target : np.ndarray
        φ of every example under the target model, shape (n,).
    shadows : np.ndarray
        φ under each shadow model, shape (k, n).
    shadow_in : np.ndarray
        Whether each example was in each shadow's training set, shape (k, n).
    min_std : float
        Floor of the fitted standard deviations (a model that always says the same).
    """
    scores = np.zeros(len(target))
    pooled = max(float(np.std(shadows)), min_std)
    for i in range(len(target)):
        members, others = shadows[shadow_in[:, i], i], shadows[~shadow_in[:, i], i]
        if len(members) < 2 or len(others) < 2:
            continue  # too few shadows on one side: no evidence either way
        std_in = max(float(np.std(members)), min_std, 0.1 * pooled)
        std_out = max(float(np.std(others)), min_std, 0.1 * pooled)
        scores[i] = norm.logpdf(target[i], np.mean(members), std_in) - norm.logpdf(
            target[i], np.mean(others), std_out
        )
    return scores


def leave_one_out(phis: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every model in turn is the target and the others its shadows; all scores pooled.

    Carlini et al. evaluate LiRA this way: k + 1 trained models give k + 1 attacks
    (one per target) without training more, and their pooled scores a far tighter
    ROC curve than one target's.

    Parameters
    ----------
    phis : np.ndarray
        φ of every example (or client) under every model, shape (k + 1, n).
    masks : np.ndarray
        Whether each example was in each model's training data, shape (k + 1, n).

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        The likelihood-ratio score of every (model, example) pair, and whether the
        example was in that model's training data.
    """
    scores = [
        likelihood_ratio(phis[t], np.delete(phis, t, axis=0), np.delete(masks, t, axis=0))
        for t in range(len(phis))
    ]
    return np.concatenate(scores), masks.ravel()


def lira_attack(
    train_fn: TrainFn, x: np.ndarray, y: np.ndarray, shadows: int = 8, seed: int = 0
) -> dict[str, float]:
    """Train ``shadows + 1`` models on random halves of the pool; attack each with the rest.

    Returns
    -------
    dict[str, float]
        ``auc``, ``tpr_at_0.1%_fpr``, ``tpr_at_1%_fpr`` over all (model, example)
        pairs (:func:`leave_one_out`), and ``claimed_epsilon``, the ε each model's
        training reports (inf without DP).
    """
    rng = np.random.default_rng(seed)
    masks = rng.random((shadows + 1, len(y))) < 0.5
    phis, claimed = [], []
    for index, mask in enumerate(masks):
        model, epsilon = train_fn(x[mask], y[mask], seed + index)
        phis.append(logit_confidence(model, x, y))
        claimed.append(epsilon)
    figures = membership_figures(*leave_one_out(np.stack(phis), masks))
    return {**figures, "claimed_epsilon": float(max(claimed))}
