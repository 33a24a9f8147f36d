"""Aggregation of client metrics: weighted means, except privacy losses, which take the max."""

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords


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
