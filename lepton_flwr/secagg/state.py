"""What a node remembers of secure aggregation across messages: one object, as bytes.

The lead keeps it in Flower's ``context.state`` (per node and run, in simulation and in
deployment): the node's master secret, and per recent round what it needs for the next
stage and which stages it answered. Each stage is answered at most once per round,
ever: records of old rounds are pruned to the last ``KEEP_ROUNDS``, and pruning a round
closes it and every earlier one (``closed_through``), so a server cannot reopen a
stage by waiting. A record holds only what its next stage needs: the self-mask seed
until the masked input, the neighbours' public keys until then, the shares held until
the unmask.

A server that sends a round far ahead closes every earlier round when that round is
pruned: it can stop the node from taking part, which it can anyway, but never make it
answer twice.

Parsing checks every field; a corrupt or hostile state raises
:class:`SecAggStateError` rather than restart the marks.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field

from lepton_flwr.numbers import is_int
from lepton_flwr.secagg.keys import (
    MAX_NODE_ID,
    MAX_ROUND,
    PUBLIC_KEY_BYTES,
    SECRET_BYTES,
)
from lepton_flwr.secagg.shamir import SHARE_BYTES, decode_share

KEEP_ROUNDS = 4
MAX_STATE_BYTES = 4 << 20
FORMAT = "lepton-flwr secagg client state"
VERSION = 2  # 2: shares over GF(2^521 − 1) (lepton_flwr.secagg.shamir)

SHARE_KEYS = "share-keys"
MASKED_INPUT = "masked-input"
UNMASK = "unmask"
STOPPED = "stopped"
_STAGES = (SHARE_KEYS, MASKED_INPUT, UNMASK, STOPPED)


class SecAggStateError(ValueError):
    """The node's secure-aggregation state cannot be read."""


@dataclass
class RoundRecord:
    """One round as the node saw it.

    Attributes
    ----------
    threshold
        t of the round's Shamir sharing.
    participants
        n: the neighbours the node shared with, plus itself.
    stages
        The stages answered (``SHARE_KEYS``, ``MASKED_INPUT``, ``UNMASK``), and
        ``STOPPED`` once the node gave the round up.
    neighbours
        Peer id -> (encryption public key, mask public key), until the masked input:
        with the round, t and the node's own keys, its view of the round, whose digest
        the masked input recomputes to check each token against.
    self_seed
        The seed b of the node's self-mask, until the masked input.
    senders
        The peers the node masked with (set at the masked input).
    held
        Sender id -> (its share of b, its share of the mask key), until the unmask.
    """

    threshold: int
    participants: int
    stages: set[str] = field(default_factory=set)
    neighbours: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    self_seed: bytes | None = None
    senders: list[int] = field(default_factory=list)
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)


@dataclass
class ClientState:
    """A node's master secret and its recent rounds.

    Attributes
    ----------
    master
        32 random bytes, the root of every per-round key of the node in this run.
    closed_through
        Every round up to this one is closed to every stage (−1: none).
    rounds
        Round -> :class:`RoundRecord`, the last ``KEEP_ROUNDS`` rounds at most.
    """

    master: bytes
    closed_through: int = -1
    rounds: dict[int, RoundRecord] = field(default_factory=dict)

    @classmethod
    def new(cls) -> ClientState:
        """A fresh state with a master secret from ``os.urandom``."""
        return cls(master=os.urandom(SECRET_BYTES))

    def is_closed(self, server_round: int) -> bool:
        """Whether ``server_round`` can no longer be answered at any stage."""
        return server_round <= self.closed_through

    def open_round(self, server_round: int, threshold: int, participants: int) -> RoundRecord:
        """Start the record of a new round, pruning the oldest past ``KEEP_ROUNDS``."""
        record = RoundRecord(threshold=threshold, participants=participants)
        self.rounds[server_round] = record
        while len(self.rounds) > KEEP_ROUNDS:
            oldest = min(self.rounds)
            del self.rounds[oldest]
            self.closed_through = max(self.closed_through, oldest)
        return record

    def to_bytes(self) -> bytes:
        """The state as UTF-8 JSON (bytes base64-encoded)."""
        rounds = {}
        for number, record in self.rounds.items():
            rounds[str(number)] = {
                "threshold": record.threshold,
                "participants": record.participants,
                "stages": sorted(record.stages),
                "neighbours": {
                    str(peer): [_b64(enc), _b64(mask)]
                    for peer, (enc, mask) in record.neighbours.items()
                },
                "self_seed": None if record.self_seed is None else _b64(record.self_seed),
                "senders": record.senders,
                "held": {
                    str(peer): [_b64(b_share), _b64(key_share)]
                    for peer, (b_share, key_share) in record.held.items()
                },
            }
        document = {
            "format": FORMAT,
            "version": VERSION,
            "master": _b64(self.master),
            "closed_through": self.closed_through,
            "rounds": rounds,
        }
        return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientState:
        """Parse :meth:`to_bytes`'s output, checking every field.

        Raises
        ------
        SecAggStateError
            If anything is missing, of the wrong type or size, or out of range.
        """
        if not isinstance(data, bytes | bytearray) or len(data) > MAX_STATE_BYTES:
            raise SecAggStateError(f"the state must be bytes of at most {MAX_STATE_BYTES}")
        try:
            document = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise SecAggStateError(f"the state is not JSON: {error}") from None
        _expect_keys(document, {"format", "version", "master", "closed_through", "rounds"}, "")
        if document["format"] != FORMAT or document["version"] != VERSION:
            raise SecAggStateError(f"the state is not a version-{VERSION} secagg client state")
        master = _unb64(document["master"], SECRET_BYTES, "master")
        closed = document["closed_through"]
        if not is_int(closed) or not -1 <= closed <= MAX_ROUND:
            raise SecAggStateError("closed_through is not a round (or -1)")
        raw_rounds = document["rounds"]
        if not isinstance(raw_rounds, dict) or len(raw_rounds) > KEEP_ROUNDS:
            raise SecAggStateError(f"rounds must be an object of at most {KEEP_ROUNDS} rounds")
        rounds = {}
        for key, raw in raw_rounds.items():
            number = _int_key(key, MAX_ROUND, "rounds")
            if number <= closed:
                raise SecAggStateError(f"round {number} is kept but closed")
            rounds[number] = _parse_record(raw, f"rounds.{number}")
        return cls(master=master, closed_through=closed, rounds=rounds)


