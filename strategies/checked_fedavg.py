"""Flower's FedAvg with every reply checked on its own: one bad reply never voids a round."""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from lepton_flwr.strategies.metrics import checked_evaluation, clients_metrics
from lepton_flwr.strategies.reply_checks import (
    MAX_EXAMPLES,
    plaintext_tensors,
    reply_metrics,
    the_record,
)
from lepton_flwr.strategies.round_loop import FlowerLoop


class CheckedFedAvg(FlowerLoop, FedAvg):
    """FedAvg (plaintext, no privacy) that rejects a malformed reply instead of failing.

    Flower's FedAvg raises when the replies of a round disagree (an extra
    ``MetricRecord``, a missing ``num-examples``, one metric key more than the others,
    in training or evaluation) and lets a negative, huge or non-numeric example count,
    or NaN weights, into the average. Here each reply is checked alone: exactly one
    ``ArrayRecord`` with the global model's tensor names and shapes, all finite
    (training), exactly one ``MetricRecord`` whose ``weighted_by_key`` is a whole
    number in [1, ``max_examples``] ([0, ...] for evaluation). A reply that fails is
    rejected with one log line naming the node and the reason; the round goes on with
    the others. Of the kept replies' metrics, only the keys they all hold in the same
    form are aggregated (the others are named in one log line with their nodes); a
    privacy loss (``*epsilon``) that one reply lacks or cannot report counts as +inf;
    an aggregation that fails leaves the round without metrics, logged
    (:func:`lepton_flwr.strategies.metrics.clients_metrics`).

    Parameters
    ----------
    max_examples : int (default: 10,000,000)
        Largest example count a reply may claim.
    **fedavg_kwargs
        Flower's FedAvg arguments.
    """

    def __init__(self, *, max_examples: int = MAX_EXAMPLES, **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        if not (isinstance(max_examples, int) and max_examples >= 1):
            raise ValueError(f"max_examples must be an int >= 1, got {max_examples}.")
        self.max_examples = max_examples
        self._reference: list[tuple[str, tuple, str]] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's; the global model's tensor names, shapes and dtypes are kept for the checks."""
        self._reference = [(k, tuple(a.shape), str(a.dtype)) for k, a in arrays.items()]
        return super().configure_train(server_round, arrays, config, grid)

    def _check_train(self, msg: Message) -> None:
        reply_metrics(msg, self.weighted_by_key, self.max_examples)
        plaintext_tensors(the_record(msg, ArrayRecord), self._reference)

    def _check_and_log_replies(
        self, replies: Iterable[Message], is_train: bool, validate: bool = True
    ) -> tuple[list[Message], list[Message]]:
        """Flower's logging of the replies, each training reply checked alone first.

        A training reply that fails is rejected (one log line naming the node); the
        replies need not agree with each other (``validate`` is ignored), since only
        what they share is aggregated. Evaluation replies are checked by
        :func:`~lepton_flwr.strategies.metrics.checked_evaluation`.
        """
        kept = []
        for msg in replies:
            if is_train and not msg.has_error():
                try:
                    self._check_train(msg)
                except Exception as err:  # noqa: BLE001 - one reply, one verdict
                    self.note_rejected(msg, err)
                    log(
                        WARNING,
                        "CheckedFedAvg: rejected the training reply of node %d: %s",
                        msg.metadata.src_node_id,
                        err,
                    )
                    continue
            kept.append(msg)
        return super()._check_and_log_replies(kept, is_train, validate=False)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's weighted mean of the kept replies; metrics over what they share."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        arrays = aggregate_arrayrecords([msg.content for msg in valid], self.weighted_by_key)
        metrics = clients_metrics(
            self.train_metrics_aggr_fn, valid, self.weighted_by_key, "CheckedFedAvg", server_round
        )
        return arrays, MetricRecord(metrics)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Each evaluation reply checked alone; metrics over what the kept ones share."""
        return checked_evaluation(self, server_round, replies)
