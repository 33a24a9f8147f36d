"""The privacy bookkeeping of a DP training run, shared by DP strategies.

Per round: wait for nodes, check the budget, sample clients (Poisson or fixed size),
and after aggregation compose the noise actually released with the accountant.
"""

from __future__ import annotations

import math
import secrets
import time
from logging import INFO, WARNING

import numpy as np
from flwr.common.logger import log
from flwr.serverapp import Grid
from scipy import stats

from lepton_flwr import protocol
from lepton_flwr.dp.accounting import (
    NEIGHBOURING,
    ClientLevelAccountant,
    PrivacyBudgetExhausted,
    calibrate_noise_multiplier,
    check_delta,
)
from lepton_flwr.dp.noise import secure_gaussian
from lepton_flwr.dp.sampling import fixed_size_sample, poisson_sample
from lepton_flwr.numbers import is_int, real

MAX_NOISE_MULTIPLIER = 1e6  # the range of a noise multiplier an accountant history may hold
MIN_NOISE_MULTIPLIER = 1e-6  # (below it, Opacus' RDP divides by z² = 0)
MAX_COUNT = 10**9  # steps or rounds of one history entry, and a population


class NodesUnavailableError(RuntimeError):
    """Fewer nodes than a strategy needs connected within the time allowed."""


def _whole(value: object, low: int, high: int) -> bool:
    return is_int(value) and low <= value <= high


def checked_history(entries: object, width: int = 3) -> list[tuple]:
    """An accountant history read from a file, each entry checked: ``(z, q, count[, N])``.

    z finite in [1e-6, 1e6], q in (0, 1], count (steps or rounds) and N (the population,
    ``width`` 4: fixed-size sampling) whole numbers in [1, 1e9]: what Opacus' and
    dp-accounting's accountants compute with in bounded time. A NaN noise multiplier, for
    one, makes Opacus' accountant loop for ever.

    Raises
    ------
    ValueError
        Naming the entry and what is wrong with it.
    """
    if not isinstance(entries, list):
        raise ValueError("the accountant history is not a list")
    history = []
    for index, entry in enumerate(entries):
        where = f"accountant history entry {index}"
        if not isinstance(entry, list | tuple) or len(entry) != width:
            raise ValueError(f"{where} is not a list of {width} numbers")
        z, q = real(entry[0]), real(entry[1])
        if z is None or not MIN_NOISE_MULTIPLIER <= z <= MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"{where}: noise multiplier {str(entry[0])[:40]} is not a number in "
                f"[{MIN_NOISE_MULTIPLIER:g}, {MAX_NOISE_MULTIPLIER:g}]"
            )
        if q is None or not 0 < q <= 1:
            raise ValueError(f"{where}: sampling rate {str(entry[1])[:40]} is not in (0, 1]")
        counts = entry[2:]
        if not all(_whole(n, 1, MAX_COUNT) for n in counts):
            shown = str(list(counts))[:60]
            raise ValueError(f"{where}: {shown} are not counts in [1, {MAX_COUNT}]")
        history.append((z, q, *counts))
    return history


def check_same_settings(saved: object, own: dict) -> None:
    """Refuse state made with other privacy settings, naming each one and both values.

    Raises
    ------
    ValueError
        If ``saved`` is not a dict of the same settings with the same values.
    """
    if not isinstance(saved, dict):
        raise ValueError("the checkpoint holds no privacy settings")
    missing = object()
    differing = [
        f"{key}={saved.get(key, missing)!r} in the checkpoint, {own.get(key, missing)!r} here"
        for key in sorted(set(saved) | set(own), key=str)
        if saved.get(key, missing) != own.get(key, missing)
    ]
    if differing:
        shown = "; ".join(differing).replace(f"{missing!r}", "unset")
        raise ValueError(
            f"the checkpoint was made with other privacy settings ({shown[:2000]}): resume "
            f"with the same privacy settings"
        )


