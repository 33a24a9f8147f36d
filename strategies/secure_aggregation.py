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
fails its check) releases nothing. A node whose share tokens more than c of a round's
participants could not open (each names the sender in its refusal) is left out of
secure aggregation for the rest of the run: one node sending bad tokens voids one round,
not every round it is sampled in. Every stage exchange is bounded by the run's
``timeout``; a node that does not answer, or answers malformed fields, counts as dropped
(one log line naming node and reason).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from lepton_flwr import protocol
from lepton_flwr.he.codec import CkksAdder
from lepton_flwr.he.records import EncryptedModel
from lepton_flwr.mods.secagg_stages import MASKED_INPUT_REFUSAL
from lepton_flwr.secagg.client import TOKEN_REFUSAL
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
from lepton_flwr.secagg.wire import MASKED_INPUT, REFUSED, REPLY_KEY, as_config, fields

# A node's refusal of a peer's keys for want of a trusted signature (share-keys).
_SIGNATURE_REFUSED = re.compile(r"^signatures: node (\d+): ")
# A node's refusal of a peer's token, as its training error reply carries it.
_TOKEN_REFUSED = re.compile(
    re.escape(MASKED_INPUT_REFUSAL) + re.escape(TOKEN_REFUSAL).replace(r"\{sender\}", r"(\d+)")
)

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
        self._current: SecAggServerRound | None = None  # the round being trained
        self._next: SecAggServerRound | None = None  # the next one, keys already shared
        self._grid: Grid | None = None
        self._timeout: float | None = None
        self._refusals: dict[str, dict[int, str]] = {}  # the last exchange's, stage -> node
        self.seconds: dict[int, float] = {}  # server time in the stages, per round
        self._described = False
        self.blocked: dict[int, int] = {}  # node -> the round of its second strike
        self._struck: dict[int, int] = {}  # node -> the round of its last strike

    def note_refusals(self, server_round: int, replies: list[Message]) -> None:
        """Accuse the senders of tokens that the round's training replies refused.

        A training reply that is an error naming a token's sender (the node stopped the
        round before training) accuses that sender (:meth:`_accuse`).
        """
        current = self._current
        if current is None or current.server_round != server_round:
            return
        reasons = {
            reply.metadata.src_node_id: reply.error.reason or ""
            for reply in replies
            if reply.has_error()
        }
        self._accuse(current, reasons, _TOKEN_REFUSED, "could not open its share tokens")

    def _accuse(
        self, secagg_round: SecAggServerRound, reasons: dict[int, str], pattern, what: str
    ) -> None:
        """Two strikes for a node more than c of a round's participants accuse.

        More than c = ⌈γ n⌉ accusers in one round include an honest one, so colluding
        clients cannot strike an honest node (a malicious server can leave out anyone
        anyway). First strike: the server forgets the node's keys, so it is asked to
        advertise again (an honest node that restarted without ``state-dir`` holds new
        keys); second strike, in a later round: the node is left out of secure
        aggregation for the rest of the run. A node that sends bad tokens, or keys its
        peers' trusted lists do not sign, voids two rounds, not every round.
        """
        participants = set(secagg_round.participants)
        accusers: dict[int, set[int]] = {}
        for accuser, reason in reasons.items():
            found = pattern.search(reason)
            if found and accuser in participants:
                accused = int(found.group(1))
                if accused in participants and accused != accuser:
                    accusers.setdefault(accused, set()).add(accuser)
        tolerated = colluders(len(participants), self.params)
        for node, by in sorted(accusers.items()):
            if len(by) <= tolerated or node in self.blocked:
                continue
            if self._struck.get(node) == secagg_round.server_round:
                continue  # one strike a round
            second = node in self._struck
            self._struck[node] = secagg_round.server_round
            if second:
                self.blocked[node] = secagg_round.server_round
            else:
                self.book.forget(node)
            log(
                WARNING,
                "%s round %d: secure aggregation: %d peers of node %d (more than the %d "
                "colluders tolerated) %s: %s",
                self.name,
                secagg_round.server_round,
                len(by),
                node,
                tolerated,
                what,
                f"node {node} is left out of secure aggregation for the rest of the run"
                if second
                else f"its keys are forgotten and it will be asked to advertise again (a second "
                f"time leaves node {node} out for the rest of the run)",
            )

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
            "substitutes public keys is stopped by the nodes that check their peers' signatures "
            "(node config secagg-trusted-keys), and only by them",
            self.name,
            expected_n,
            t,
            tolerated_dropouts(expected_n, self.params),
            colluders(expected_n, self.params),
            self.params.colluding_fraction,
            self.params.dropout_fraction,
        )

    def _exchange(self, by_stage: dict[str, dict[int, dict]], server_round: int) -> dict:
        """One exchange carrying each node the stages it has requests for.

        Returns stage -> node -> the answer's fields, for the answers that came back
        well-formed and not refused (each other one is logged, naming node and stage).
        """
        stages_for: dict[int, list[str]] = {}
        for stage, requests in by_stage.items():
            for node in requests:
                stages_for.setdefault(node, []).append(stage)
        messages = []
        for node, stages in stages_for.items():
            config = {
                protocol.SECAGG_STAGE: ",".join(stages),
                protocol.SERVER_ROUND: server_round,
                **as_config({stage: by_stage[stage][node] for stage in stages}),
            }
            content = RecordDict({"config": ConfigRecord(config)})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        answers: dict[str, dict[int, dict]] = {stage: {} for stage in by_stage}
        self._refusals: dict[str, dict[int, str]] = {}  # this exchange's, stage -> node
        heard = set()
        replies = list(self._grid.send_and_receive(messages, timeout=self._timeout))
        # Flower's SuperLink answers for a node it lost with an error reply of its own:
        # the message it replies to says which node that was.
        sent_to = {
            m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id
        }
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                node = sent_to.get(reply.metadata.reply_to_message_id, node)
            if node not in stages_for or node in heard:
                continue  # not asked, or a second reply: ignored
            heard.add(node)
            stages = stages_for[node]
            if reply.has_error():
                self._dropped(server_round, node, ",".join(stages), reply.error.reason)
                continue
            record = reply.content.config_records.get(REPLY_KEY)
            if record is None or record.get(protocol.SECAGG_STAGE) != ",".join(stages):
                self._dropped(server_round, node, ",".join(stages), "not an answer to them")
                continue
            for stage in stages:
                try:
                    answer = fields(record, stage)
                except ValueError as err:
                    self._dropped(server_round, node, stage, err)
                    continue
                if REFUSED in answer:
                    self._dropped(server_round, node, stage, f"refused: {answer[REFUSED]}")
                    self._refusals.setdefault(stage, {})[node] = str(answer[REFUSED])
                    continue
                answers[stage][node] = answer
        for node in sorted(set(stages_for) - heard):
            self._dropped(server_round, node, ",".join(stages_for[node]), "no reply")
        return answers

    def _dropped(self, server_round: int, node: int, stage: str, reason: object) -> None:
        log(
            WARNING,
            "%s round %d: secure aggregation: node %d dropped at %s: %s",
            self.name,
            server_round,
            node,
            stage,
            str(reason)[:300],
        )

    def _advertised(self, server_round: int, nodes: list[int]) -> None:
        """Make sure the book has every node's keys for the round.

        When some are missing, every connected node without them is asked at once (for
        ``ADVERTISED_ROUNDS`` rounds): one exchange covers the population for many rounds.
        """
        if not self.book.missing(nodes, server_round):
            return
        everyone = set(nodes) | set(self._grid.get_node_ids())
        missing = self.book.missing(everyone, server_round)
        request = PublicKeyBook.advertise_request(server_round, ADVERTISED_ROUNDS)
        answers = self._exchange({"advertise": {n: request for n in missing}}, server_round)
        recorded = signed = 0
        for node, answer in answers["advertise"].items():
            try:
                self.book.record_advertised(node, request, answer)
            except SecAggReplyError as err:
                self._dropped(server_round, node, "advertise", err)
                continue
            recorded += 1
            signed += bool(self.book.signatures([node], server_round)[node][0])
        log(
            INFO,
            "%s round %d: secure aggregation: %d nodes advertised keys for %d rounds, %d of "
            "them signed",
            self.name,
            server_round,
            recorded,
            ADVERTISED_ROUNDS,
            signed,
        )

    def _new_round(self, server_round: int, nodes: list[int]) -> SecAggServerRound | None:
        """The round's bookkeeping for ``nodes`` (advertising first if keys are missing)."""
        if not self._described:
            self.describe(len(nodes))
            self._described = True
        nodes = [node for node in nodes if node not in self.blocked]
        self._advertised(server_round, nodes)
        keys = self.book.round_keys(nodes, server_round)
        try:
            return SecAggServerRound(
                server_round, keys, self.params, self.book.signatures(keys, server_round)
            )
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

    def _take_share_keys(self, secagg_round: SecAggServerRound, answers: dict) -> bool:
        """Check the share-keys answers; whether enough nodes shared keys to go on."""
        refused = self._refusals.get("share-keys", {})
        self._accuse(secagg_round, refused, _SIGNATURE_REFUSED, "refused its unsigned keys")
        for node, reason in secagg_round.receive_share_keys(answers).items():
            if node in answers:
                self._dropped(secagg_round.server_round, node, "share-keys", reason)
        if len(secagg_round.shared_keys) > secagg_round.threshold:
            return True
        log(
            WARNING,
            "%s round %d: secure aggregation: %d nodes shared keys, too few for t = %d; "
            "nothing is trained this round",
            self.name,
            secagg_round.server_round,
            len(secagg_round.shared_keys),
            secagg_round.threshold,
        )
        return False

    def masked_messages(
        self, server_round: int, messages: list[Message], grid: Grid, timeout: float | None
    ) -> list[Message]:
        """The round's training messages, each asking its node for a masked upload.

        The round's keys were shared in the previous round's unmask exchange when the
        strategy sampled this round then (one extra exchange per round); otherwise a
        share-keys exchange runs now. Nodes that did not share keys get no training
        message; when the round cannot run securely, none does.
        """
        started = time.perf_counter()
        self._grid, self._timeout = grid, timeout
        nodes = [m.metadata.dst_node_id for m in messages]
        secagg_round, self._next = self._next, None
        if secagg_round is None or secagg_round.server_round != server_round:
            secagg_round = self._new_round(server_round, nodes)
            if secagg_round is None:
                return []
            answers = self._exchange(
                {"share-keys": secagg_round.share_keys_requests()}, server_round
            )
            if not self._take_share_keys(secagg_round, answers["share-keys"]):
                return []
        self._current = secagg_round
        requests = secagg_round.masked_input_requests()
        self.seconds[server_round] = self.seconds.get(server_round, 0.0) + (
            time.perf_counter() - started
        )
        return [
            with_config(
                m,
                {
                    protocol.SECAGG_MASKED: True,
                    **as_config({MASKED_INPUT: requests[m.metadata.dst_node_id]}),
                },
            )
            for m in messages
            if m.metadata.dst_node_id in requests
        ]

    def unmask_replies(
        self,
        server_round: int,
        accepted: list[Message],
        total: EncryptedModel,
        sample_ahead: Callable[[int], list[int] | None],
        last_round: int | None,
    ) -> EncryptedModel | None:
        """:meth:`unmask` for the senders of ``accepted`` (the replies in the sum).

        Before the run's last round, ``sample_ahead(server_round + 1)`` draws the next
        round's sample, whose keys are then shared in this unmask exchange.
        """
        survivors = [m.metadata.src_node_id for m in accepted]
        if server_round == last_round:
            return self.unmask(server_round, survivors, total)
        return self.unmask(server_round, survivors, total, lambda: sample_ahead(server_round + 1))

    def unmask(
        self,
        server_round: int,
        survivors: list[int],
        total: EncryptedModel,
        upcoming: Callable[[], list[int] | None] | None = None,
    ) -> EncryptedModel | None:
        """The sum of the survivors' uploads without masks, or None (nothing released).

        ``upcoming`` returns the next round's sample (or None): its share-keys then
        travel in this unmask exchange, so that a round costs one extra exchange.
        """
        started = time.perf_counter()
        secagg_round, self._current = self._current, None
        if secagg_round is None or secagg_round.server_round != server_round:
            log(WARNING, "%s round %d: no secure round to unmask", self.name, server_round)
            return None
        by_stage: dict[str, dict[int, dict]] = {}
        failure = None
        try:
            secagg_round.set_survivors(survivors)
            by_stage["unmask"] = secagg_round.unmask_requests()
            for node in secagg_round.dropped:
                self._dropped(server_round, node, "masked input", "its upload is not in the sum")
        except RoundNotUnmaskedError as err:
            failure = err
        next_round = None
        upcoming_nodes = upcoming() if upcoming is not None else None
        if upcoming_nodes:
            next_round = self._new_round(server_round + 1, upcoming_nodes)
            if next_round is not None:
                by_stage["share-keys"] = next_round.share_keys_requests()
        answers = self._exchange(by_stage, server_round) if by_stage else {}
        if next_round is not None and self._take_share_keys(
            next_round, answers.get("share-keys", {})
        ):
            self._next = next_round
        unmasked = None
        if failure is None:
            try:
                for node, reason in secagg_round.receive_unmask(answers["unmask"]).items():
                    self._dropped(server_round, node, "unmask", reason)
                correction = secagg_round.correction(self.adder.primes, self.adder.degree)
                chunks = self.adder.remove_mask(total.chunks, correction)
                unmasked = dataclasses.replace(total, chunks=chunks)
            except RoundNotUnmaskedError as err:
                failure = err
            for node in sorted(secagg_round.liars):
                log(
                    WARNING,
                    "%s round %d: secure aggregation: node %d sent unmask shares that disagree "
                    "with secrets that pass their checks (it lied, or a secret's owner dealt it "
                    "a wrong share); the secrets were rebuilt from other shares",
                    self.name,
                    server_round,
                    node,
                )
        if failure is not None:
            log(
                WARNING,
                "%s round %d: the sum cannot be unmasked (%s): nothing is released",
                self.name,
                server_round,
                failure,
            )
        else:
            log(
                INFO,
                "%s round %d: secure aggregation: the sum of %d uploads unmasked "
                "(%d nodes dropped after sharing keys)",
                self.name,
                server_round,
                len(secagg_round.survivors),
                len(secagg_round.dropped),
            )
        self.book.forget_before(server_round + 1)
        self.seconds[server_round] = self.seconds.get(server_round, 0.0) + (
            time.perf_counter() - started
        )
        return unmasked


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


def resume_settings_of(driver: SecureAggregation | None) -> dict:
    """The secure-aggregation settings a resumed run must keep (off, or its parameters)."""
    if driver is None:
        return {"secure_aggregation": False}
    return {
        "secure_aggregation": True,
        "secagg_colluding_fraction": driver.params.colluding_fraction,
        "secagg_dropout_fraction": driver.params.dropout_fraction,
        "secagg_min_neighbours": driver.params.min_neighbours,
    }
