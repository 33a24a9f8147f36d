"""Privacy accounting for client-level DP: compose the rounds that actually happened.

Each round releases a Gaussian mechanism applied to a sample of clients: the sum of
updates clipped to norm C, plus noise of std z·C. The guarantee is stated under one
neighbouring relation per sampling, named in :data:`NEIGHBOURING` (the one place the
documentation, the logs and ``summary.json`` take it from):

- Poisson sampling (each client independently with probability q), accounted with
  Opacus' accountants (RDP or PRV) or dp-accounting's PLD: **zero-out** neighbours, the
  usual convention for user-level DP in federated learning (Kairouz et al., 2021). Two
  runs are neighbours when one client's contributions to every released sum (its
  clipped update, its centred clip bit) are replaced by zero; the client stays in the
  population, so N and the denominator d = qN are the same in both runs. The analysis
  is that of the Poisson-subsampled Gaussian of sensitivity C and multiplier z, and it
  covers the noisy sums *alone*. It does **not** cover releasing the sample size |S|:
  given s = |S|, whether the client was sampled is correlated with how many *other*
  clients were, and when the other updates point away from the client's, the pair of
  outputs given s is worse than the Poisson pair at rate s/N (so neither the nominal q
  nor the realised s/N gives an upper bound; ``tests/test_released_sample_size.py``).
  So the DP strategies release no count: DPFedAvg keeps its counts on the server, and
  HEDPFedAvg sizes everything clients see from public figures and tops the noise up to
  the same total whatever the count (:mod:`lepton_flwr.strategies.he_dp_fedavg`). The
  server knows S (it samples): the guarantee is for whoever sees the released models,
  not for the server. It does *not* hide whether a client is part of the population.
- Fixed-size sampling without replacement (m of N), accounted with dp-accounting's RDP
  analysis of that sampling (Opacus has none): **replace-one** neighbours; replacing one
  client moves the sum by up to 2C, so the multiplier there is z/2.

Every round is composed as it was (noise multiplier and rate of each entry).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from dataclasses import dataclass, field

import numpy as np
from flwr.serverapp import exception as flwr_exception

from lepton_flwr.dp.quiet_opacus import import_opacus

SAMPLINGS = ("poisson", "fixed")
NEIGHBOURING = {
    "poisson": "zero-out one client's contributions (N public, |S| not released)",
    "fixed": "replace one client",
}
ACCOUNTANTS = ("rdp", "prv", "pld")


class PrivacyBudgetExhausted(flwr_exception.PrivacyBudgetExhausted):
    """The next round would spend more than the privacy budget; training stops.

    A subclass of Flower's own, so ``except flwr.serverapp.exception.PrivacyBudgetExhausted``
    catches ours too.
    """


class PrivacyConfigError(ValueError):
    """A privacy parameter out of range, or a budget no noise can meet."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise PrivacyConfigError(message)


