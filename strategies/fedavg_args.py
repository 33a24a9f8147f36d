"""How our DP strategies treat Flower FedAvg's sampling arguments."""

from __future__ import annotations


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
