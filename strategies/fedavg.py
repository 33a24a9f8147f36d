"""Plain FedAvg from the config: the baseline that privacy strategies are compared with."""

from flwr.serverapp.strategy import FedAvg
from lepton_flwr.strategies.metrics import aggregate_train_metrics


def fedavg_settings(strategy_cfg: dict, train_sampling: bool = True) -> dict:
    """FedAvg's keyword arguments from the ``strategy`` group.

    DP strategies sample training clients themselves: ``train_sampling=False`` leaves
    out ``fraction_train`` and ``min_train_nodes``.
    """
    keys = ["fraction_evaluate", "min_evaluate_nodes", "min_available_nodes"]
    if train_sampling:
        keys += ["fraction_train", "min_train_nodes"]
    return {key: strategy_cfg[key] for key in keys} | {
        "train_metrics_aggr_fn": aggregate_train_metrics
    }


def build_fedavg(cfg: dict) -> FedAvg:
    """Flower's message-API FedAvg with the sampling settings of ``cfg["strategy"]``."""
    return FedAvg(**fedavg_settings(cfg["strategy"]))