def wait_for_nodes(
    grid: Grid, minimum: int, timeout: float | None = None, log_every: float = 60.0
) -> list[int]:
    """Return the connected nodes once there are at least ``minimum`` (polled every second).

    Says what it waits for when it has to wait, and again every ``log_every`` seconds.

    Raises
    ------
    NodesUnavailableError
        If ``timeout`` seconds pass first (None waits for ever).
    """
    node_ids = list(grid.get_node_ids())
    started = last_log = time.monotonic()
    if len(node_ids) < minimum:
        log(INFO, "waiting for %d nodes to connect (%d so far)", minimum, len(node_ids))
    while len(node_ids) < minimum:
        now = time.monotonic()
        if timeout is not None and now - started >= timeout:
            raise NodesUnavailableError(
                f"{len(node_ids)} of the {minimum} nodes needed (min_available_nodes) "
                f"connected within {timeout:g} s"
            )
        if now - last_log >= log_every:
            log(INFO, "waiting for %d nodes to connect (%d so far)", minimum, len(node_ids))
            last_log = now
        time.sleep(1)
        node_ids = list(grid.get_node_ids())
    return node_ids


class DPRounds:
    """Sampling, calibration, budget and accounting of client-level DP rounds.

    Parameters
    ----------
    noise_multiplier : float | None
        z; None calibrates it from ``target_epsilon`` over ``num_rounds`` once the
        number of clients N is known (first round).
    delta, sample_rate, sampling, accountant, max_epsilon, target_epsilon, num_rounds
        As in :class:`lepton_flwr.strategies.DPFedAvg`.
    seed : int | None
        Seed of sampling and noise, for tests (logged as not private); None: sampling
        from numpy seeded with 128 secret bits, noise from ``os.urandom``.
    """

    def __init__(
        self,
        *,
        noise_multiplier: float | None,
        delta: float,
        sample_rate: float,
        sampling: str = "poisson",
        accountant: str = "rdp",
        max_epsilon: float | None = None,
        target_epsilon: float | None = None,
        num_rounds: int | None = None,
        seed: int | None = None,
    ):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"The sampling rate q must be in (0, 1], got {sample_rate}.")
        if noise_multiplier is None and (target_epsilon is None or num_rounds is None):
            raise ValueError(
                "Give noise_multiplier, or target_epsilon and num_rounds to calibrate it."
            )
        if noise_multiplier is not None and noise_multiplier <= 0:
            raise ValueError(f"The noise multiplier must be > 0, got {noise_multiplier}.")
        check_delta(delta)
        self.configured_noise_multiplier = noise_multiplier  # None: calibrated in round 1
        self.noise_multiplier, self.delta, self.sample_rate = noise_multiplier, delta, sample_rate
        self.sampling, self.accountant_name = sampling, accountant
        self.max_epsilon, self.target_epsilon, self.num_rounds = (
            max_epsilon,
            target_epsilon,
            num_rounds,
        )
        self.rng = np.random.default_rng(seed if seed is not None else secrets.randbits(128))
        self.seeded = seed is not None
        if self.seeded:
            log(
                WARNING,
                "DP sampling and noise follow seed=%s: reproducible for tests, NOT private "
                "(leave the seed unset in real runs)",
                seed,
            )
        self.accountant: ClientLevelAccountant | None = None
        self.population = 0
        self.withheld_mass = 0.0  # Σ p_t: see withhold_at
        self._withholding_logged = False  # per process: a resume logs the figure again
        self._delta_warned = 0  # 1: reported δ over 10x δ logged; 2: δ >= 1 logged

    @property
    def round_rate(self) -> float:
        """Q of a round: the Poisson probability, or m/N."""
        return (
            self.sample_rate if self.sampling == "poisson" else self.sample_size / self.population
        )

    @property
    def sample_size(self) -> int:
        """M for fixed-size sampling."""
        return max(1, round(self.sample_rate * self.population))

    @property
    def denominator(self) -> float:
        """The fixed divisor of the noisy sum: q·N (Poisson) or m (fixed size)."""
        return (
            self.sample_rate * self.population if self.sampling == "poisson" else self.sample_size
        )

    def epsilon(self) -> float:
        """ε spent so far."""
        return 0.0 if self.accountant is None else self.accountant.epsilon(self.delta)

    def draw(self, node_ids: list[int]) -> list[int]:
        """A sample of ``node_ids`` as :meth:`start_round` draws it, without its checks.

        For a strategy that must know a round's sample early (secure aggregation shares
        the next round's keys while the current one ends); it hands the sample to
        ``start_round(..., drawn=)`` with the same ``node_ids``. The draw does not
        depend on any data.
        """
        if self.sampling == "poisson":
            return poisson_sample(node_ids, self.sample_rate, self.rng)
        return fixed_size_sample(
            node_ids, max(1, round(self.sample_rate * len(node_ids))), self.rng
        )

    def start_round(
        self, server_round: int, node_ids: list[int], drawn: list[int] | None = None
    ) -> list[int]:
        """Fix N, calibrate z if needed, check the budget, and sample this round's clients.

        ``drawn``: the sample :meth:`draw` took of the same ``node_ids`` earlier, returned
        instead of a new one.

        Raises
        ------
        PrivacyBudgetExhausted
            If this round would take ε past ``max_epsilon``.
        """
        self.population = len(node_ids)
        if self.accountant is None:
            check_delta(self.delta, self.population)
            self.accountant = ClientLevelAccountant(
                self.accountant_name, self.sampling, self.population
            )
            if self.noise_multiplier is None:
                self.noise_multiplier = calibrate_noise_multiplier(
                    self.target_epsilon,
                    self.delta,
                    self.round_rate,
                    self.num_rounds,
                    self.accountant_name,
                    self.sampling,
                    self.population,
                )
                log(
                    INFO,
                    "noise multiplier %.4f calibrated for epsilon=%s",
                    self.noise_multiplier,
                    self.target_epsilon,
                )
        next_epsilon = self.accountant.epsilon_after(
            self.noise_multiplier, self.round_rate, self.delta, population=self.population
        )
        if self.max_epsilon is not None and next_epsilon > self.max_epsilon:
            raise PrivacyBudgetExhausted(
                f"round {server_round} would take epsilon from {self.epsilon():.3f} to "
                f"{next_epsilon:.3f}, past the budget {self.max_epsilon}"
            )
        if drawn is not None:
            return drawn
        return self.draw(node_ids)

    def most_sampled(self, tail_probability: float) -> int:
        """The fewest clients r_max with P(|S| > r_max) <= ``tail_probability`` this round.

        A function of N, q and the sampling only (public): Poisson sampling draws |S| from
        Binomial(N, q); fixed-size sampling always draws m.
        """
        if self.sampling != "poisson":
            return self.sample_size
        most = int(stats.binom.isf(tail_probability, self.population, self.sample_rate))
        most = min(max(most, 0), self.population)
        # isf works in floating point: settle the smallest count exactly by its survival.
        while most < self.population and self._more_than(most) > tail_probability:
            most += 1
        while most > 0 and self._more_than(most - 1) <= tail_probability:
            most -= 1
        return most

    def _more_than(self, count: int) -> float:
        return float(stats.binom.sf(count, self.population, self.sample_rate))

    def withholding_probability(self, most: int, fewest: int, dropout_rate: float) -> float:
        """An upper bound on P(a round is withheld for its counts), this round's N.

        Withheld: more than ``most`` clients sampled, or fewer than ``fewest`` of them
        report, each sampled client dropping out with probability ``dropout_rate``
        independently of the data (so the reporters are Binomial(N, q(1 − rate)), or
        Binomial(m, 1 − rate) for fixed-size sampling). The union bound of the two.
        """
        if self.sampling == "poisson":
            too_many = self._more_than(most)
            reporters = (self.population, self.sample_rate * (1 - dropout_rate))
        else:
            too_many = 0.0 if self.sample_size <= most else 1.0
            reporters = (self.sample_size, 1 - dropout_rate)
        too_few = float(stats.binom.cdf(fewest - 1, *reporters)) if fewest > 0 else 0.0
        return min(1.0, too_many + too_few)

    def planned_epsilon(self) -> float | None:
        """ε after ``num_rounds`` releases at z, or the budget; None if neither is known."""
        if self.num_rounds is not None and self.noise_multiplier is not None and self.population:
            fresh = ClientLevelAccountant(self.accountant_name, self.sampling, self.population)
            return fresh.epsilon_after(
                self.noise_multiplier,
                self.round_rate,
                self.delta,
                rounds=self.num_rounds,
                population=self.population,
            )
        return self.max_epsilon

    def withhold_at(self, name: str, most: int, fewest: int, dropout_rate: float) -> float:
        """Add this round's chance of being withheld for its counts to the run's; return it.

        A strategy that releases nothing in a round for its counts (more than ``most``
        clients sampled, fewer than ``fewest`` valid updates) shows an event that is the
        same under both neighbours (sampling and dropouts being independent of the data),
        and accounts the round as a release all the same. The run then equals the ideal
        one, which releases every round, except on an event of probability p <= Σ p_t
        under either neighbour, so its (ε, δ) is (ε, δ + (1 + e^ε)·p)
        (:meth:`delta_addition`). The first call in a process (a run, or its resume) logs
        what the planned run adds to δ, as a warning when it is not far below δ.
        """
        per_round = self.withholding_probability(most, fewest, dropout_rate)
        self.withheld_mass += per_round
        first, self._withholding_logged = not self._withholding_logged, True
        planned = self.planned_epsilon() if first else None  # a whole run's ε: once
        if planned is not None and self.num_rounds is not None:
            addition = self.num_rounds * per_round * (1 + math.exp(min(planned, 700.0)))
            loud = addition > self.delta / 10
            log(
                WARNING if loud else INFO,
                "%s: rounds withheld for their counts add (1 + e^eps) x %.3g = %.3g to delta "
                "over %d rounds at eps %.3g (delta=%g)%s",
                name,
                self.num_rounds * per_round,
                addition,
                self.num_rounds,
                planned,
                self.delta,
                ": NOT far below delta; sample more clients per round (a larger q or N), use "
                "fixed-size sampling, or lower min_train_nodes where the strategy allows 0"
                if loud
                else "",
            )
        return per_round

    def delta_addition(self, epsilon: float | None = None) -> float:
        """(1 + e^ε)·p: what the rounds withheld for their counts add to δ (ε: spent so far)."""
        epsilon = self.epsilon() if epsilon is None else epsilon
        return self.withheld_mass * (1 + math.exp(min(epsilon, 700.0)))

    def reported_delta(self, name: str, epsilon: float | None = None) -> float:
        """δ as reported (:meth:`privacy_metrics`), logged when it grows large.

        A warning the first time it passes 10x the configured δ, and again when it
        reaches 1 (then nothing is guaranteed).
        """
        reported = self.delta + self.delta_addition(epsilon)
        level = 2 if reported >= 1 else 1 if reported > 10 * self.delta else 0
        if level > self._delta_warned:
            self._delta_warned = level
            log(
                WARNING,
                "%s: the reported delta is %.3g, %s the configured %g: rounds that can be "
                "withheld for their counts add (1 + e^eps) x %.3g; sample more clients per round "
                "(a larger q or N), use fixed-size sampling, or lower min_train_nodes where the "
                "strategy allows 0",
                name,
                reported,
                "at least 1, so NO guarantee holds, against" if level == 2 else "over 10x",
                self.delta,
                self.withheld_mass,
            )
        return reported

    def gaussian(self, shape: tuple[int, ...] | int, std: float) -> np.ndarray:
        """Noise for a release: from the OS's secure randomness, or the seed (tests)."""
        if self.seeded:
            return self.rng.normal(0.0, std, shape)
        return secure_gaussian(shape, std)

    def within_budget(self, noise_multiplier: float) -> bool:
        """Whether one more release with this noise multiplier keeps ε within the budget."""
        if self.max_epsilon is None:
            return True
        after = self.accountant.epsilon_after(
            noise_multiplier, self.round_rate, self.delta, population=self.population
        )
        return after <= self.max_epsilon

    @property
    def neighbouring(self) -> str:
        """The neighbouring relation ε is stated under."""
        return NEIGHBOURING[self.sampling]

    def privacy_metrics(self) -> dict[str, float]:
        """ε spent so far and its δ, under the protocol's metric names.

        δ is the configured one plus what rounds withheld for their counts add,
        (1 + e^ε)·p (:meth:`delta_addition`; 0 when no round can be withheld), so that the
        reported pair is the guarantee the run has.
        """
        epsilon = self.epsilon()
        return {
            protocol.EPSILON: epsilon,
            protocol.DELTA: self.delta + self.delta_addition(epsilon),
        }

    def _settings(self) -> dict:
        """Every setting the ε of the rounds depends on, as the strategy was built."""
        return {
            "sampling": self.sampling,
            "accountant": self.accountant_name,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "seeded": self.seeded,
            "noise_multiplier": self.configured_noise_multiplier,
            "target_epsilon": self.target_epsilon,
            "max_epsilon": self.max_epsilon,
        }

    def state(self) -> dict:
        """What the next round needs (checkpoints): z, N, the sampling generator, history.

        The generator's state tells which clients the next rounds sample: a checkpoint
        holding it is as private as the server.
        """
        history = None if self.accountant is None else [list(h) for h in self.accountant.history]
        return {
            "settings": self._settings(),
            "noise_multiplier": self.noise_multiplier,
            "population": self.population,
            "rng": self.rng.bit_generator.state,
            "history": history,
            "withheld_mass": self.withheld_mass,
        }

    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state` (resume), every value checked first.

        Raises
        ------
        ValueError
            If the state was made with other privacy settings (sampling, accountant, q,
            δ, the noise multiplier or the target ε it was calibrated for, the budget):
            ε would not continue; or if a value is malformed, naming it.
        """
        if not isinstance(state, dict):
            raise ValueError("the DP rounds' state is not an object")
        check_same_settings(state.get("settings"), self._settings())
        z, population = real(state.get("noise_multiplier")), state.get("population")
        configured = self.configured_noise_multiplier
        if z is None and state.get("noise_multiplier") is None and configured is None:
            pass  # saved before round 1 calibrated it
        elif z is None or not MIN_NOISE_MULTIPLIER <= z <= MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"noise_multiplier {str(state.get('noise_multiplier'))[:40]} is not a number "
                f"in [{MIN_NOISE_MULTIPLIER:g}, {MAX_NOISE_MULTIPLIER:g}]"
            )
        elif configured is not None and z != configured:
            raise ValueError(f"noise_multiplier {z} in the checkpoint, {configured} here")
        if not _whole(population, 0, MAX_COUNT):
            raise ValueError(f"population {str(population)[:40]} is not a count")
        withheld = real(state.get("withheld_mass"))
        if withheld is None or not 0 <= withheld <= MAX_COUNT:
            shown = str(state.get("withheld_mass"))[:40]
            raise ValueError(f"withheld_mass {shown} is not a number >= 0")
        history = state.get("history")
        if history is not None:
            history = checked_history(history, 4 if self.sampling == "fixed" else 3)
            if population < 1:
                raise ValueError("an accountant history without a population")
        try:
            self.rng.bit_generator.state = state.get("rng")
        except (TypeError, ValueError, KeyError, OverflowError) as err:
            raise ValueError(f"rng: not a state of this sampling generator ({err})") from err
        self.noise_multiplier, self.population = z, population
        self.withheld_mass = withheld
        self.accountant = None
        if history is not None:
            self.accountant = ClientLevelAccountant(
                self.accountant_name, self.sampling, self.population
            )
            self.accountant.history = history

    def record(self, noise_multiplier: float) -> float:
        """Compose one release whose noise had multiplier ``noise_multiplier``; return ε."""
        self.accountant.compose(noise_multiplier, self.round_rate, population=self.population)
        return self.epsilon()
