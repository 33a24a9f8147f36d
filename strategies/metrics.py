"""Aggregation of client metrics: weighted means, except privacy losses, which take the max."""

from __future__ import annotations

from collections.abc import Callable
from logging import WARNING

from flwr.app import Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from lepton_flwr import protocol

# Reply metrics that belong to our protocol, not to the clients' training: a strategy
# uses them (or checks them) per reply, and never averages them into a round's metrics.
PROTOCOL_METRICS = (protocol.NORM_BIT, protocol.HE_WEIGHT, protocol.DP_SHARE_STD)

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


def aggregate_train_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Flower's weighted mean for every metric but ``*epsilon``, reported as the largest.

    A run is as private as its least private client: averaging clients' ε would
    understate what was spent.
    """
    metrics = aggregate_metricrecords(records, weighting_metric_name)
    for key in list(metrics):
        if key.endswith("epsilon"):
            metrics[key] = max(
                float(r["metrics"][key])
                for r in records
                if key in r.metric_records.get("metrics", {})
            )
    return metrics


def _own_metrics(content: RecordDict) -> RecordDict:
    """The reply without the metrics our mods add for the server (clip bit, share std...)."""
    return RecordDict(
        {
            key: MetricRecord({k: v for k, v in record.items() if k not in PROTOCOL_METRICS})
            if isinstance(record, MetricRecord)
            else record
            for key, record in content.items()
        }
    )


def guarded(aggregate: MetricsAggregation, strategy_name: str) -> MetricsAggregation:
    """``aggregate``, returning an empty record (and one log line) when it fails.

    A round must not fail because clients report metrics that Flower's aggregation
    cannot combine (a loss sent as a list, weights that sum to zero).
    """

    def aggregate_or_nothing(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        try:
            return aggregate(records, weighted_by_key)
        except Exception as err:  # noqa: BLE001 - any aggregation failure leaves the round intact
            log(WARNING, "%s: the clients' metrics were not aggregated: %r", strategy_name, err)
            return MetricRecord()

    return aggregate_or_nothing


def clients_metrics(
    aggregate: MetricsAggregation,
    replies: list[Message],
    weighted_by_key: str,
    strategy_name: str,
    server_round: int,
) -> dict:
    """The clients' own training metrics, aggregated; {} (and one log line) if they cannot be.

    The metrics our mods add for the server (``PROTOCOL_METRICS``) are left out.
    """
    if not replies:
        return {}
    safe = guarded(aggregate, f"{strategy_name} round {server_round}")
    return dict(safe([_own_metrics(m.content) for m in replies], weighted_by_key))
