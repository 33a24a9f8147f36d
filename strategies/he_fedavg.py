"""HE-FedAvg: FedAvg over CKKS ciphertexts, with a server that holds no secret key."""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

import tenseal as ts
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from lepton_flwr.strategies.encrypted_sum import EncryptedSum, the_metrics
from lepton_flwr.strategies.last_good import LastGoodModel, Verdict
from lepton_flwr.strategies.metrics import checked_evaluation, clients_metrics
from lepton_flwr.strategies.reply_checks import ReplyError, example_count
from lepton_flwr.strategies.round_loop import FlowerLoop
from lepton_flwr.strategies.secure_aggregation import resume_settings_of, secure_aggregation_for

from lepton_flwr import protocol
from lepton_flwr.he.codec import CiphertextError
from lepton_flwr.he.records import EncryptedModel, is_encrypted
from lepton_flwr.secagg.params import SecAggParams

OUR_MODS = ("he_mod:", "he_dp_mod:", "dp_share_mod:", "privacy_floor_mod:", "dp_clip_mod:")
EVALUATION_REFUSED = "does not answer federated evaluation"  # he_mod's refusal (dp.floor)


def _last_line(reason: str, width: int = 200) -> str:
    """The last non-empty line of a failure reason (a traceback's is the exception)."""
    lines = [line.strip() for line in reason.splitlines() if line.strip(" '>")]
    return (lines[-1] if lines else reason)[:width]


def _handler_failed(msg: Message) -> bool:
    """Whether the evaluate handler itself raised (no mod of ours answered)."""
    return not msg.error.reason.startswith(OUR_MODS) and msg.error.code in (
        ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
        ErrorCode.UNKNOWN,
    )


