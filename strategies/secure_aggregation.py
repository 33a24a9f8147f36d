"""Secure aggregation for the HE strategies: the protocol's stages over a Flower grid.

With ``secure_aggregation`` on, ``HEFedAvg`` and ``HEDPFedAvg`` run SecAgg (Bonawitz et
al., CCS 2017) on the complete graph of each round's sample, with masks in the CKKS
plaintext ring (``docs/design_secure_aggregation.md``, :mod:`lepton_flwr.secagg`):

1. before training, nodes whose public keys for the round the server lacks advertise
   keys for the next rounds (once per ``ADVERTISED_ROUNDS`` rounds), and every sampled
   node shares its self-mask seed and round mask key among the others (share-keys);
2. each training message carries the encrypted shares addressed to its node, which
   masks its upload: one upload, or any sum short of all the round's survivors,
   decrypts under the shared key to values uniform in the plaintext ring;
3. after the uploads are added, the survivors send the shares that remove the
   survivors' self-masks and the dropped nodes' pairwise masks (unmask), and the server
   subtracts them with its public context: the sum is the one without masks.

A round whose sum cannot be unmasked (fewer than t survivors or shares, a share that
fails its check) releases nothing. Every stage exchange is bounded by the run's
``timeout``; a node that does not answer, or answers malformed fields, counts as dropped
(one log line naming node and reason).
"""

from __future__ import annotations

import dataclasses
import time
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from lepton_flwr import protocol
from lepton_flwr.he.codec import CkksAdder
from lepton_flwr.he.records import EncryptedModel
from lepton_flwr.secagg.params import (
    SecAggParams,
    SecAggParamsError,
    colluders,
    tolerated_dropouts,
)
from lepton_flwr.secagg.server import (
    PublicKeyBook,
    RoundNotUnmaskedError,
    SecAggReplyError,
    SecAggServerRound,
)
from lepton_flwr.secagg.wire import REPLY_KEY, as_config, fields

ADVERTISED_ROUNDS = 64


def with_config(msg: Message, extra: dict) -> Message:
    """A copy of a training message whose one ConfigRecord also holds ``extra``."""
    content = RecordDict(dict(msg.content))
    key = next(k for k, v in content.items() if isinstance(v, ConfigRecord))
    content[key] = ConfigRecord({**content[key], **extra})
    return Message(content, dst_node_id=msg.metadata.dst_node_id, message_type=MessageType.TRAIN)


