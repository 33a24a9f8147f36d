"""Aggregation of client metrics, each reply checked alone.

Metrics are weighted means over the keys that every kept reply holds in the same form;
privacy losses (``*epsilon``) take the largest value, and one that is not a number
>= 0 counts as +inf (an unknown ε is not smaller than any known one). Nothing a reply's
metrics hold can end a run: a reply whose metrics are malformed is left out with one
log line naming its node, and an aggregation that fails leaves the round without
client metrics, logged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from logging import WARNING

from flwr.app import Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from lepton_flwr.strategies.reply_checks import MAX_EXAMPLES, ReplyError, reply_metrics

from lepton_flwr import protocol
from lepton_flwr.numbers import real

# Reply metrics that belong to our protocol, not to the clients' training: a strategy
# uses them (or checks them) per reply, and never averages them into a round's metrics.
PROTOCOL_METRICS = (protocol.NORM_BIT, protocol.HE_WEIGHT, protocol.DP_SHARE_STD)
MAX_NAMED = 5  # keys named in one log line; the rest are counted

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


def is_privacy_loss(key: str) -> bool:
    """Whether a metric is a privacy loss (``epsilon``, ``client-epsilon``...)."""
    return key.endswith("epsilon")


def privacy_loss(value: object) -> float:
    """A reported ε as a float: +inf when it is not a number >= 0 (NaN, -1, a list, None).

    Counting an ε that cannot be read as +inf keeps a round's largest ε an upper bound
    on every client's: a NaN can neither hide the others' values nor lower the result.
    """
    try:
        number = real(value)
    except OverflowError:  # an integer past float's range
        return math.inf
    return number if number is not None and number >= 0 else math.inf  # NaN >= 0 is False


def _metric_values(content: RecordDict) -> dict:
    """Every metric of a reply's content (Flower's contract: one MetricRecord)."""
    return {k: v for record in content.metric_records.values() for k, v in record.items()}


def _with_metrics(content: RecordDict, keep: Callable[[str], bool]) -> RecordDict:
    """The content with only the metrics whose key ``keep`` accepts."""
    return RecordDict(
        {
            name: MetricRecord({k: v for k, v in record.items() if keep(k)})
            if isinstance(record, MetricRecord)
            else record
            for name, record in content.items()
        }
    )


def aggregate_train_metrics(records: list[RecordDict], weighting_metric_name: str) -> MetricRecord:
    """Flower's weighted mean for every metric but ``*epsilon``, reported as the largest.

    A run is as private as its least private client: averaging clients' ε would
    understate what was spent. A reply without the ε the others report, or whose ε is
    not a number >= 0 (NaN, negative, a list), counts as +inf (:func:`privacy_loss`).
    """
    privacy = sorted({k for r in records for k in _metric_values(r) if is_privacy_loss(k)})
    plain = [_with_metrics(r, lambda k: not is_privacy_loss(k)) for r in records]
    metrics = aggregate_metricrecords(plain, weighting_metric_name)
    for key in privacy:
        metrics[key] = max(privacy_loss(_metric_values(r).get(key)) for r in records)
    return metrics


def guarded(aggregate: MetricsAggregation, strategy_name: str) -> MetricsAggregation:
    """``aggregate``, returning an empty record (and one log line) when it fails.

    A round must not fail because clients report metrics that an aggregation function
    cannot combine (weights that sum to zero, a user function that raises).
    """

    def aggregate_or_nothing(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        try:
            return aggregate(records, weighted_by_key)
        except Exception as err:  # noqa: BLE001 - any aggregation failure leaves the round intact
            log(WARNING, "%s: the clients' metrics were not aggregated: %r", strategy_name, err)
            return MetricRecord()

    return aggregate_or_nothing


def _form(value: object) -> object:
    """What two replies must agree on to average a metric: a number, or a list's length."""
    if isinstance(value, int | float):
        try:
            float(value)
        except OverflowError:
            return None
        return "a number"
    if isinstance(value, list) and all(_form(v) == "a number" for v in value):
        return ("list", len(value))
    return None


