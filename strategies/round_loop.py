"""Flower's own round loop (``Strategy.start``) made safe for our strategies.

Three things Flower's loop cannot know: a DP strategy may stop at its privacy budget
(``PrivacyBudgetExhausted`` from ``configure_train``); an HE strategy's global model is
encrypted, so the server cannot evaluate it; and a run in which every round failed (say,
no client has its key) has trained nothing. :class:`FlowerLoop` gives each of our
strategies a ``start`` that returns a ``Result`` with every round that ran when the
budget stops training, skips server-side evaluation of encrypted models with one log
line, and ends a run that produced no model with :class:`NoModelTrainedError` (after
the first round that shows a configuration mistake: :class:`MisconfiguredRunError`).
:class:`RoundObserver` records the rounds as they happen; the simulation runner uses it
too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import Result, Strategy
from lepton_flwr.strategies.checkpoint import (
    CHECKPOINT_FILE,
    METRICS,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    new_run_id,
    save_checkpoint,
)
from lepton_flwr.strategies.config_stop import ConfigurationStop, reply_failure
from lepton_flwr.strategies.last_good import TrainingHeldBackError
from lepton_flwr.strategies.resume_settings import check_same_run, run_settings, start_fresh

from lepton_flwr import protocol
from lepton_flwr.dp.accounting import PrivacyBudgetExhausted
from lepton_flwr.dp.rounds import NodesUnavailableError
from lepton_flwr.he.records import is_encrypted
from lepton_flwr.mistakes import Mistake

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
OBSERVED = ("configure_train", "aggregate_train", "aggregate_evaluate")


class RoundObserver:
    """Record a strategy's rounds while Flower's loop drives it.

    Inside ``with RoundObserver(strategy) as observed:``, the strategy's
    ``configure_train``, ``aggregate_train`` and ``aggregate_evaluate`` are wrapped on
    the instance (nothing else changes; observers nest), ``observed.result`` holds
    what Flower's loop would have returned so far, and ``observed.train_seconds[r]``
    the time from round r's ``configure_train`` to the end of its ``aggregate_train``.

    Parameters
    ----------
    strategy : Strategy
        The strategy to observe.
    on_round_start : Callable[[int], None] | None
        Called with the round number before ``configure_train`` runs.
    stop : ConfigurationStop | None
        Judges each round's training replies
        (:class:`~lepton_flwr.strategies.config_stop.ConfigurationStop`); when it finds
        the run misconfigured, ``aggregate_train`` raises :class:`MisconfiguredRunError`
        once the round is recorded. None: no such check.
    """

    def __init__(
        self,
        strategy: Strategy,
        on_round_start: Callable[[int], None] | None = None,
        stop: ConfigurationStop | None = None,
    ):
        self.strategy, self.on_round_start, self.stop = strategy, on_round_start, stop
        self._sent_to: set[int] = set()  # the nodes of the current round's training messages
        self._grid: Grid | None = None
        self.result = Result()
        self.train_seconds: dict[int, float] = {}
        self.configured: set[int] = set()  # rounds whose configure_train returned
        self.aggregated: set[int] = set()  # rounds that produced a new global model
        self.first_failure: str | None = None  # the first error reply seen, with its node
        self.replies = 0  # training replies seen, error replies included
        self._started: dict[int, float] = {}
        self._saved: dict[str, object] = {}

    def __enter__(self) -> RoundObserver:
        strategy, result = self.strategy, self.result
        configure_train, aggregate_train, aggregate_evaluate = (
            getattr(strategy, name) for name in OBSERVED
        )
        self._saved = {name: strategy.__dict__.get(name) for name in OBSERVED}

        def observed_configure_train(server_round, arrays, config, grid):
            if self.on_round_start is not None:
                self.on_round_start(server_round)
            self._started[server_round] = time.monotonic()
            messages = list(configure_train(server_round, arrays, config, grid))
            self.configured.add(server_round)
            self._sent_to = {m.metadata.dst_node_id for m in messages}
            self._grid = grid
            return messages

        def observed_aggregate_train(server_round, replies):
            replies = list(replies)
            self.replies += len(replies)
            failed = [r for r in replies if r.has_error()]
            if failed and self.first_failure is None:
                node, reason = failed[0].metadata.src_node_id, failed[0].error.reason
                self.first_failure = f"node {node}: {reason}"
            rejected = getattr(strategy, "rejected_replies", None)
            if self.stop is not None and rejected is not None:
                rejected.clear()
            arrays, metrics = aggregate_train(server_round, replies)
            if arrays is not None:
                self.aggregated.add(server_round)
            started = self._started.get(server_round)
            if started is not None:
                self.train_seconds[server_round] = time.monotonic() - started
            if arrays is not None:
                result.arrays = arrays
            if metrics is not None:
                result.train_metrics_clientapp[server_round] = metrics
            if self.stop is not None:
                self._judge(server_round, replies, rejected or {})
            return arrays, metrics

        def observed_aggregate_evaluate(server_round, replies):
            metrics = aggregate_evaluate(server_round, replies)
            if metrics is not None:
                result.evaluate_metrics_clientapp[server_round] = metrics
            return metrics

        strategy.configure_train = observed_configure_train
        strategy.aggregate_train = observed_aggregate_train
        strategy.aggregate_evaluate = observed_aggregate_evaluate
        return self

    def __exit__(self, *exc) -> None:
        _restore(self.strategy, self._saved)

    def _judge(self, server_round: int, replies: list, rejected: dict[int, str]) -> None:
        """Raise :class:`MisconfiguredRunError` if the round shows a configuration mistake."""
        outcomes = {r.metadata.src_node_id: reply_failure(r, rejected) for r in replies}
        grid = self._grid

        def known_nodes() -> int:
            return len(list(grid.get_node_ids())) if grid is not None else 0

        if self.stop.after_round(self._sent_to, outcomes, known_nodes) is None:
            return
        message = self.stop.reason(type(self.strategy).__name__, server_round)
        log(ERROR, message)
        raise MisconfiguredRunError(message, self.result, self.stop.mistake)


def _restore(strategy: Strategy, saved: dict[str, object]) -> None:
    """Put back the instance attributes a wrapper replaced (None: there was none)."""
    for name, previous in saved.items():
        if previous is None:
            del strategy.__dict__[name]
        else:
            setattr(strategy, name, previous)


def plaintext_only(evaluate_fn: EvaluateFn, strategy_name: str) -> EvaluateFn:
    """Wrap a server-side ``evaluate_fn`` so that encrypted models are skipped (logged once).

    A function marked ``decrypts`` (``lepton_flwr.he.keyholder_evaluate_fn``) is kept.
    """
    if getattr(evaluate_fn, "decrypts", False):
        return evaluate_fn
    logged = False

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        nonlocal logged
        if not is_encrypted(arrays):
            return evaluate_fn(server_round, arrays)
        if not logged:
            log(
                INFO,
                "%s: the global model is encrypted, so the server cannot evaluate it; "
                "server-side evaluate_fn skipped from now on. Evaluation is federated; "
                "a key holder can decrypt the final model (lepton_flwr.he.decrypt_arrays).",
                strategy_name,
            )
            logged = True
        return None

    return evaluate


def _recorded(evaluate_fn: EvaluateFn, result: Result) -> EvaluateFn:
    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        metrics = evaluate_fn(server_round, arrays)
        if metrics is not None:
            result.evaluate_metrics_serverapp[server_round] = metrics
        return metrics

    return evaluate


class _RoundOffset:
    """Add ``offset`` to the round numbers a strategy's round methods receive (resume).

    Flower's loop numbers rounds from 1; a resumed run continues from ``offset + 1``.
    ``on_round_start(r)`` runs before round r's ``configure_train``, and
    ``on_aggregated(r)`` as soon as round r's ``aggregate_train`` returns, before Flower's
    loop does anything with its model (checkpoints).
    """

    NAMES = ("configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate")

    def __init__(
        self,
        strategy: Strategy,
        offset: int,
        on_round_start: Callable[[int], None],
        on_aggregated: Callable[[int], None],
    ):
        self.strategy, self.offset = strategy, offset
        self.on_round_start, self.on_aggregated = on_round_start, on_aggregated
        self._saved: dict[str, object] = {}

    def __enter__(self) -> _RoundOffset:
        self._saved = {name: self.strategy.__dict__.get(name) for name in self.NAMES}
        for name in self.NAMES:
            method = getattr(self.strategy, name)

            def shifted(server_round, *args, _method=method, _name=name):
                server_round += self.offset
                if _name == "configure_train":
                    self.on_round_start(server_round)
                returned = _method(server_round, *args)
                if _name == "aggregate_train":
                    self.on_aggregated(server_round)
                return returned

            setattr(self.strategy, name, shifted)
        return self

    def __exit__(self, *exc) -> None:
        _restore(self.strategy, self._saved)


class FlowerLoop:
    """Give a strategy Flower's ``start``, with the budget stop and encrypted-model guard."""

    node_wait_timeout: float | None = None  # set by ``start``: how long to wait for nodes
    last_round: int | None = None  # set by ``start``: the run's last round number

    @property
    def rejected_replies(self) -> dict[int, str]:
        """The round's rejected training replies: each one's reason, by node."""
        return self.__dict__.setdefault("_rejected_replies", {})

    def note_rejected(self, msg: Message, reason: object) -> None:
        """Remember why the strategy rejected a training reply (beside its log line).

        ``start`` reads them after each round to tell a configuration mistake from other
        failures (:mod:`~lepton_flwr.strategies.config_stop`).
        """
        self.rejected_replies[msg.metadata.src_node_id] = str(reason)

    def state(self) -> dict:
        """What the next round needs besides the global model (checkpoints); none here."""
        return {}

    def load_state(self, state: dict) -> None:
        """Take back what :meth:`state` returned (resuming from a checkpoint)."""

    def resume_settings(self) -> dict:
        """The strategy's own settings a resumed run must keep (JSON values); none here.

        ``start`` records them in every checkpoint beside the class, ``num_rounds``, the
        model's layout and the key's fingerprint, and refuses to resume under others.
        """
        return {}

    def resume_from(
        self,
        checkpoint_dir: str | Path,
        checkpoint_key: str | Path | None = None,
        settings: dict | None = None,
        change_num_rounds: bool = False,
    ) -> Checkpoint | None:
        """Load the folder's checkpoint and take back the strategy's state from it.

        Parameters
        ----------
        checkpoint_dir, checkpoint_key
            As in :meth:`start`.
        settings : dict | None
            This start's run settings
            (:func:`~lepton_flwr.strategies.resume_settings.run_settings`), checked
            against the checkpoint's before its state is taken back; None: not checked.
        change_num_rounds : bool
            Whether ``num_rounds`` may differ from the checkpoint's.

        Returns
        -------
        Checkpoint | None
            The checkpoint, or None if the folder holds none.

        Raises
        ------
        CheckpointError
            If it cannot be read or authenticated, was made with other settings
            (:class:`~lepton_flwr.strategies.resume_settings.OtherSettingsError`, naming
            each with both values), or the strategy refuses its state (other privacy
            settings, a malformed value), naming the file and the reason.
        """
        path = Path(checkpoint_dir) / CHECKPOINT_FILE
        saved = load_checkpoint(checkpoint_dir, checkpoint_key)
        if saved is not None:
            if settings is not None:
                check_same_run(path, saved.settings, settings, change_num_rounds)
            try:
                self.load_state(saved.state)
            except (ValueError, KeyError, TypeError) as err:
                what = f"the strategy's state has no {err}" if isinstance(err, KeyError) else err
                raise CheckpointError(f"{path}: {what}; {start_fresh(path)}") from err
        return saved

    def _evaluate_again(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord | None,
        grid: Grid,
        timeout: float,
    ) -> None:
        """Federated evaluation of a checkpointed round whose evaluation a crash cut short."""
        log(
            INFO,
            "%s: round %d's model was checkpointed before its evaluation ended; "
            "evaluating it again (the same model: nothing new is released)",
            type(self).__name__,
            server_round,
        )
        messages = self.configure_evaluate(server_round, arrays, config or ConfigRecord(), grid)
        self.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_key: str | Path | None = None,
        change_num_rounds: bool = False,
    ) -> Result:
        """Run Flower's round loop (``Strategy.start``) with guards and checkpoints.

        When the privacy budget would be passed, training stops and the ``Result`` holds
        the last released model and the metrics of every round that ran (privacy
        figures in ``train_metrics_clientapp``). A server-side ``evaluate_fn`` is not
        called on encrypted models (one log line says so). A run in which no round
        produced a model (every client failed, e.g. without its key) ends with Flower's
        ``AggregationError`` (:class:`NoModelTrainedError`, whose ``result`` holds the rounds)
        naming the first failure, instead of a quiet success; when a round shows a
        configuration mistake (every reply failed for the same one: no key, no ``he_mod``,
        the mods in the wrong order...), the run stops after that round with
        :class:`MisconfiguredRunError`, a ``NoModelTrainedError`` naming the mistake
        (:mod:`~lepton_flwr.strategies.config_stop` says when, and why one node cannot
        make it happen; a resumed run never stops so). Waiting for
        ``min_available_nodes`` (DP strategies) is bounded by ``timeout`` as well: when
        too few nodes connect in that time, training stops as at the budget, with an
        error line saying how many came. So does an HE run whose refused models one
        dishonest node cannot explain (``TrainingHeldBackError``, logged with the suspects:
        :mod:`~lepton_flwr.strategies.last_good`); its ``Result`` holds the model clients
        last accepted.

        With ``checkpoint_dir``, the global model, the strategy's :meth:`state` and the
        metrics so far are written there (``checkpoint.zip``, atomically) at the start of
        every round, at the end, and as soon as a round's ``aggregate_train`` returns:
        before Flower's loop evaluates the round's model or sends it to any client, so
        that no model leaves the server before the checkpoint holds it and the accountant
        that composed it. When the folder already holds a checkpoint, the run resumes
        after its last round: call ``start`` again with the same arguments and a
        strategy built with the same settings, and the rounds, ε and metrics continue as
        an uninterrupted run's (``initial_arrays`` then gives the model's layout only).
        A checkpoint of a run started with other settings (the strategy's class, its
        privacy and sampling settings, ``num_rounds``, the model's tensor names, dtypes
        and shapes, the key) is refused with
        :class:`~lepton_flwr.strategies.resume_settings.OtherSettingsError`, naming each
        setting with both values: start a new run with another ``checkpoint_dir``, or
        delete the checkpoint. To take a checkpointed run to another ``num_rounds`` on
        purpose, pass ``change_num_rounds=True`` (under DP, more rounds spend more ε).
        A run whose checkpoint holds all ``num_rounds`` rounds is not trained again:
        ``start`` logs a warning and returns the checkpoint's ``Result``. A round whose
        model was checkpointed is never trained again: if its evaluation did not finish,
        it is evaluated again (the same model, so nothing new is released). Checkpoints
        are authenticated with ``checkpoint_key`` (a key file; default
        :func:`~lepton_flwr.strategies.checkpoint.default_key_file`, made on first use);
        one that was changed, made with other settings, older than the folder's last,
        or malformed raises ``CheckpointError`` naming the file and the reason.

        Every training message's config carries the run's id (``lepton-run-id``: made at
        the first start, kept by the checkpoints, so the same after a resume, which
        Flower numbers as a new run) and the round the run resumed after
        (``lepton-resumed-after``, 0 when not resumed): clients key what they keep per
        run by them (:mod:`lepton_flwr.dp.client_state`).
        """
        name = type(self).__name__
        self.node_wait_timeout, self.last_round = timeout, num_rounds
        saved = None
        settings = run_settings(self, initial_arrays, num_rounds, self.resume_settings())
        if checkpoint_dir is not None:
            saved = self.resume_from(checkpoint_dir, checkpoint_key, settings, change_num_rounds)
        done, run_id = 0, new_run_id() if saved is None else saved.run_id
        if saved is not None:
            initial_arrays, done = saved.arrays, saved.server_round
            path = Path(checkpoint_dir) / CHECKPOINT_FILE
            if done >= num_rounds and saved.evaluated:
                _already_finished(name, path, done, num_rounds)
                return saved.result
            log(INFO, "%s: resuming after round %d of %d from %s", name, done, num_rounds, path)
        # Clients key what they keep per run (DP-SGD histories) by an id that survives a
        # resume; a node without such state refuses to train in a resumed run.
        train_config = ConfigRecord(
            {**(train_config or {}), protocol.RUN_ID: run_id, protocol.RESUMED_AFTER: done}
        )
        nodes_missing = False
        # A resumed run worked before: only a fresh run can stop for its configuration.
        stop = ConfigurationStop(worked=bool(done))
        with RoundObserver(self, stop=stop) as observed:
            if saved is not None:
                for key in METRICS:
                    getattr(observed.result, key).update(getattr(saved.result, key))
                observed.aggregated.update(range(1, done + 1))
            observed.result.arrays = initial_arrays

            def save(after_round: int, evaluated: bool = True) -> None:
                if checkpoint_dir is not None:
                    checkpoint = Checkpoint(
                        after_round,
                        observed.result.arrays,
                        self.state(),
                        observed.result,
                        evaluated=evaluated,
                        run_id=run_id,
                        settings=settings,
                    )
                    save_checkpoint(checkpoint_dir, checkpoint, checkpoint_key)

            if evaluate_fn is not None:
                evaluate_fn = _recorded(plaintext_only(evaluate_fn, name), observed.result)
                evaluate_fn = _shifted(evaluate_fn, done)
            try:
                if saved is not None and not saved.evaluated:
                    self._evaluate_again(done, initial_arrays, evaluate_config, grid, timeout)
                with _RoundOffset(
                    self,
                    done,
                    on_round_start=lambda server_round: save(server_round - 1),
                    on_aggregated=lambda server_round: save(server_round, evaluated=False),
                ):
                    result = super().start(
                        grid,
                        initial_arrays,
                        max(0, num_rounds - done),
                        timeout,
                        train_config,
                        evaluate_config,
                        evaluate_fn,  # Flower's loop calls it on the checkpointed model first
                    )
                save(max(num_rounds, done))
            except PrivacyBudgetExhausted as stop:
                log(WARNING, "%s: privacy budget reached, training stops: %s", name, stop)
                result = observed.result
            except (NodesUnavailableError, TrainingHeldBackError) as stop:
                log(ERROR, "%s: training stops: %s", name, stop)
                result, nodes_missing = observed.result, True
                observed.first_failure = observed.first_failure or str(stop)
            if done:
                result = observed.result  # rounds numbered as in the uninterrupted run
        if (observed.configured or nodes_missing) and not observed.aggregated:
            _no_model(name, observed)
        return result


