"""The runner's record of a run driven by Flower's ``Strategy.start``: one row per round.

:class:`RecordingGrid` wraps any Flower ``Grid`` and counts what each exchange sends and
receives; :class:`RoundRows` joins that with what the strategy aggregated (observed with
``RoundObserver``) and the server-side evaluation, and writes a round's row as soon as
the next round starts (or the run ends).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from lepton_flwr import protocol
from lepton_flwr.strategies.round_loop import RoundObserver


def message_bytes(message: Message) -> int:
    """Bytes of a message's records (arrays, configs, metrics) as Flower counts them."""
    if message.has_error():
        return 0
    return sum(record.count_bytes() for record in message.content.values())


class RecordingGrid(Grid):
    """A Grid that passes everything to ``grid`` and records each ``send_and_receive``.

    ``exchanges`` holds, per call, the message type, the messages sent, the bytes sent
    and received, and the error replies.
    """

    def __init__(self, grid: Grid):
        self.grid = grid
        self.exchanges: list[dict] = []

    def set_run(self, run_id: int) -> None:  # noqa: D102
        self.grid.set_run(run_id)

    @property
    def run(self):  # noqa: D102
        return self.grid.run

    def create_message(  # noqa: D102
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl=None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send, wait for the replies, and record the exchange."""
        messages = list(messages)
        if not messages:
            return []
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        stage = any(protocol.SECAGG_STAGE in c for c in messages[0].content.config_records.values())
        self.exchanges.append(
            {  # secure aggregation's stages travel as train messages: counted apart
                "type": "secagg" if stage else messages[0].metadata.message_type.split(".")[0],
                "sent": len(messages),
                "bytes_down": sum(message_bytes(m) for m in messages),
                "bytes_up": sum(message_bytes(r) for r in replies),
                "failures": sum(r.has_error() for r in replies),
            }
        )
        return replies


def _columns(prefix: str, metrics: MetricRecord | None) -> dict[str, float]:
    """Metrics under our column names: ``eval-loss`` -> ``federated_loss``; privacy as is."""
    if metrics is None:
        return {}
    out = {}
    for key, value in metrics.items():
        column = key.removeprefix("eval-").removeprefix("train-").replace("-", "_")
        # Privacy figures and clients' own ε (client-epsilon) keep their names.
        plain = key in protocol.PRIVACY_METRICS or key.startswith("client-")
        out[column if plain else f"{prefix}_{column}"] = value
    return out


def progress_line(row: dict, num_rounds: int) -> str:
    """The one console line per round."""
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


class RoundRows:
    """Build and hand over one row per round of a run under ``Strategy.start``.

    Parameters
    ----------
    grid : RecordingGrid
        The grid the strategy runs on.
    observer : RoundObserver
        Observing the strategy.
    write : Callable[[dict], None]
        Receives each finished row.
    num_rounds : int
        For the progress line.
    """

    def __init__(
        self,
        grid: RecordingGrid,
        observer: RoundObserver,
        write: Callable[[dict], None],
        num_rounds: int,
    ):
        self.grid, self.observer, self.write, self.num_rounds = grid, observer, write, num_rounds
        self.central: dict[int, tuple[MetricRecord | None, float]] = {}
        self._open: tuple[int, float] | None = None
        observer.on_round_start = self.start_round

    def start_round(self, server_round: int) -> None:
        """Close the previous round's row; start timing this one."""
        self.finish()
        self._open = (server_round, time.monotonic())

    def reopen(self, server_round: int, train_metrics: MetricRecord | None) -> None:
        """Open the row of a checkpointed round whose evaluation a crash cut short (resume).

        The resumed run evaluates that round's model again; its row gets the round's
        training metrics from the checkpoint and is written when the next round starts.
        Its bytes and seconds count what the resumed run spent on the round (its
        evaluation), not the training before the crash.
        """
        self.finish()
        self.observer.configured.add(server_round)
        if train_metrics is not None:
            self.observer.result.train_metrics_clientapp[server_round] = train_metrics
        self._open = (server_round, time.monotonic())

    def evaluated(self, server_round: int, metrics: MetricRecord | None, seconds: float) -> None:
        """Keep the server-side evaluation of a round."""
        self.central[server_round] = (metrics, seconds)

    def finish(self) -> None:
        """Write the open round's row, if one is open."""
        if self._open is None:
            return
        server_round, started = self._open
        self._open = None
        if server_round not in self.observer.configured:
            return  # the round never started (the privacy budget stopped it)
        result = self.observer.result
        exchanges, self.grid.exchanges = self.grid.exchanges, []
        train = [e for e in exchanges if e["type"] == "train"]
        central, central_seconds = self.central.pop(server_round, (None, 0.0))
        row = {
            "round": server_round,
            **_columns("central", central),
            **_columns("federated", result.evaluate_metrics_clientapp.get(server_round)),
            "clients_sampled": sum(e["sent"] for e in train),
            **_columns("train", result.train_metrics_clientapp.get(server_round)),
            "train_failures": sum(e["failures"] for e in train),
            "bytes_down": sum(e["bytes_down"] for e in exchanges),
            "bytes_up": sum(e["bytes_up"] for e in exchanges),
            "train_seconds": round(self.observer.train_seconds.get(server_round, 0.0), 3),
            "server_eval_seconds": round(central_seconds, 3),
            "round_seconds": round(time.monotonic() - started, 3),
        }
        self.write(row)
        log(INFO, progress_line(row, self.num_rounds))


def timed_evaluation(
    evaluate: Callable[[int, ArrayRecord], MetricRecord | None], rows: RoundRows
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """An ``evaluate_fn`` that hands its result and time to ``rows``."""

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        started = time.monotonic()
        metrics = evaluate(server_round, arrays)
        rows.evaluated(server_round, metrics, time.monotonic() - started)
        return metrics

    evaluate_fn.decrypts = getattr(evaluate, "decrypts", False)  # a key holder's, kept
    return evaluate_fn