class ExplainsEncryptedEvaluation:
    """Federated evaluation, each reply checked alone; failures on the encrypted model explained.

    For HE strategies (put it before ``FedAvg`` among the bases). When every node fails
    to evaluate the encrypted global model, one log line says why, once, before any
    detail: an evaluate handler that raised on ciphertexts means the HE mod runs on
    ``@app.train`` only; a refusal by ``he_mod`` means the nodes do not evaluate
    encrypted models (their default). Handlers that raised on ciphertexts will raise
    again in every round, each with a traceback in the log: when every node the round's
    evaluation went to replied so (at least two nodes, or every node of a smaller
    federation) and no node has evaluated an encrypted model in this run, federated
    evaluation is skipped for the rest of the run (logged once).
    """

    _evaluated: ArrayRecord | None = None

    @property
    def _evaluation(self) -> dict:
        """What this run's federated evaluation has shown so far (per instance)."""
        return self.__dict__.setdefault(
            "_evaluation_state", {"sent": set(), "worked": False, "told": False, "off": False}
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's (none once evaluation is off); the model sent is kept to explain failures."""
        state = self._evaluation
        if state["off"]:
            return []
        self._evaluated = arrays
        sent = self.encrypted_sum.for_clients(arrays)  # the download copy of a sum
        messages = list(super().configure_evaluate(server_round, sent, config, grid))
        state["sent"] = {m.metadata.dst_node_id for m in messages}
        state["known"] = lambda: len(list(grid.get_node_ids()))
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Explain replies that failed on the encrypted model; check each reply alone.

        Each evaluation reply is checked alone and only the metrics the kept replies
        share are aggregated (:func:`~lepton_flwr.strategies.metrics.checked_evaluation`):
        one reply with another metric key than the rest cannot end the run.
        """
        replies = list(replies)
        if replies and self._evaluated is not None and is_encrypted(self._evaluated):
            if all(m.has_error() for m in replies):
                self._explain_failed_evaluation(server_round, replies)
            else:
                self._evaluation["worked"] = True
        return checked_evaluation(self, server_round, replies)

    def _explain_failed_evaluation(self, server_round: int, replies: list[Message]) -> None:
        """Say once why every node failed; stop evaluating when handlers cannot read ciphertexts."""
        state, name = self._evaluation, type(self).__name__
        handler_failed = all(_handler_failed(m) for m in replies)
        if not state["told"]:
            state["told"] = True
            if handler_failed:
                why = (
                    "the evaluate handler cannot read it, so the HE mod runs on training "
                    "only: attach it to the whole ClientApp, ClientApp(mods=[he_mod]) or "
                    "ClientApp(mods=[he_dp_mod]), not @app.train(mods=[...])"
                )
            elif all(EVALUATION_REFUSED in m.error.reason for m in replies):
                why = (
                    "the nodes do not evaluate encrypted models (he_mod's default): set "
                    "fraction_evaluate=0.0, or, where the server is trusted to follow the "
                    "protocol, make_he_mod(allow_evaluation=True) or allow-evaluation=true "
                    "in a node's config"
                )
            else:
                why = "see the nodes' replies below"
            first = replies[0]
            log(
                WARNING,
                "%s round %d: every node failed to evaluate the encrypted global model: %s. "
                "(node %d: %s)",
                name,
                server_round,
                why,
                first.metadata.src_node_id,
                _last_line(first.error.reason),
            )
        nodes = {m.metadata.src_node_id for m in replies}
        decided = len(nodes) >= 2 or state.get("known", lambda: 0)() <= len(nodes)
        if handler_failed and not state["worked"] and state["sent"] <= nodes and decided:
            state["off"] = True
            log(
                WARNING,
                "%s: federated evaluation is skipped for the rest of this run: every node's "
                "evaluate handler raised on the encrypted model, and would in every round",
                name,
            )


class HEFedAvg(FlowerLoop, ExplainsEncryptedEvaluation, FedAvg):
    """Federated averaging of CKKS-encrypted updates.

    Clients (with ``he_mod``) send ``w_i * update_i`` encrypted, plus their weight
    ``w_i`` in the clear (their ``weighted_by_key`` metric over the mod's
    ``weight_scale``). The server checks each reply, adds the ciphertexts and the
    weights, and keeps the global model as that encrypted weighted sum: it never holds a
    plaintext update or global model, and cannot decrypt (its context has no secret key).
    Clients divide by the total weight after decryption. Round 1 sends the initial
    (public) model in the clear. Each client clamps its weights to the public bound
    ``value_bound`` before encrypting; the server checks that each header declares its
    weight times that bound, and adds replies only while the sum of those bounds stays
    within the CKKS headroom (the largest replies are rejected first), so no client can
    make the sum wrap around. Clients refuse a decrypted model that is not finite or
    passes the bound (an upload under another key, say); when more than half of a
    round's replies, and at least two, refuse, the server falls back to the last model
    clients accepted (logged), and finds the node at fault by leaving suspects out of the
    next rounds (:mod:`~lepton_flwr.strategies.last_good`: one dishonest node makes at
    most 1 + ⌈log2 m⌉ models be refused, m the nodes in the first, and is then excluded;
    refusals from a minority, or of a model sent in the clear, change nothing; a node
    that is half of a round's replies can make that round add nothing).
    Evaluation is federated: ``start`` skips a server-side
    ``evaluate_fn`` once the model is encrypted (one log line), and ``Result.arrays`` is
    the encrypted final model (``lepton_flwr.he.save_encrypted_arrays`` writes it,
    ``lepton_flwr.he.decrypt_arrays`` decrypts it with the secret context).

    A reply is rejected, with one log line naming the node and the reason, when its
    ciphertexts do not parse or are not fresh ciphertexts of the server's parameters,
    carry another key's fingerprint, come in the wrong number, hold plaintext tensors
    (no ``he_mod`` on the client), describe a model whose tensor names, shapes or dtypes
    differ from the global one, lack the ``weighted_by_key`` metric (a whole number in
    [1, ``max_examples``]), declare a weight or bound the server does not derive from
    it, or weigh more than ``max_weight_ratio`` times the round's median. With fewer than
    ``min_train_nodes`` valid replies the round is skipped and the global model kept;
    replies whose bounds would take the sum past the CKKS headroom are rejected, largest
    first, and the round goes on with the rest.

    Parameters
    ----------
    public_context : ts.Context | str | Path
        The server's CKKS context (or the path of ``public.ctx`` from
        ``lepton-flwr keygen``); refused if it holds a secret key.
    weight_scale : float (default: 100.0)
        Announced to the clients, whose ``he_mod`` encrypts ``(count / weight_scale) *
        update``; the server derives each reply's weight the same way and rejects a header
        that disagrees (a client cannot weigh in more than its count says).
    value_bound : float (default: 100.0)
        Public bound b on every model value: clients clamp their weights to ±b, and the
        server counts ``weight × b`` per reply against the CKKS headroom.
    max_examples : int (default: 10,000,000)
        Largest example count a reply may claim; counts must be whole numbers from 1.
    max_weight_ratio : float | None (default: 10.0)
        A reply whose example count is more than this many times the round's median
        count (the lower median of the replies whose count can be read) is rejected, so
        that one client cannot own the model by claiming a huge count. The weight is
        encrypted into the ciphertext by the client, so the server cannot clip it: it
        rejects. Of the n replies of a round, ⌊n/2⌋ others weigh at least the median, so
        one reply's share of the weight is at most r / (r + ⌊n/2⌋) for r =
        ``max_weight_ratio`` (n = 10: 67 %). Raise it for federations whose
        honest sizes differ more; None turns it off.
    headroom_fraction : float (default: 0.5)
        Largest share of the CKKS headroom that the bound on the summed values may use;
        replies that would exceed it are rejected, largest first (CKKS would wrap around
        silently).
    workers : int | None (default: None)
        Processes that load and add ciphertexts in parallel; None uses every core.
    secure_aggregation : bool | SecAggParams (default: False)
        Mask every upload so that no single upload, nor any sum short of all the round's
        survivors, can be decrypted, even by a holder of the shared key
        (:mod:`~lepton_flwr.strategies.secure_aggregation`); ``True`` takes the default
        :class:`~lepton_flwr.secagg.params.SecAggParams`. Costs one extra exchange a
        round once keys are shared (the next round's keys travel with this round's unmask).
    **fedavg_kwargs
        Every argument of Flower's FedAvg, honoured: ``fraction_train``,
        ``fraction_evaluate``, ``min_train_nodes``, ``min_evaluate_nodes``,
        ``min_available_nodes``, ``weighted_by_key`` (sent to the clients, whose
        ``he_mod`` weights the update by that metric), ``arrayrecord_key``,
        ``configrecord_key``, ``train_metrics_aggr_fn``, ``evaluate_metrics_aggr_fn``.
    """

    def __init__(
        self,
        public_context: ts.Context | str | Path,
        *,
        headroom_fraction: float = 0.5,
        workers: int | None = None,
        weight_scale: float = 100.0,
        value_bound: float = 100.0,
        max_examples: int = 10_000_000,
        max_weight_ratio: float | None = 10.0,
        secure_aggregation: bool | SecAggParams = False,
        **fedavg_kwargs,
    ):
        super().__init__(**fedavg_kwargs)
        if max_weight_ratio is not None and not (
            math.isfinite(max_weight_ratio) and max_weight_ratio >= 1
        ):
            raise ValueError(
                f"max_weight_ratio must be a finite number >= 1, or None, got {max_weight_ratio}."
            )
        self.max_weight_ratio = max_weight_ratio
        if not weight_scale > 0:
            raise ValueError(f"weight_scale must be > 0, got {weight_scale}.")
        if not (isinstance(max_examples, int) and max_examples >= 1):
            raise ValueError(f"max_examples must be an int >= 1, got {max_examples}.")
        if not (math.isfinite(value_bound) and value_bound > 0):
            raise ValueError(f"value_bound must be finite and > 0, got {value_bound}.")
        self.weight_scale, self.max_examples = float(weight_scale), max_examples
        self.value_bound = float(value_bound)
        self.encrypted_sum = EncryptedSum(public_context, headroom_fraction, workers, "HEFedAvg")
        self.encrypted_sum.on_reject = self.note_rejected
        self.last_good = LastGoodModel("HEFedAvg")
        self.secure_aggregation = secure_aggregation_for(
            secure_aggregation, self.encrypted_sum.adder, "HEFedAvg"
        )
        self._presampled: dict[int, list[int]] = {}
        self._grid: Grid | None = None

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the CKKS key."""
        return self.encrypted_sum.fingerprint

    def resume_settings(self) -> dict:
        """What the sum and its checks depend on, and secure aggregation (resume)."""
        return {
            "weight_scale": self.weight_scale,
            "value_bound": self.value_bound,
            "max_examples": self.max_examples,
            "max_weight_ratio": self.max_weight_ratio,
            "min_train_nodes": self.min_train_nodes,
            **resume_settings_of(self.secure_aggregation),
        }

    def state(self) -> dict:
        """The last model clients accepted (ciphertexts), for checkpoints."""
        return self.last_good.state()

    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state` (resume)."""
        self.last_good.load_state(state)

    @property
    def headroom(self) -> float:
        """Bound the summed values may reach (a share of the CKKS headroom)."""
        return self.encrypted_sum.headroom

    def summary(self) -> None:
        """Log the strategy's settings."""
        super().summary()
        log(
            INFO,
            "\t├──> HE: CKKS, %d values per ciphertext, key %s",
            self.encrypted_sum.adder.slots,
            self.fingerprint,
        )
        log(INFO, "\t├──> bound on summed values: %.3g", self.headroom)
        log(
            INFO,
            "\t└──> weights: %s per example, at most %s times the round's median",
            1 / self.weight_scale,
            self.max_weight_ratio,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the model, tell clients what to weight by and the bound, sample as FedAvg."""
        self.encrypted_sum.remember_manifest(arrays)
        self.last_good.sent(server_round, arrays)
        if self.weighted_by_key != protocol.NUM_EXAMPLES:
            config[protocol.WEIGHTED_BY] = self.weighted_by_key
        config[protocol.WEIGHT_SCALE] = self.weight_scale
        config[protocol.VALUE_BOUND] = self.value_bound
        self._grid = grid
        presampled = self._presampled.pop(server_round, None)
        sent = self.encrypted_sum.for_clients(arrays)  # the download copy of a sum
        if presampled is None:
            messages = list(super().configure_train(server_round, sent, config, grid))
        else:  # drawn as FedAvg draws, when the previous round ended (secure aggregation)
            config[protocol.SERVER_ROUND] = server_round
            record = RecordDict({self.arrayrecord_key: sent, self.configrecord_key: config})
            messages = list(self._construct_messages(record, presampled, MessageType.TRAIN))
        kept = set(
            self.last_good.leave_out(
                server_round,
                [m.metadata.dst_node_id for m in messages],
                lambda nodes: nodes >= max(1, self.min_train_nodes),
            )
        )
        messages = [m for m in messages if m.metadata.dst_node_id in kept]
        if self.secure_aggregation is None or not messages:
            return messages
        return self.secure_aggregation.masked_messages(
            server_round, messages, grid, self.node_wait_timeout
        )

    def _sample_ahead(self, server_round: int) -> list[int] | None:
        """Draw round ``server_round``'s sample now, as FedAvg's ``configure_train`` would.

        Secure aggregation shares the next round's keys in this round's unmask exchange.
        None when too few nodes are connected now (the round then samples as usual).
        """
        nodes = list(self._grid.get_node_ids())
        size = max(int(len(nodes) * self.fraction_train), self.min_train_nodes)
        if self.fraction_train == 0.0 or len(nodes) < max(self.min_available_nodes, size):
            return None
        sampled, _ = sample_nodes(self._grid, self.min_available_nodes, size)
        self._presampled = {server_round: sampled}
        return sampled

    def _weight_cap(self, replies: list[Message]) -> float | None:
        """The largest example count a reply of this round may claim (None: no cap).

        The median is taken over the replies that pass every check but the cap (their
        header, key, layout and weight): a reply that is rejected anyway (plaintext, another
        key) cannot lift it.
        """
        if self.max_weight_ratio is None:
            return None
        counts = []
        for msg in replies:
            if msg.has_error():
                continue
            try:
                self._check_weight(msg, self.encrypted_sum.check(msg))
                counts.append(
                    example_count(the_metrics(msg), self.weighted_by_key, self.max_examples)
                )
            except Exception:  # noqa: BLE001 - rejected with its reason when it is added
                continue
        if not counts:
            return None
        return self.max_weight_ratio * sorted(counts)[(len(counts) - 1) // 2]

    def _check_weight(self, msg: Message, update: EncryptedModel, cap: float | None = None) -> None:
        """The server derives the weight from the example count; the header must agree."""
        key = self.weighted_by_key
        count = example_count(the_metrics(msg), key, self.max_examples)
        if cap is not None and count > cap:
            raise ReplyError(
                f"{key} = {count} is more than max_weight_ratio = {self.max_weight_ratio:g} "
                f"times the round's median ({cap:.6g} at most): one client cannot own the "
                f"model (raise max_weight_ratio if such sizes are honest)"
            )
        expected = float(count) / self.weight_scale
        if not math.isclose(update.weight, expected, rel_tol=1e-9):
            raise CiphertextError(
                f"its header weight {update.weight:.6g} disagrees with {key} = {count:.0f} "
                f"(expected {expected:.6g})"
            )
        if not math.isclose(update.max_abs, expected * self.value_bound, rel_tol=1e-9):
            raise CiphertextError(
                f"its header declares the bound {update.max_abs:.6g}, not its weight times "
                f"the public bound {self.value_bound:g} ({expected * self.value_bound:.6g})"
            )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Add the valid encrypted updates; return the encrypted weighted sum."""
        replies = list(replies)
        if self.secure_aggregation is not None:
            self.secure_aggregation.note_refusals(server_round, replies)
        verdict = self.last_good.judge(server_round, replies)
        if verdict is Verdict.REFUSED:
            return self.last_good.model, None
        if verdict is Verdict.DISPUTED:
            return None, None
        cap = self._weight_cap(replies)
        accepted, total = self.encrypted_sum.add(
            server_round, replies, check_reply=lambda m, u: self._check_weight(m, u, cap)
        )
        if cap is not None and accepted and (tighter := self._weight_cap(accepted)) < cap:
            # Some replies passed the header checks and failed to load (garbage under the
            # server's fingerprint): the cap over the uploads that really count is lower.
            accepted, total = self.encrypted_sum.add(
                server_round, accepted, check_reply=lambda m, u: self._check_weight(m, u, tighter)
            )
        if len(accepted) < max(1, self.min_train_nodes):
            log(
                WARNING,
                "HEFedAvg round %d: %d valid replies, fewer than min_train_nodes=%d; "
                "round skipped, global model kept",
                server_round,
                len(accepted),
                self.min_train_nodes,
            )
            return None, None
        if self.secure_aggregation is not None:
            total = self.secure_aggregation.unmask_replies(
                server_round, accepted, total, self._sample_ahead, self.last_round
            )
            if total is None:
                return None, None
        self.last_good.produced(m.metadata.src_node_id for m in accepted)
        metrics = clients_metrics(
            self.train_metrics_aggr_fn, accepted, self.weighted_by_key, "HEFedAvg", server_round
        )
        return total.to_record(), MetricRecord(metrics)
