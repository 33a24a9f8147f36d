"""Flower strategies of lepton-flwr (public import path: ``lepton_flwr.strategies``).

``STRATEGIES`` maps the names of the Hydra ``strategy`` group to builders that take
the composed config and return a Flower message-API ``Strategy``.
"""

from collections.abc import Callable

from flwr.serverapp.strategy import Strategy
from lepton_flwr.strategies.dp_fedavg import DPFedAvg, build_dp_fedavg
from lepton_flwr.strategies.fedavg import build_fedavg
from lepton_flwr.strategies.he_dp_fedavg import HEDPFedAvg, build_he_dp_fedavg
from lepton_flwr.strategies.he_fedavg import HEFedAvg, build_he_fedavg

from lepton_flwr.dp.accounting import PrivacyBudgetExhausted

STRATEGIES: dict[str, Callable[[dict], Strategy]] = {
    "fedavg": build_fedavg,
    "he_fedavg": build_he_fedavg,
    "dp_fedavg": build_dp_fedavg,
    "he_dp_fedavg": build_he_dp_fedavg,
}


def build_strategy(cfg: dict) -> Strategy:
    """Build the strategy that ``cfg["strategy"]["name"]`` names.

    Raises
    ------
    KeyError
        For an unknown name, listing the allowed ones.
    """
    name = cfg["strategy"]["name"]
    if name not in STRATEGIES:
        raise KeyError(
            f"Unknown strategy '{name}'. Allowed choices: {', '.join(sorted(STRATEGIES))}."
        )
    return STRATEGIES[name](cfg)


__all__ = [
    "STRATEGIES",
    "DPFedAvg",
    "HEDPFedAvg",
    "HEFedAvg",
    "PrivacyBudgetExhausted",
    "build_strategy",
]