def _parse_record(raw: object, where: str) -> RoundRecord:
    _expect_keys(
        raw,
        {"threshold", "participants", "stages", "neighbours", "self_seed", "senders", "held"},
        where,
    )
    threshold, participants = raw["threshold"], raw["participants"]
    if not is_int(participants) or not 2 <= participants <= MAX_NODE_ID:
        raise SecAggStateError(f"{where}.participants is not an integer of at least 2")
    if not is_int(threshold) or not 1 <= threshold < participants:
        raise SecAggStateError(f"{where}.threshold is not in [1, participants)")
    stages = raw["stages"]
    if not isinstance(stages, list) or not all(stage in _STAGES for stage in stages):
        raise SecAggStateError(f"{where}.stages must list stages among {_STAGES}")
    neighbours = {
        _int_key(peer, MAX_NODE_ID, f"{where}.neighbours"): tuple(
            _unb64(key, PUBLIC_KEY_BYTES, f"{where}.neighbours.{peer}")
            for key in _pair(keys, f"{where}.neighbours.{peer}")
        )
        for peer, keys in _object(raw["neighbours"], f"{where}.neighbours").items()
    }
    seed = raw["self_seed"]
    self_seed = None if seed is None else _unb64(seed, SECRET_BYTES, f"{where}.self_seed")
    senders = raw["senders"]
    if (
        not isinstance(senders, list)
        or not all(is_int(peer) and 0 <= peer <= MAX_NODE_ID for peer in senders)
        or len(set(senders)) != len(senders)
    ):
        raise SecAggStateError(f"{where}.senders must list distinct node ids")
    held = {
        _int_key(peer, MAX_NODE_ID, f"{where}.held"): tuple(
            _share(share, f"{where}.held.{peer}") for share in _pair(shares, f"{where}.held.{peer}")
        )
        for peer, shares in _object(raw["held"], f"{where}.held").items()
    }
    return RoundRecord(
        threshold=threshold,
        participants=participants,
        stages=set(stages),
        neighbours=neighbours,
        self_seed=self_seed,
        senders=senders,
        held=held,
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, size: int, where: str) -> bytes:
    if not isinstance(value, str):
        raise SecAggStateError(f"{where} is not a base64 string")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise SecAggStateError(f"{where} is not base64") from None
    if len(data) != size:
        raise SecAggStateError(f"{where} is {len(data)} bytes, not {size}")
    return data


def _share(value: object, where: str) -> bytes:
    share = _unb64(value, SHARE_BYTES, where)
    try:
        decode_share(share)
    except ValueError as error:
        raise SecAggStateError(f"{where}: {error}") from None
    return share


def _expect_keys(value: object, keys: set[str], where: str) -> None:
    if not isinstance(value, dict) or set(value) != keys:
        raise SecAggStateError(f"{where or 'the state'} must be an object with keys {sorted(keys)}")


def _object(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise SecAggStateError(f"{where} is not an object")
    return value


def _pair(value: object, where: str) -> list:
    if not isinstance(value, list) or len(value) != 2:
        raise SecAggStateError(f"{where} is not a pair")
    return value


def _int_key(key: str, maximum: int, where: str) -> int:
    if not (key.isascii() and key.isdigit()) or len(key) > 20 or (len(key) > 1 and key[0] == "0"):
        raise SecAggStateError(f"{where}: {key!r} is not a decimal number")
    number = int(key)
    if number > maximum:
        raise SecAggStateError(f"{where}: {number} is out of range")
    return number
