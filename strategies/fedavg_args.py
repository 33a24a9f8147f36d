"""How our DP strategies treat Flower FedAvg's sampling arguments."""

from __future__ import annotations

from logging import WARNING

from flwr.common.logger import log


def evaluation_off_by_default(strategy_name: str, fedavg_kwargs: dict) -> dict:
    """FedAvg's arguments with federated evaluation off unless asked for (then logged).

    Evaluation replies carry each client's metrics on its own data, un-noised: outside ε.
    """
    kwargs = {"fraction_evaluate": 0.0, "min_evaluate_nodes": 0} | fedavg_kwargs
    if kwargs["fraction_evaluate"] > 0:
        log(
            WARNING,
            "%s: federated evaluation is on (fraction_evaluate=%s): each evaluating client "
            "sends its loss and accuracy on its own data to the server in the clear; the "
            "privacy guarantee (epsilon) does not cover them",
            strategy_name,
            kwargs["fraction_evaluate"],
        )
    return kwargs


def refuse_fraction_train(strategy_name: str, fraction_train: float | None) -> None:
    """Refuse ``fraction_train``: DP strategies sample with ``sample_rate`` instead.

    Raises
    ------
    ValueError
        If ``fraction_train`` was given, saying what to pass instead.
    """
    if fraction_train is None:
        return
    raise ValueError(
        f"{strategy_name} samples its training clients itself, so that the privacy "
        f"accountant matches the sampling: fraction_train={fraction_train} would be ignored. "
        f"Pass sample_rate instead: with sampling='poisson' (the default) each node takes "
        f"part with probability sample_rate; with sampling='fixed', round(sample_rate * N) "
        f"of the N nodes take part, which is what fraction_train={fraction_train} means in "
        f"FedAvg (sampling='fixed', sample_rate={fraction_train})."
    )
