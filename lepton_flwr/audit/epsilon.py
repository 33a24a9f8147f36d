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

The bound has a ceiling: even when every guess is right it cannot exceed what r correct
guesses out of r rule out (about ln(r / ln(1/α)): 4.43 for 500 canaries with the default
guess counts). :func:`epsilon_ceiling` computes it, through the same loop over guess
counts as :func:`audit_scores`; a claim at or above the ceiling cannot be caught by the
audit, so "bound below the claim" only tests a claim below the ceiling
(:func:`comparison_can_fail`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


GUESS_COUNTS = (10, 20, 50, 100, 200)
"""How many canaries the audit guesses "in" (and as many "out"): the k it tries."""


def _best_over_guess_counts(
    m: int,
    correct_at: Callable[[int], int],
    delta: float,
    confidence: float,
    guess_counts: tuple[int, ...],
) -> dict:
    """The best bound over the guess counts that fit m canaries, Bonferroni-corrected.

    ``correct_at(k)`` is how many of the 2k guesses (k "in", k "out") were right. Both
    the bound (:func:`audit_scores`) and its ceiling (:func:`epsilon_ceiling`) go
    through here, so they use the same guess counts and the same correction.
    """
    counts = [k for k in guess_counts if 2 * k <= m]
    per_try = 1.0 - (1.0 - confidence) / max(1, len(counts))
    best = {"epsilon_lower_bound": 0.0, "guesses": 0, "correct": 0}
    for k in counts:
        v = correct_at(k)
        bound = epsilon_lower_bound(m, 2 * k, v, delta, per_try)
        if bound > best["epsilon_lower_bound"]:
            best = {"epsilon_lower_bound": bound, "guesses": 2 * k, "correct": v}
    return best


def epsilon_ceiling(
    m: int, delta: float, confidence: float = 0.95, guess_counts: tuple[int, ...] = GUESS_COUNTS
) -> float:
    """The largest bound :func:`audit_scores` can give for m canaries: every guess right.

    It depends only on the canary count, δ, the confidence and the guess counts, not on
    the run. A claimed ε at or above it cannot be refuted by this audit, however badly
    the mechanism leaks.
    """
    best = _best_over_guess_counts(m, lambda k: 2 * k, delta, confidence, guess_counts)
    return best["epsilon_lower_bound"]


def comparison_can_fail(claimed_epsilon: float, ceiling: float) -> bool:
    """Whether "bound below the claim" is a test: the claim must be below the ceiling."""
    return claimed_epsilon < ceiling


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    guess_counts: tuple[int, ...] = GUESS_COUNTS,
) -> dict:
    """The best lower bound over a few guess counts, Bonferroni-corrected for trying them.

    Returns
    -------
    dict
        ``epsilon_lower_bound``, the ``guesses`` and ``correct`` that gave it, and
        ``epsilon_ceiling``: the bound if every guess had been right
        (:func:`epsilon_ceiling`, same canaries, guess counts and correction).
    """
    included = np.asarray(included, dtype=bool)
    m = len(scores)

    def correct_at(k: int) -> int:
        return guesses(scores, included, k, k)[1]

    best = _best_over_guess_counts(m, correct_at, delta, confidence, guess_counts)
    return {**best, "epsilon_ceiling": epsilon_ceiling(m, delta, confidence, guess_counts)}
