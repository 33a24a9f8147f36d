"""Flower's FedAvg with every reply checked on its own: one bad reply never voids a round."""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from lepton_flwr.strategies.encrypted_sum import the_record
from lepton_flwr.strategies.metrics import guarded
from lepton_flwr.strategies.reply_checks import ReplyError, example_count, plaintext_tensors
from lepton_flwr.strategies.round_loop import FlowerLoop

from lepton_flwr.he.codec import CiphertextError


class CheckedFedAvg(FlowerLoop, FedAvg):
    """FedAvg (plaintext, no privacy) that rejects a malformed reply instead of failing.

    Flower's FedAvg raises when the replies of a round disagree (an extra
    ``MetricRecord``, a missing ``num-examples``) and lets a negative, huge or
    non-numeric example count, or NaN weights, into the average. Here each reply is
    checked alone: exactly one ``ArrayRecord`` with the global model's tensor names and
    shapes, all finite (training), exactly one ``MetricRecord`` whose
    ``weighted_by_key`` is a whole number in [1, ``max_examples``] ([0, ...] for
    evaluation). A reply that fails is rejected with one log line naming the node and
    the reason; the round goes on with the others. Metrics that cannot be aggregated
    (a loss sent as a list by one client) are left out of the round's metrics, logged.

    Parameters
    ----------
    max_examples : int (default: 10,000,000)
        Largest example count a reply may claim.
    **fedavg_kwargs
        Flower's FedAvg arguments.
    """

    def __init__(self, *, max_examples: int = 10_000_000, **fedavg_kwargs):
        super().__init__(**fedavg_kwargs)
        if not (isinstance(max_examples, int) and max_examples >= 1):
            raise ValueError(f"max_examples must be an int >= 1, got {max_examples}.")
        self.max_examples = max_examples
        self.train_metrics_aggr_fn = guarded(self.train_metrics_aggr_fn, "CheckedFedAvg")
        self.evaluate_metrics_aggr_fn = guarded(self.evaluate_metrics_aggr_fn, "CheckedFedAvg")
        self._reference: list[tuple[str, tuple]] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's; the global model's tensor names and shapes are kept for the checks."""
        self._reference = [(name, tuple(array.shape)) for name, array in arrays.items()]
        return super().configure_train(server_round, arrays, config, grid)

    def _check(self, msg: Message, is_train: bool) -> None:
        try:
            metrics = the_record(msg, MetricRecord)
            example_count(metrics, self.weighted_by_key, self.max_examples, int(is_train))
            if is_train:
                plaintext_tensors(the_record(msg, ArrayRecord), self._reference)
        except CiphertextError as err:  # the_record's: not exactly one record
            raise ReplyError(str(err)) from err

    def _check_and_log_replies(
        self, replies: Iterable[Message], is_train: bool, validate: bool = True
    ) -> tuple[list[Message], list[Message]]:
        """Flower's check, after each reply was checked alone (failures rejected, logged)."""
        kept = []
        for msg in replies:
            if not msg.has_error():
                try:
                    self._check(msg, is_train)
                except ReplyError as err:
                    log(
                        WARNING,
                        "CheckedFedAvg: rejected the %s reply of node %d: %s",
                        "training" if is_train else "evaluation",
                        msg.metadata.src_node_id,
                        err,
                    )
                    continue
            kept.append(msg)
        return super()._check_and_log_replies(kept, is_train, validate)
