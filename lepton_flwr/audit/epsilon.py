"""A lower bound on ε from one training run with canaries (Steinke, Nasr, Jagielski 2023).

"Privacy auditing with one (1) training run" (NeurIPS 2023): m canaries are each
included with probability 1/2, independently; after one run the auditor scores every
canary and guesses "included" for the k₊ highest scores and "excluded" for the k₋
lowest, abstaining on the rest. If the run is (ε, δ)-DP, the number v of correct
guesses among the r = k₊ + k₋ made is at most what r tosses of a coin of bias
e^ε / (1 + e^ε) give, up to a δ term (their Theorem 3 and Appendix D):

    P[V ≥ v] ≤ P[Bin(r, q_ε) ≥ v] + 2 m δ · max_{1≤i≤v} P[v − i ≤ Bin(r, q_ε) < v] / i.

An observed v whose p-value under ε is below 1 − confidence rules that ε out; the largest
ε ruled out is the lower bound (:func:`epsilon_lower_bound`). A bound above the ε a
strategy claims means its mechanism or its accounting is wrong.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] if the run were (ε, δ)-DP (an upper bound)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(1.0, tail)
    below = binom.pmf(np.arange(v - 1, -1, -1), r, q).cumsum()  # P[v-i <= Bin < v], i=1..v
    worst = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * worst)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε that v correct guesses out of r rule out at ``confidence`` (0 if none)."""
    alpha = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) > alpha:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) <= alpha and high < 100:
        low, high = high, 2 * high
    for _ in range(60):  # p_value grows with ε: bisect for where it crosses alpha
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) <= alpha:
            low = mid
        else:
            high = mid
    return low


def guesses(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int) -> tuple[int, int]:
    """(r, v): guess "in" for the k₊ highest scores and "out" for the k₋ lowest; count hits."""
    order = np.argsort(scores)
    guessed_in, guessed_out = order[len(order) - k_plus :], order[:k_minus]
    v = int(included[guessed_in].sum()) + int((~included[guessed_out]).sum())
    return k_plus + k_minus, v


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    guess_counts: tuple[int, ...] = (10, 20, 50, 100, 200),
) -> dict:
    """The best lower bound over a few guess counts, Bonferroni-corrected for trying them.

    Returns
    -------
    dict
        ``epsilon_lower_bound``, and the ``guesses`` and ``correct`` that gave it.
    """
    included = np.asarray(included, dtype=bool)
    counts = [k for k in guess_counts if 2 * k <= len(scores)]
    per_try = 1.0 - (1.0 - confidence) / max(1, len(counts))
    best = {"epsilon_lower_bound": 0.0, "guesses": 0, "correct": 0}
    for k in counts:
        r, v = guesses(scores, included, k, k)
        bound = epsilon_lower_bound(len(scores), r, v, delta, per_try)
        if bound > best["epsilon_lower_bound"]:
            best = {"epsilon_lower_bound": bound, "guesses": r, "correct": v}
    return best