def _listed(items: list, show: Callable[[object], str] = str, limit: int = MAX_NAMED) -> str:
    """The first ``limit`` items as ``show`` writes them, then how many more."""
    shown = ", ".join(show(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _described(key: str, forms: list[dict], nodes: list[int]) -> str:
    """Which nodes hold ``key`` in which form: "'loss' (a number: nodes 100, 102; ...)"."""
    groups: dict[str, list[int]] = {}
    for node, form in zip(nodes, forms, strict=True):
        found = form.get(key, "missing")
        if isinstance(found, tuple):
            found = f"a list of {found[1]}"
        groups.setdefault("not a number" if found is None else found, []).append(node)
    ordered = sorted(groups.items(), key=lambda item: min(item[1]))  # not the replies' order
    held = "; ".join(f"{form}: nodes {_listed(sorted(group))}" for form, group in ordered)
    return f"{key[:40]!r} ({held})"


def _shared(contents: list[RecordDict], nodes: list[int], name: str) -> list[RecordDict]:
    """The contents reduced to the metrics they all hold; unreadable ε set to +inf.

    A metric is kept when every reply holds it, in the same form (a number, or a list
    of one length) except for privacy losses, whose unreadable values become +inf. What
    is left out, and which ε became +inf, is logged once, with the nodes.
    """
    values = [_metric_values(c) for c in contents]
    forms = [{k: _form(v) for k, v in held.items()} for held in values]
    keys = set().union(*forms)
    in_all = {k for k in keys if all(k in f for f in forms)}
    privacy = {k for k in in_all if is_privacy_loss(k)}
    shared = {
        k
        for k in in_all - privacy
        if forms[0][k] is not None and all(f[k] == forms[0][k] for f in forms)
    }
    left_out = sorted(keys - privacy - shared)
    if left_out:
        log(
            WARNING,
            "%s: metrics that not every reply holds in the same form are left out: %s",
            name,
            _listed(left_out, lambda key: _described(key, forms, nodes)),
        )
    unreadable = {
        key: [n for n, held in zip(nodes, values, strict=True) if _unreadable(held[key])]
        for key in sorted(privacy)
    }
    flagged = [key for key, found in unreadable.items() if found]
    if flagged:
        log(
            WARNING,
            "%s: a privacy loss that is not a number >= 0 counts as +inf (an unknown "
            "epsilon is not smaller than any known one): %s",
            name,
            _listed(flagged, lambda key: f"{key[:40]!r} from nodes {_listed(unreadable[key])}"),
        )

    def reduced(content: RecordDict, held: dict) -> RecordDict:
        kept = {k: held[k] for k in shared} | {k: privacy_loss(held[k]) for k in privacy}
        other = {n: r for n, r in content.items() if not isinstance(r, MetricRecord)}
        metrics_name = next(n for n, r in content.items() if isinstance(r, MetricRecord))
        return RecordDict({**other, metrics_name: MetricRecord(kept)})

    return [reduced(c, held) for c, held in zip(contents, values, strict=True)]


def _unreadable(value: object) -> bool:
    """An ε that :func:`privacy_loss` counts as +inf without its being +inf."""
    return privacy_loss(value) == math.inf and not (isinstance(value, float) and value == math.inf)


def own_metric_names(replies: Iterable[Message], weighted_by_key: str) -> list[str]:
    """The metric keys the replies carry of their own, sorted: not the weight, nor ours.

    What a ``@app.train`` handler reports besides ``weighted_by_key`` and the metrics our
    mods add for the server (``PROTOCOL_METRICS``); error replies carry none.
    """
    keys = {
        key
        for msg in replies
        if not msg.has_error()
        for key in _metric_values(msg.content)
        if key != weighted_by_key and key not in PROTOCOL_METRICS
    }
    return sorted(keys)


def clients_metrics(
    aggregate: MetricsAggregation,
    replies: list[Message],
    weighted_by_key: str,
    strategy_name: str,
    server_round: int,
    *,
    is_train: bool = True,
    max_examples: int = MAX_EXAMPLES,
) -> dict:
    """The clients' own metrics, aggregated over what the replies share; {} if nothing.

    Each reply is checked alone (:func:`reply_metrics`): one without exactly one
    ``MetricRecord``, or whose ``weighted_by_key`` is not a whole number in
    [1, ``max_examples``] ([0, ...] for evaluation), is left out with one log line
    naming its node. The metrics our mods add for the server (``PROTOCOL_METRICS``)
    are left out; of the rest, only the keys that every kept reply holds in the same
    form (a number, or a list of one length) are aggregated, and the others are named
    in one log line with the nodes that hold them in which form. A privacy loss
    (``*epsilon``) that every reply holds is kept, and one reply's value that is not a
    number >= 0 (NaN, negative, a list) counts as +inf, logged with its node: it can
    neither hide the others' values nor lower the round's largest. An aggregation that
    raises leaves {} (logged).
    """
    metrics = _aggregated(
        aggregate, replies, weighted_by_key, strategy_name, server_round, is_train, max_examples
    )
    return dict(metrics or {})


def _aggregated(
    aggregate: MetricsAggregation,
    replies: Iterable[Message],
    weighted_by_key: str,
    strategy_name: str,
    server_round: int,
    is_train: bool,
    max_examples: int,
) -> MetricRecord | None:
    """:func:`clients_metrics`, None when no reply was kept."""
    name = f"{strategy_name} round {server_round}"
    what = "training" if is_train else "evaluation"
    contents, nodes = [], []
    for msg in replies:
        if msg.has_error():
            continue
        try:
            reply_metrics(msg, weighted_by_key, max_examples, minimum=int(is_train))
        except ReplyError as err:
            log(
                WARNING,
                "%s: rejected the %s metrics of node %d: %s",
                name,
                what,
                msg.metadata.src_node_id,
                err,
            )
            continue
        contents.append(_with_metrics(msg.content, lambda k: k not in PROTOCOL_METRICS))
        nodes.append(msg.metadata.src_node_id)
    if not contents:
        return None
    return guarded(aggregate, name)(_shared(contents, nodes, name), weighted_by_key)


def checked_evaluation(
    strategy: FedAvg, server_round: int, replies: Iterable[Message]
) -> MetricRecord | None:
    """A FedAvg strategy's ``aggregate_evaluate`` with each reply checked alone.

    Flower's version raises (and ends the run) when one reply has another metric key
    than the rest, two ``MetricRecord`` s or no weight. Here Flower logs the replies
    and their errors, then :func:`clients_metrics` (``is_train=False``) rejects each
    malformed reply alone and aggregates what the others share with the strategy's
    ``evaluate_metrics_aggr_fn``. None when no reply was kept (as Flower's).
    """
    valid, _ = strategy._check_and_log_replies(list(replies), is_train=False, validate=False)
    return _aggregated(
        strategy.evaluate_metrics_aggr_fn,
        valid,
        strategy.weighted_by_key,
        type(strategy).__name__,
        server_round,
        False,
        getattr(strategy, "max_examples", MAX_EXAMPLES),
    )