@functools.lru_cache(maxsize=256, typed=True)  # np.float32(z) is not z: Opacus differs
def _rdp_per_step(noise_multiplier: float, sample_rate: float, orders: tuple) -> np.ndarray:
    """Opacus' RDP of one Poisson-sampled Gaussian release at each order (read-only)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders)
    )
    rdp.setflags(write=False)
    return rdp


def check_delta(delta: float, population: int | None = None) -> None:
    """Refuse δ outside (0, 1), or δ >= 1/population (it would allow leaking one record)."""
    _check(0 < delta < 1, f"delta must be in (0, 1), got {delta}.")
    if population:
        _check(
            delta < 1 / population,
            f"delta={delta} is not below 1/{population} (1/number of clients); "
            f"use delta < {1 / population:.3g}.",
        )


@dataclass
class ClientLevelAccountant:
    """Privacy loss of the releases made so far.

    Parameters
    ----------
    accountant : str
        ``"rdp"`` or ``"prv"`` (Opacus), or ``"pld"`` (dp-accounting's privacy loss
        distributions, the tightest of the three); fixed-size sampling supports ``"rdp"``
        only.
    sampling : str
        ``"poisson"`` (each client with probability q) or ``"fixed"`` (m of N without
        replacement).
    population : int | None
        Number of clients N (required for fixed-size sampling).
    """

    accountant: str = "rdp"
    sampling: str = "poisson"
    population: int | None = None
    history: list[tuple] = field(default_factory=list)  # (z, q, rounds[, N if fixed])

    def __post_init__(self):
        _check(
            self.accountant in ACCOUNTANTS,
            f"Unknown accountant '{self.accountant}'. Allowed choices: {', '.join(ACCOUNTANTS)}.",
        )
        _check(
            self.sampling in SAMPLINGS,
            f"Unknown sampling '{self.sampling}'. Allowed choices: {', '.join(SAMPLINGS)}.",
        )
        if self.sampling == "fixed":
            _check(
                self.population is not None and self.population >= 1,
                "fixed-size sampling needs the number of clients (population).",
            )
            _check(
                self.accountant == "rdp",
                "fixed-size sampling is accounted with RDP only; use accountant=rdp.",
            )

    def compose(
        self,
        noise_multiplier: float,
        sample_rate: float,
        rounds: int = 1,
        population: int | None = None,
    ) -> None:
        """Record ``rounds`` releases with noise multiplier z and sampling rate q (m/N if fixed).

        For fixed-size sampling each entry keeps the round's own N (``population``,
        default the accountant's): the analysis needs (N, m) as they were, and N may
        change between rounds.
        """
        _check(noise_multiplier > 0, f"noise multiplier must be > 0, got {noise_multiplier}.")
        _check(0 < sample_rate <= 1, f"sampling rate q must be in (0, 1], got {sample_rate}.")
        entry = (noise_multiplier, sample_rate)
        if self.sampling == "fixed":
            entry += (population or self.population,)
        last = self.history[-1] if self.history else None
        if last is not None and last[:2] + last[3:] == entry:
            self.history[-1] = (*last[:2], last[2] + rounds, *last[3:])
        else:
            self.history.append((*entry[:2], rounds, *entry[2:]))

    def epsilon(self, delta: float) -> float:
        """ε spent so far at δ (0 before any release), by this accountant."""
        return self.epsilon_by(self.accountant, delta)

    def epsilon_by(self, accountant: str, delta: float) -> float:
        """ε of the same releases by another accountant (``"rdp"``, ``"prv"``, ``"pld"``)."""
        check_delta(delta)
        if not self.history:
            return 0.0
        if self.sampling == "fixed":
            return self._without_replacement_epsilon(delta)
        if accountant == "pld":
            return self._pld_epsilon(delta)
        return self._opacus_epsilon(delta, accountant)

    def epsilon_after(
        self,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        rounds: int = 1,
        population: int | None = None,
    ) -> float:
        """ε if ``rounds`` more such releases were made (the accountant is left unchanged)."""
        trial = copy.deepcopy(self)
        trial.compose(noise_multiplier, sample_rate, rounds, population)
        return trial.epsilon(delta)

    def _pld_epsilon(self, delta: float) -> float:
        """dp-accounting's privacy-loss-distribution accountant: tighter than RDP."""
        import dp_accounting
        from dp_accounting.pld import PLDAccountant

        acc = PLDAccountant()
        for z, q, rounds in self.history:
            event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
            acc.compose(event, rounds)
        return float(acc.get_epsilon(delta))

    def _opacus_epsilon(self, delta: float, accountant: str) -> float:
        import_opacus()
        from opacus.accountants import PRVAccountant, RDPAccountant

        if accountant == "rdp":
            from opacus.accountants.analysis import rdp as analysis

            # Opacus' RDPAccountant.get_privacy_spent, with each (z, q)'s per-step RDP
            # computed once per process: the same sum of the same products, bit for bit.
            if not self.history:
                return 0.0
            orders = tuple(RDPAccountant.DEFAULT_ALPHAS)
            rdp = sum([_rdp_per_step(z, q, orders) * steps for z, q, steps in self.history])
            return float(analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)[0])
        acc = PRVAccountant()
        acc.history = list(self.history)
        # PRV's error bound is absolute (0.01 by default): make it 0.2 % of epsilon.
        coarse = float(acc.get_epsilon(delta))
        return float(acc.get_epsilon(delta, eps_error=min(0.01, max(1e-4, 0.002 * coarse))))

    def _without_replacement_epsilon(self, delta: float) -> float:
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        for z, q, rounds, population in self.history:
            size = max(1, round(q * population))
            # Replace-one sensitivity of a sum of updates clipped to C is 2C: noise z·C is
            # a Gaussian mechanism of multiplier z/2 under this relation.
            event = dp_accounting.SampledWithoutReplacementDpEvent(
                population, size, dp_accounting.GaussianDpEvent(z / 2)
            )
            acc.compose(event, rounds)
        return float(acc.get_epsilon(delta))

    def state_dict(self) -> dict:
        """JSON-able state, to resume accounting."""
        return {
            "accountant": self.accountant,
            "sampling": self.sampling,
            "population": self.population,
            "history": [list(h) for h in self.history],
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> ClientLevelAccountant:
        """Rebuild from :meth:`state_dict`."""
        history = [
            (float(h[0]), float(h[1]), int(h[2]), *(int(n) for n in h[3:]))
            for h in state["history"]
        ]
        return cls(state["accountant"], state["sampling"], state["population"], history)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    rounds: int,
    accountant: str = "rdp",
    sampling: str = "poisson",
    population: int | None = None,
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier whose ε after ``rounds`` releases stays within the target.

    Raises
    ------
    PrivacyConfigError
        For out-of-range inputs, or a target that no noise multiplier up to 1e4 reaches.
    """
    _check(target_epsilon > 0, f"target epsilon must be > 0, got {target_epsilon}.")
    _check(rounds >= 1, f"rounds must be >= 1, got {rounds}.")
    check_delta(delta)

    def eps(z: float) -> float:
        acc = ClientLevelAccountant(accountant, sampling, population)
        acc.compose(z, sample_rate, rounds)
        return acc.epsilon(delta)

    low, high = 0.1, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        _check(
            high <= 1e4,
            f"target epsilon={target_epsilon} cannot be reached in {rounds} rounds at "
            f"q={sample_rate}, delta={delta}: even z=1e4 gives more. Allow a larger "
            f"epsilon, fewer rounds or a smaller q.",
        )
    while eps(low) <= target_epsilon and low > 1e-3:
        low /= 2
    while high - low > tolerance * high:
        mid = math.sqrt(low * high)
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    logging.getLogger(__name__).debug("calibrated z=%.4f for eps=%s", high, target_epsilon)
    return high