class SecureAggregation:
    """One HE strategy's side of the protocol, round after round.

    Parameters
    ----------
    params : SecAggParams
        γ (colluding fraction), δ (dropout fraction), and the fewest neighbours.
    adder : CkksAdder
        The strategy's public-context adder (removes the masks from the sum).
    name : str
        The strategy's name, for log lines.
    """

    def __init__(self, params: SecAggParams, adder: CkksAdder, name: str) -> None:
        self.params, self.adder, self.name = params, adder, name
        self.book = PublicKeyBook()
        self._round: SecAggServerRound | None = None
        self._grid: Grid | None = None
        self._timeout: float | None = None
        self.seconds: dict[int, float] = {}  # server time in the stages, per round
        self._described = False

    def describe(self, expected_n: int) -> None:
        """Log the parameters and what they guarantee for rounds of ``expected_n`` clients."""
        try:
            t = self.params.validate(expected_n)
        except SecAggParamsError as err:
            log(
                WARNING,
                "%s: secure aggregation at %d clients a round: %s",
                self.name,
                expected_n,
                err,
            )
            return
        log(
            INFO,
            "%s: secure aggregation (SecAgg, complete graph): a round of %d clients needs "
            "t = %d shares per secret, tolerates %d dropped clients and the server with up to %d "
            "colluding clients (colluding_fraction=%g, dropout_fraction=%g); a server that "
            "substitutes public keys is not covered (no signed keys yet)",
            self.name,
            expected_n,
            t,
            tolerated_dropouts(expected_n, self.params),
            colluders(expected_n, self.params),
            self.params.colluding_fraction,
            self.params.dropout_fraction,
        )

    def _exchange(self, stage: str, requests: dict[int, dict], server_round: int) -> dict:
        """Send one stage's requests; node -> the reply's fields, for the well-formed ones."""
        messages = [
            Message(
                RecordDict(
                    {
                        "config": ConfigRecord(
                            {
                                protocol.SECAGG_STAGE: stage,
                                protocol.SERVER_ROUND: server_round,
                                **as_config(request),
                            }
                        )
                    }
                ),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
            )
            for node, request in requests.items()
        ]
        answers, heard = {}, set()
        for reply in self._grid.send_and_receive(messages, timeout=self._timeout):
            node = reply.metadata.src_node_id
            heard.add(node)
            if reply.has_error():
                self._dropped(server_round, node, f"{stage}: {reply.error.reason}")
                continue
            record = reply.content.config_records.get(REPLY_KEY)
            if record is None or record.get(protocol.SECAGG_STAGE) != stage:
                self._dropped(server_round, node, f"{stage}: the reply is not a {stage} answer")
                continue
            try:
                answers[node] = fields(record)
            except ValueError as err:
                self._dropped(server_round, node, f"{stage}: {err}")
        for node in sorted(set(requests) - heard):
            self._dropped(server_round, node, f"{stage}: no reply")
        return answers

    def _dropped(self, server_round: int, node: int, reason: str) -> None:
        log(
            WARNING,
            "%s round %d: secure aggregation: node %d dropped: %s",
            self.name,
            server_round,
            node,
            str(reason)[:300],
        )

    def prepare(
        self, server_round: int, nodes: list[int], grid: Grid, timeout: float | None
    ) -> dict[int, dict] | None:
        """Advertise and share keys; node -> config entries for its training message.

        Returns None when the round cannot run securely (too few nodes for the
        parameters, or too few shared keys): then nothing is trained.
        """
        started = time.perf_counter()
        self._grid, self._timeout, self._round = grid, timeout, None
        if not self._described:
            self.describe(len(nodes))
            self._described = True
        missing = self.book.missing(nodes, server_round)
        if missing:
            request = PublicKeyBook.advertise_request(server_round, ADVERTISED_ROUNDS)
            answers = self._exchange("advertise", {n: request for n in missing}, server_round)
            for node, answer in answers.items():
                try:
                    self.book.record_advertised(node, request, answer)
                except SecAggReplyError as err:
                    self._dropped(server_round, node, f"advertise: {err}")
        keys = self.book.round_keys(nodes, server_round)
        try:
            secagg_round = SecAggServerRound(server_round, keys, self.params)
        except SecAggParamsError as err:
            log(
                WARNING,
                "%s round %d: secure aggregation cannot run with %d of %d sampled nodes: %s; "
                "nothing is trained this round",
                self.name,
                server_round,
                len(keys),
                len(nodes),
                err,
            )
            return None
        answers = self._exchange("share-keys", secagg_round.share_keys_requests(), server_round)
        for node, reason in secagg_round.receive_share_keys(answers).items():
            if node in answers:
                self._dropped(server_round, node, reason)
        if len(secagg_round.shared_keys) < secagg_round.threshold + 1:
            log(
                WARNING,
                "%s round %d: secure aggregation: %d nodes shared keys, too few for t = %d; "
                "nothing is trained this round",
                self.name,
                server_round,
                len(secagg_round.shared_keys),
                secagg_round.threshold,
            )
            return None
        self._round = secagg_round
        self.seconds[server_round] = time.perf_counter() - started
        return {
            node: {protocol.SECAGG_MASKED: True, **as_config(request)}
            for node, request in secagg_round.masked_input_requests().items()
        }

    def masked_messages(
        self, server_round: int, messages: list[Message], grid: Grid, timeout: float | None
    ) -> list[Message]:
        """The round's training messages, each asking its node for a masked upload.

        Nodes that did not share keys get no training message; when the round cannot
        run securely, none does.
        """
        extras = self.prepare(
            server_round, [m.metadata.dst_node_id for m in messages], grid, timeout
        )
        if extras is None:
            return []
        return [
            with_config(m, extras[m.metadata.dst_node_id])
            for m in messages
            if m.metadata.dst_node_id in extras
        ]

    def unmask(
        self, server_round: int, survivors: list[int], total: EncryptedModel
    ) -> EncryptedModel | None:
        """The sum of the survivors' uploads without masks, or None (nothing released)."""
        started = time.perf_counter()
        secagg_round, self._round = self._round, None
        if secagg_round is None or secagg_round.server_round != server_round:
            log(
                WARNING,
                "%s round %d: no secure-aggregation round to unmask",
                self.name,
                server_round,
            )
            return None
        try:
            secagg_round.set_survivors(survivors)
            answers = self._exchange("unmask", secagg_round.unmask_requests(), server_round)
            for node, reason in secagg_round.receive_unmask(answers).items():
                self._dropped(server_round, node, reason)
            correction = secagg_round.correction(self.adder.primes, self.adder.degree)
        except RoundNotUnmaskedError as err:
            log(
                WARNING,
                "%s round %d: the sum cannot be unmasked (%s): nothing is released",
                self.name,
                server_round,
                err,
            )
            return None
        chunks = self.adder.remove_mask(total.chunks, correction)
        self.seconds[server_round] = self.seconds.get(server_round, 0.0) + (
            time.perf_counter() - started
        )
        self.book.forget_before(server_round + 1)
        return dataclasses.replace(total, chunks=chunks)


def secure_aggregation_for(
    setting: bool | SecAggParams, adder: CkksAdder, name: str
) -> SecureAggregation | None:
    """A strategy's ``secure_aggregation`` argument as the protocol's driver (or None)."""
    if setting is False or setting is None:
        return None
    if setting is True:
        setting = SecAggParams()
    if not isinstance(setting, SecAggParams):
        raise TypeError(
            f"{name}: secure_aggregation must be True, False or a SecAggParams, not {setting!r}"
        )
    return SecureAggregation(setting, adder, name)
