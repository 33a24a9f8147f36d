"""Flower strategies of lepton-flwr (public import path: ``lepton_flwr.strategies``).

Each drops into any Flower ``ServerApp`` in place of Flower's ``FedAvg``, and pairs with
one client mod (``lepton_flwr.mods``):

=================  ==========================================  ===========================
strategy           protects                                    client mod
=================  ==========================================  ===========================
``HEFedAvg``       updates from the server (CKKS)              ``he_mod``
``DPFedAvg``       clients, in the released model (DP)         none, or ``dp_clip_mod``
``HEDPFedAvg``     both: noise shares added under encryption   ``he_dp_mod``
``CheckedFedAvg``  nothing (plain FedAvg, each reply checked)  none
=================  ==========================================  ===========================

``strategy.start(...)`` is Flower's round loop; for DP strategies the ``Result`` holds ε
per round in ``train_metrics_clientapp`` and training stops cleanly at ``max_epsilon``.
"""

from lepton_flwr.strategies.checked_fedavg import CheckedFedAvg
from lepton_flwr.strategies.dp_fedavg import DPFedAvg
from lepton_flwr.strategies.he_dp_fedavg import HEDPFedAvg
from lepton_flwr.strategies.he_fedavg import HEFedAvg
from lepton_flwr.strategies.metrics import aggregate_train_metrics
from lepton_flwr.strategies.round_loop import MisconfiguredRunError, NoModelTrainedError

from lepton_flwr.dp.accounting import PrivacyBudgetExhausted

__all__ = [
    "CheckedFedAvg",
    "DPFedAvg",
    "HEDPFedAvg",
    "HEFedAvg",
    "MisconfiguredRunError",
    "NoModelTrainedError",
    "PrivacyBudgetExhausted",
    "aggregate_train_metrics",
]