def _already_finished(name: str, path: Path, done: int, num_rounds: int) -> None:
    """Say loudly that ``start`` trains nothing: the checkpoint's run is over."""
    log(
        WARNING,
        "%s: the run checkpointed at %s already finished (%d rounds%s): nothing is "
        "trained, and start returns that run's Result (its final model and the metrics "
        "of its %d rounds). %s; to train it further, pass a larger num_rounds with "
        "change_num_rounds=True",
        name,
        path,
        done,
        f", {num_rounds} asked" if num_rounds != done else "",
        done,
        start_fresh(path).capitalize(),
    )


def _shifted(evaluate_fn: EvaluateFn, offset: int) -> EvaluateFn:
    """Call ``evaluate_fn`` with round numbers ``offset`` later (resume)."""
    if not offset:
        return evaluate_fn

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        return evaluate_fn(server_round + offset, arrays)

    evaluate.decrypts = getattr(evaluate_fn, "decrypts", False)
    return evaluate


class NoModelTrainedError(AggregationError):
    """No round of a run produced a model; ``result`` holds what the rounds recorded.

    A subclass of Flower's ``AggregationError``: uncaught, it fails the ServerApp.
    """

    def __init__(self, reason: str, result: Result):
        super().__init__(reason)
        self.result = result


class MisconfiguredRunError(NoModelTrainedError):
    """A run stopped after a round whose every reply failed for one configuration mistake.

    ``mistake`` (:class:`~lepton_flwr.mistakes.Mistake`) names it, ``result`` holds the
    rounds that ran (:mod:`~lepton_flwr.strategies.config_stop` says when a run stops).
    """

    def __init__(self, reason: str, result: Result, mistake: Mistake):
        super().__init__(reason, result)
        self.mistake = mistake


def _no_model(name: str, observed: RoundObserver) -> None:
    """End a run in which no round produced a model: an error, not a quiet success.

    Raises
    ------
    NoModelTrainedError
        Saying why, with the rounds' ``Result``.
    """
    if observed.first_failure:
        reason = f"the first failure: {observed.first_failure}"
    elif observed.replies:
        reason = "the server refused every reply (see the log lines above)"
    else:
        reason = "no reply reached the server: no client was sampled, or none answered"
    message = (
        f"{name}: none of the {len(observed.configured)} rounds produced a model, so "
        f"training did nothing; {reason}"
    )
    log(ERROR, message)
    raise NoModelTrainedError(message, observed.result)
