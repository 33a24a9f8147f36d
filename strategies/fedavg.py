"""Plain FedAvg from the config: the baseline that privacy strategies are compared with."""

from flwr.serverapp.strategy import FedAvg
from lepton_flwr.strategies.metrics import aggregate_train_metrics


def build_fedavg(cfg: dict) -> FedAvg:
    """Flower's message-API FedAvg with the sampling settings of ``cfg["strategy"]``."""
    s = cfg["strategy"]
    return FedAvg(
        fraction_train=s["fraction_train"],
        fraction_evaluate=s["fraction_evaluate"],
        min_train_nodes=s["min_train_nodes"],
        min_evaluate_nodes=s["min_evaluate_nodes"],
        min_available_nodes=s["min_available_nodes"],
        train_metrics_aggr_fn=aggregate_train_metrics,
    )
