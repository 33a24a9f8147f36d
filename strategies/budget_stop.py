"""Flower's ``Strategy.start`` for DP strategies: stop cleanly when the budget is spent."""

from __future__ import annotations

from collections.abc import Callable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from lepton_flwr.dp.accounting import PrivacyBudgetExhausted


class StopsAtPrivacyBudget:
    """Mixin for strategies whose ``configure_train`` raises ``PrivacyBudgetExhausted``.

    Flower's round loop (``Strategy.start``) would let the exception escape and lose the
    rounds already trained. With this mixin first among the bases, ``start`` ends the loop
    at the budget instead and returns a ``Result`` holding the last released model and the
    metrics of every round that ran.
    """

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run Flower's round loop; on ``PrivacyBudgetExhausted``, return what ran so far."""
        partial = Result()
        partial.arrays = initial_arrays
        aggregate_train, aggregate_evaluate = self.aggregate_train, self.aggregate_evaluate

        # Record what Flower's loop records, as it happens, in ``partial`` too: instance
        # attributes shadow the methods for the duration of this call only.
        def recording_train(server_round, replies):
            arrays, metrics = aggregate_train(server_round, replies)
            if arrays is not None:
                partial.arrays = arrays
            if metrics is not None:
                partial.train_metrics_clientapp[server_round] = metrics
            return arrays, metrics

        def recording_evaluate(server_round, replies):
            metrics = aggregate_evaluate(server_round, replies)
            if metrics is not None:
                partial.evaluate_metrics_clientapp[server_round] = metrics
            return metrics

        def recording_central(server_round, arrays):
            metrics = evaluate_fn(server_round, arrays)
            if metrics is not None:
                partial.evaluate_metrics_serverapp[server_round] = metrics
            return metrics

        self.aggregate_train, self.aggregate_evaluate = recording_train, recording_evaluate
        try:
            return super().start(
                grid,
                initial_arrays,
                num_rounds,
                timeout,
                train_config,
                evaluate_config,
                recording_central if evaluate_fn is not None else None,
            )
        except PrivacyBudgetExhausted as stop:
            log(WARNING, "privacy budget reached, training stops: %s", stop)
            return partial
        finally:
            del self.aggregate_train, self.aggregate_evaluate
