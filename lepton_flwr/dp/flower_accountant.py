"""Our client-level accounting behind Flower 1.42's ``PrivacyAccountant`` protocol.

Flower's own ``RdpAccountant`` needs the ``flwr[dp]`` extra, and Flower's DP wrappers
accept only ``SamplingMethod.NO_AMPLIFICATION``. :class:`LeptonAccountant` speaks the
same protocol (``compose``, ``get_epsilon``, ``get_delta``, ``get_privacy_spent``,
``would_exceed``, ``state_dict``/``load_state_dict``) over
:class:`~lepton_flwr.dp.accounting.ClientLevelAccountant`, so a Flower user gets
Poisson-amplified accounting with Opacus' RDP or PRV accountants wherever a
``PrivacyAccountant`` is expected.

A ``GaussianPrivacyEvent``'s ``noise_multiplier`` is z, the noise std over one client's
clipping norm C (what Flower's wrappers add: z·C on the sum). Under replace-one
neighbours (sampling without replacement) replacing a client moves the sum by up to 2C,
so we account multiplier z/2; Flower's ``RdpAccountant`` accounts z there, which
reports a smaller ε for the same noise.
"""

from __future__ import annotations

import copy
import math

from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)

from lepton_flwr.dp.accounting import ClientLevelAccountant

_SAMPLING = {
    SamplingMethod.POISSON: "poisson",
    SamplingMethod.WITHOUT_REPLACEMENT: "fixed",
    SamplingMethod.NO_AMPLIFICATION: "poisson",  # every client, q = 1
}


class LeptonAccountant:
    """Flower's ``PrivacyAccountant`` protocol, backed by Opacus (and dp-accounting).

    Parameters
    ----------
    config : PrivacyConfig
        Flower's privacy configuration: δ, N, neighbouring relation, sampling method
        and optional ``max_epsilon``.
    method : str (default: "rdp")
        ``"rdp"`` or ``"prv"`` (Opacus); sampling without replacement supports ``"rdp"``.
    """

    def __init__(self, config: PrivacyConfig, method: str = "rdp"):
        self._config = config
        self.method = method
        self._accountant = ClientLevelAccountant(
            method, _SAMPLING[config.sampling_method], config.population_size
        )

    @property
    def config(self) -> PrivacyConfig:
        """The privacy configuration."""
        return self._config

    @property
    def num_releases(self) -> int:
        """Releases composed so far."""
        return sum(entry[2] for entry in self._accountant.history)

    def _sample_rate(self, event: GaussianPrivacyEvent) -> float:
        if event.population_size != self._config.population_size:
            raise ValueError(
                f"event population {event.population_size} differs from the configured "
                f"population {self._config.population_size}"
            )
        if self._config.sampling_method == SamplingMethod.NO_AMPLIFICATION:
            return 1.0
        return event.sample_size / event.population_size

    def compose(self, event: GaussianPrivacyEvent, count: int = 1) -> None:
        """Compose ``count`` identical releases."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive integer, got {count}")
        self._accountant.compose(event.noise_multiplier, self._sample_rate(event), count)

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far at ``delta``."""
        return self._accountant.epsilon(delta)

    def get_delta(self, epsilon: float) -> float:
        """Smallest δ (to 0.1 % relative) at which the releases so far are ``epsilon``-DP."""
        if epsilon < 0 or not math.isfinite(epsilon):
            raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
        if not self._accountant.history:
            return 0.0
        low, high = -300.0, math.log10(0.999)  # log10 δ; ε(δ) falls as δ grows
        if self.get_epsilon(10**high) > epsilon:
            return 1.0
        if self.get_epsilon(10**low) <= epsilon:
            return 10**low
        while high - low > 4e-4:
            mid = (low + high) / 2
            if self.get_epsilon(10**mid) > epsilon:
                low = mid
            else:
                high = mid
        return 10**high

    def get_privacy_spent(self, delta: float | None = None) -> PrivacySpent:
        """(ε, δ) spent so far, at ``delta`` or the configured ``target_delta``."""
        delta = self._config.target_delta if delta is None else delta
        return PrivacySpent(
            epsilon=self.get_epsilon(delta),
            delta=delta,
            num_releases=self.num_releases,
            accounting_method=f"lepton-{self.method}-{self._accountant.sampling}",
        )

    def would_exceed(
        self, event: GaussianPrivacyEvent, max_epsilon: float | None = None, count: int = 1
    ) -> bool:
        """Whether composing ``event`` ``count`` times would pass the budget."""
        limit = self._config.max_epsilon if max_epsilon is None else max_epsilon
        if limit is None:
            return False
        trial = copy.deepcopy(self)
        trial.compose(event, count)
        return trial.get_epsilon(self._config.target_delta) > limit

    def state_dict(self) -> dict[str, object]:
        """JSON-able state."""
        return {"method": self.method, "accountant": self._accountant.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.method = str(state["method"])
        self._accountant = ClientLevelAccountant.from_state_dict(state["accountant"])


def poisson_config(
    target_delta: float, population_size: int, max_epsilon: float | None = None
) -> PrivacyConfig:
    """Flower's ``PrivacyConfig`` for Poisson client sampling.

    Flower names the relation ``ADD_OR_REMOVE_ONE``; its analysis is also that of
    zero-out neighbours, the relation lepton-flwr states (see ``lepton_flwr.dp.accounting``),
    for the noisy sums alone: an app that also publishes how many clients each round
    sampled or counted is not covered by the ε this accountant reports.
    """
    return PrivacyConfig(
        target_delta=target_delta,
        population_size=population_size,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.POISSON,
        max_epsilon=max_epsilon,
    )
