"""The server's round loop: Flower's train/evaluate cycle, recorded round by round."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import ERROR, INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from lepton_flwr.dp.accounting import PrivacyBudgetExhausted
from lepton_flwr.results import RunRecorder

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


def message_bytes(message: Message) -> int:
    """Bytes of a message's records (arrays, configs, metrics) as Flower counts them."""
    if message.has_error():
        return 0
    return sum(record.count_bytes() for record in message.content.values())


def _exchange(
    grid: Grid, messages: Iterable[Message], timeout: float
) -> tuple[list[Message], int, int]:
    """Send messages, wait for replies; return the replies, bytes sent and bytes received."""
    messages = list(messages)
    if not messages:
        return [], 0, 0
    sent = sum(message_bytes(m) for m in messages)
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    return replies, sent, sum(message_bytes(r) for r in replies)


def _prefixed(prefix: str, metrics: MetricRecord | None) -> dict[str, float]:
    """Copy metrics under our column names (``eval-loss`` -> ``federated_loss``)."""
    if metrics is None:
        return {}
    out = {}
    for key, value in metrics.items():
        name = key.removeprefix("eval-").removeprefix("train-").replace("-", "_")
        # Clients' own figures (client-epsilon) keep their name: they are not losses.
        out[name if key.startswith("client-") else f"{prefix}_{name}"] = value
    return out


def _progress_line(row: dict, num_rounds: int) -> str:
    shown = []
    for key in (
        "central_accuracy",
        "central_r2",
        "central_loss",
        "federated_accuracy",
        "federated_r2",
        "federated_loss",
        "train_loss",
        "epsilon",
        "client_epsilon",
    ):
        if key in row:
            shown.append(f"{key}={row[key]:.4f}")
    shown.append(f"{row['round_seconds']:.1f}s")
    shown.append(f"down={row['bytes_down'] / 1e6:.2f}MB up={row['bytes_up'] / 1e6:.2f}MB")
    if row.get("train_failures"):
        shown.append(f"failures={row['train_failures']}")
    return f"[lepton] round {row['round']}/{num_rounds}: " + " ".join(shown)


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    recorder: RunRecorder,
    *,
    evaluate_fn: EvaluateFn | None = None,
    train_config: ConfigRecord | None = None,
    evaluate_config: ConfigRecord | None = None,
    timeout: float = 3600.0,
) -> ArrayRecord:
    """Run ``num_rounds`` federated rounds with ``strategy`` and record each one.

    The cycle is Flower's (``Strategy.start``): configure_train, exchange,
    aggregate_train, configure_evaluate, exchange, aggregate_evaluate, then central
    evaluation. Each round's metrics, timing and bytes on the wire are written to the
    recorder as soon as the round ends. A round whose aggregation yields nothing (every
    reply failed, or the strategy refused them) keeps the current global model.

    Returns
    -------
    ArrayRecord
        The final global model.
    """
    train_config = ConfigRecord() if train_config is None else train_config
    evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
    arrays = initial_arrays
    if evaluate_fn is not None:
        initial = evaluate_fn(0, arrays)
        if initial is not None:
            log(INFO, "[lepton] initial global model: %s", dict(initial))

    for rnd in range(1, num_rounds + 1):
        started = time.monotonic()
        try:
            messages = list(strategy.configure_train(rnd, arrays, train_config, grid))
        except PrivacyBudgetExhausted as stop:
            log(WARNING, "[lepton] privacy budget reached, training stops: %s", stop)
            break
        replies, down, up = _exchange(grid, messages, timeout)
        failures = sum(r.has_error() for r in replies)
        try:
            new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
        except Exception as err:  # noqa: BLE001 - a bad round must not end the run
            log(ERROR, "[lepton] round %d: aggregation failed, global model kept: %r", rnd, err)
            new_arrays, train_metrics = None, None
        if new_arrays is None:
            log(WARNING, "[lepton] round %d: no aggregate; the global model is unchanged", rnd)
        else:
            arrays = new_arrays
        train_seconds = time.monotonic() - started

        eval_replies, eval_down, eval_up = _exchange(
            grid, strategy.configure_evaluate(rnd, arrays, evaluate_config, grid), timeout
        )
        try:
            eval_metrics = strategy.aggregate_evaluate(rnd, eval_replies)
        except Exception as err:  # noqa: BLE001
            log(ERROR, "[lepton] round %d: federated evaluation failed: %r", rnd, err)
            eval_metrics = None
        central_started = time.monotonic()
        central = evaluate_fn(rnd, arrays) if evaluate_fn is not None else None
        central_seconds = time.monotonic() - central_started

        row = {
            "round": rnd,
            **_prefixed("central", central),
            **_prefixed("federated", eval_metrics),
            **_prefixed("train", train_metrics),
            "clients_sampled": len(messages),
            **getattr(strategy, "last_report", {}),
            "train_failures": failures,
            "bytes_down": down + eval_down,
            "bytes_up": up + eval_up,
            "train_seconds": round(train_seconds, 3),
            "server_eval_seconds": round(central_seconds, 3),
            "round_seconds": round(time.monotonic() - started, 3),
        }
        recorder.record(row)
        log(INFO, _progress_line(row, num_rounds))
    return arrays
