"""A node's side of secure aggregation: answer each stage of a round once, or refuse.

SecAgg (Bonawitz et al., CCS 2017) on the complete graph of the round's participants,
with masks in the CKKS plaintext ring (``docs/design_secure_aggregation.md``). The
stages, as plain dicts (the lead carries them in Flower messages):

``advertise``
    ``{"first_round", "rounds"}`` -> ``{"first_round", "encryption_keys",
    "mask_keys"[, "signer", "signatures"]}``: the node's public keys for up to
    ``MAX_ADVERTISED_ROUNDS`` rounds, and, if it has a signing key, the key's
    fingerprint and each round's pair signed (:mod:`lepton_flwr.secagg.signatures`).
``share-keys``
    ``{"round", "threshold", "neighbours", "encryption_keys", "mask_keys", "signers",
    "signatures"}`` (``b""`` for an unsigned neighbour) -> ``{"round", "recipients",
    "tokens", "commitment"}``. A node with
    trusted keys first checks that each neighbour's keys are signed by a trusted key,
    for that neighbour, run and round, and that no key signs for two participants; a
    server that shows it keys of its own making is refused. The node draws a fresh self-mask
    seed b, Shamir-shares b and its round mask key t-of-|neighbours|, each on its own
    polynomial (:mod:`lepton_flwr.secagg.shamir`; neighbour v's share at v's place among
    the round's sorted participants, plus one; the node's own x is skipped, so it keeps
    no share), and encrypts both shares for each neighbour v in a Fernet token bound to
    (sender, v, round) and to the sender's view of the round: a digest of the round, t
    and the id and public keys of every participant it was shown, itself included
    (:func:`~lepton_flwr.secagg.keys.view_digest`); the commitment is SHA-256 of b.
``masked-input``
    ``{"round", "senders", "tokens", "dropped"}`` -> a :class:`MaskSum` (chunk ->
    ring element) to add to the upload. The senders must be the neighbours less the
    ``dropped`` (at most d of them); every token must open, name (sender, this node,
    round), carry this node's own view digest and hold two shares at the node's x, else
    the node stops the round (:class:`SecAggRefusal` naming the sender; the server
    counts it dropped; it never masks with part of its peers).
``unmask``
    ``{"round", "survivors", "dropped"}`` -> ``{"round", "self_mask_owners",
    "self_mask_shares", "mask_key_owners", "mask_key_shares"}``: the share of b_v for
    each survivor v but itself, the share of sk_v for each dropped v; S and D disjoint,
    the node in S, |S| ≥ t, |D| ≤ d, every id one it masked with.

Every stage is answered at most once per round, ever (:mod:`lepton_flwr.secagg.state`),
so a peer's two secrets never both leave a node in one round. Because a node takes a
token only from a sender that saw exactly its view, every peer it masks with, and every
holder of its shares that answers an unmask (it took the node's token), saw the same
participants, keys and t: a server that shows nodes different neighbour lists splits
them into views that refuse each other's tokens. A request is refused with
:class:`SecAggRefusal`, naming the field, before anything changes in the state; only a
token that fails one of the masked input's checks also closes the round. The adversary
the thresholds hold against, and what is not covered, are in
:mod:`lepton_flwr.secagg.params`.

The caller keeps :attr:`SecAggClient.state` (``state.to_bytes()``) before it sends any
reply: a reply sent from a state that is then lost could be asked for again.
"""

from __future__ import annotations

import os
import struct

from cryptography.fernet import InvalidToken
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt

from lepton_flwr.numbers import is_int
from lepton_flwr.secagg.keys import (
    ENCRYPTION,
    MASK,
    MAX_ROUND,
    SECRET_BYTES,
    VIEW_DIGEST_BYTES,
    check_node_id,
    check_round,
    commitment,
    load_public_key,
    pair_seed,
    private_bytes,
    round_private_key,
    round_public_keys,
    share_key,
    view_digest,
)
from lepton_flwr.secagg.masks import MaskSum, check_ring
from lepton_flwr.secagg.params import SecAggParams, SecAggParamsError, max_dropouts, threshold
from lepton_flwr.secagg.shamir import SHARE_BYTES, decode_share, holder_indices, split
from lepton_flwr.secagg.signatures import (
    KEY_ID_BYTES,
    MAX_SIGNATURE_BYTES,
    RoundKeySigner,
    SignatureError,
    TrustedKeys,
    round_keys_message,
)
from lepton_flwr.secagg.state import (
    MASKED_INPUT,
    SHARE_KEYS,
    STOPPED,
    UNMASK,
    ClientState,
    RoundRecord,
)

MAX_ADVERTISED_ROUNDS = 256
TOKEN_MAGIC = b"LFSA3"  # 3: the sender's view digest (2: shares over GF(2^521 − 1))
_TOKEN_HEADER = struct.Struct(f">QQQ{VIEW_DIGEST_BYTES}s")  # sender, receiver, round, view
TOKEN_PLAINTEXT_BYTES = len(TOKEN_MAGIC) + _TOKEN_HEADER.size + 2 * SHARE_BYTES
MAX_TOKEN_BYTES = 1024


TOKEN_REFUSAL = "tokens: the token from {sender} "  # each token refusal starts so


class SecAggRefusal(ValueError):  # noqa: N818 (a refusal, the name the mods use)
    """The node refuses a secure-aggregation request; the message names the field."""


def token_plaintext(
    sender: int, receiver: int, server_round: int, view: bytes, b_share: bytes, key_share: bytes
) -> bytes:
    """What one token carries: its binding, then both shares.

    The binding is (sender, receiver, round, the sender's view digest).
    """
    if not isinstance(view, bytes) or len(view) != VIEW_DIGEST_BYTES:
        raise ValueError(f"a view digest is {VIEW_DIGEST_BYTES} bytes")
    header = _TOKEN_HEADER.pack(sender, receiver, server_round, view)
    return TOKEN_MAGIC + header + b_share + key_share


def _fields(request: object, names: tuple[str, ...], stage: str) -> dict:
    if not isinstance(request, dict):
        raise SecAggRefusal(f"{stage}: the request is not a dict")
    if set(request) != set(names):
        raise SecAggRefusal(
            f"{stage}: the request must have exactly the fields {sorted(names)}, "
            f"not {sorted(map(str, request))}"
        )
    return request


def _ids(value: object, field: str) -> list[int]:
    if not isinstance(value, list | tuple):
        raise SecAggRefusal(f"{field}: a list of node ids is expected")
    try:
        ids = [check_node_id(item, field) for item in value]
    except ValueError as error:
        raise SecAggRefusal(str(error)) from None
    if len(set(ids)) != len(ids):
        raise SecAggRefusal(f"{field}: a node id is repeated")
    return ids


def _byte_strings(value: object, field: str, count: int, size: int | None = None) -> list[bytes]:
    if not isinstance(value, list | tuple) or len(value) != count:
        raise SecAggRefusal(f"{field}: a list of {count} byte strings is expected")
    for item in value:
        if not isinstance(item, bytes) or (size is not None and len(item) != size):
            raise SecAggRefusal(
                f"{field}: each item must be bytes" + (f" of length {size}" if size else "")
            )
    return list(value)


def _round(value: object) -> int:
    try:
        return check_round(value)
    except ValueError as error:
        raise SecAggRefusal(str(error)) from None


class SecAggClient:
    """One node's answers to the stages, over a state it keeps between messages.

    Parameters
    ----------
    node_id
        The node's id (Flower's node id, an integer in [0, 2^64)).
    state
        The node's :class:`ClientState` (``ClientState.new()`` the first time).
    params
        The node's own γ, δ and ``min_neighbours``: it refuses a threshold below the
        rule for its neighbour count under these, whatever the server asks.
    run_id
        Flower's run id: signatures bind it (:mod:`lepton_flwr.secagg.signatures`).
    signer
        The node's signing key: it signs each advertised round's keys. None: unsigned.
    trusted
        The keys whose signatures the node accepts: with them it refuses share-keys
        unless every neighbour's keys for the round are signed, for that neighbour's
        id, run and round, by a trusted key, no key signs for two of the round's
        participants (itself included). None: it takes the keys the server shows.
    """

    def __init__(
        self,
        node_id: int,
        state: ClientState,
        params: SecAggParams | None = None,
        *,
        run_id: int = 0,
        signer: RoundKeySigner | None = None,
        trusted: TrustedKeys | None = None,
    ) -> None:
        self.node_id = check_node_id(node_id, "node_id")
        if not isinstance(state, ClientState):
            raise TypeError("state must be a ClientState")
        self.state = state
        self.params = params if params is not None else SecAggParams()
        round_keys_message(run_id, self.node_id, 0, bytes(32), bytes(32))  # checks run_id
        self.run_id = run_id
        self.signer = signer
        self.trusted = trusted

    # -- advertise -------------------------------------------------------------------
    def advertise(self, request: dict) -> dict:
        """The node's public keys for ``rounds`` rounds from ``first_round``."""
        request = _fields(request, ("first_round", "rounds"), "advertise")
        first = _round(request["first_round"])
        count = request["rounds"]
        if not is_int(count) or not 1 <= count <= MAX_ADVERTISED_ROUNDS:
            raise SecAggRefusal(f"rounds: an integer in [1, {MAX_ADVERTISED_ROUNDS}] is expected")
        if first + count - 1 > MAX_ROUND:
            raise SecAggRefusal("rounds: the range passes the last round number")
        keys = [round_public_keys(self.state.master, first + i) for i in range(count)]
        reply = {
            "first_round": first,
            "encryption_keys": [enc for enc, _ in keys],
            "mask_keys": [mask for _, mask in keys],
        }
        if self.signer is not None:
            reply["signer"] = self.signer.key_id
            reply["signatures"] = [
                self.signer.sign(self.run_id, self.node_id, first + i, enc, mask)
                for i, (enc, mask) in enumerate(keys)
            ]
        return reply

    # -- share-keys ------------------------------------------------------------------
    def share_keys(self, request: dict) -> dict:
        """Share b and the round's mask key among the neighbours; see the module docstring.

        Raises
        ------
        SecAggRefusal
            If the round was opened before (or closed), or any field is malformed, the
            threshold is below the node's rule, there are fewer than ``min_neighbours``
            neighbours, the node is among them, or a key is repeated, not in canonical
            form or a low-order point (the message names the neighbour).
        """
        names = (
            "round",
            "threshold",
            "neighbours",
            "encryption_keys",
            "mask_keys",
            "signers",
            "signatures",
        )
        request = _fields(request, names, "share-keys")
        server_round = _round(request["round"])
        self._refuse_closed(server_round)
        if server_round in self.state.rounds:
            raise SecAggRefusal(f"round: share-keys of round {server_round} was answered before")
        neighbours = _ids(request["neighbours"], "neighbours")
        if self.node_id in neighbours:
            raise SecAggRefusal("neighbours: the node itself is listed")
        if len(neighbours) < self.params.min_neighbours:
            raise SecAggRefusal(
                f"neighbours: {len(neighbours)} neighbours, below min_neighbours = "
                f"{self.params.min_neighbours}"
            )
        t = request["threshold"]
        try:
            required = threshold(len(neighbours) + 1, self.params)
        except SecAggParamsError as error:
            raise SecAggRefusal(f"neighbours: {error}") from None
        if not is_int(t) or not required <= t <= len(neighbours):
            raise SecAggRefusal(
                f"threshold: {t!r} is outside [{required}, {len(neighbours)}], the node's rule "
                f"for {len(neighbours) + 1} participants"
            )
        enc_keys = _byte_strings(request["encryption_keys"], "encryption_keys", len(neighbours), 32)
        mask_keys = _byte_strings(request["mask_keys"], "mask_keys", len(neighbours), 32)
        own_enc, own_mask = round_public_keys(self.state.master, server_round)
        for field, keys, own in (
            ("encryption_keys", enc_keys, own_enc),
            ("mask_keys", mask_keys, own_mask),
        ):
            if len(set(keys)) != len(keys) or own in keys:
                raise SecAggRefusal(f"{field}: a public key is repeated or is the node's own")
        signers = _byte_strings(request["signers"], "signers", len(neighbours))
        signatures = _byte_strings(request["signatures"], "signatures", len(neighbours))
        self._check_signed(server_round, neighbours, enc_keys, mask_keys, signers, signatures)

        enc_private = round_private_key(self.state.master, ENCRYPTION, server_round)
        mask_private = round_private_key(self.state.master, MASK, server_round)
        by_peer = dict(zip(neighbours, zip(enc_keys, mask_keys, strict=True), strict=True))
        recipients = sorted(by_peer)
        fernet_keys = []
        for peer in recipients:
            enc, mask = by_peer[peer]
            try:
                fernet_keys.append(
                    share_key(
                        enc_private,
                        load_public_key(enc, "encryption_keys"),
                        server_round,
                        self.node_id,
                        peer,
                        "encryption_keys",
                    )
                )
                pair_seed(
                    mask_private,
                    load_public_key(mask, "mask_keys"),
                    server_round,
                    self.node_id,
                    peer,
                    "mask_keys",
                )
            except ValueError as error:
                raise SecAggRefusal(f"{error} (neighbour {peer})") from None

        view = view_digest(server_round, t, {**by_peer, self.node_id: (own_enc, own_mask)})
        self_seed = os.urandom(SECRET_BYTES)
        index = holder_indices([self.node_id, *recipients])
        xs = [index[peer] for peer in recipients]
        b_shares = split(self_seed, t, xs)
        key_shares = split(private_bytes(mask_private), t, xs)
        tokens = [
            encrypt(
                key,
                token_plaintext(self.node_id, peer, server_round, view, b_shares[i], key_shares[i]),
            )
            for i, (peer, key) in enumerate(zip(recipients, fernet_keys, strict=True))
        ]
        record = self.state.open_round(server_round, t, len(neighbours) + 1)
        record.stages.add(SHARE_KEYS)
        record.neighbours = by_peer
        record.self_seed = self_seed
        return {
            "round": server_round,
            "recipients": recipients,
            "tokens": tokens,
            "commitment": commitment(self.node_id, server_round, self_seed),
        }

    def _check_signed(
        self,
        server_round: int,
        neighbours: list[int],
        enc_keys: list[bytes],
        mask_keys: list[bytes],
        signers: list[bytes],
        signatures: list[bytes],
    ) -> None:
        """With trusted keys: every neighbour's keys signed by a trusted key of its own."""
        for field, values, most in (
            ("signers", signers, KEY_ID_BYTES),
            ("signatures", signatures, MAX_SIGNATURE_BYTES),
        ):
            if any(len(value) > most for value in values):
                raise SecAggRefusal(f"{field}: an item is longer than {most} bytes")
        if self.trusted is None:
            return
        for peer, enc, mask, signer, signature in zip(
            neighbours, enc_keys, mask_keys, signers, signatures, strict=True
        ):
            try:
                self.trusted.verify(signer, signature, self.run_id, peer, server_round, enc, mask)
            except SignatureError as error:
                raise SecAggRefusal(f"signatures: {error}") from None
        own = [] if self.signer is None else [self.signer.key_id]
        if len(set(signers + own)) != len(signers) + len(own):
            raise SecAggRefusal("signers: one key signs for two of the round's participants")

    # -- masked input ----------------------------------------------------------------
    def _refuse_closed(self, server_round: int) -> None:
        if self.state.is_closed(server_round):
            raise SecAggRefusal(
                f"round: round {server_round} is closed (its record was pruned: answered "
                "before, or too old)"
            )

    def _open_record(self, server_round: int, stage: str, after: str) -> RoundRecord:
        self._refuse_closed(server_round)
        record = self.state.rounds.get(server_round)
        if record is None or after not in record.stages:
            raise SecAggRefusal(f"round: the node did not answer {after} of round {server_round}")
        if STOPPED in record.stages:
            raise SecAggRefusal(f"round: the node stopped round {server_round}")
        if stage in record.stages:
            raise SecAggRefusal(f"round: {stage} of round {server_round} was answered before")
        return record

    def masked_input(self, request: dict, primes: list[int], degree: int) -> MaskSum:
        """Open the tokens addressed to the node; return its upload's mask for the ring.

        Raises
        ------
        SecAggRefusal
            If the stage is out of order or repeated, a field is malformed, the senders
            are not the neighbours less ``dropped``, more than d neighbours dropped, or a
            token fails: it does not open, is bound to another sender, receiver or round,
            was made for another view of the round, or holds no share at the node's x
            (then the round is stopped for good; the message names the first such sender).
        """
        names = ("round", "senders", "tokens", "dropped")
        request = _fields(request, names, "masked-input")
        server_round = _round(request["round"])
        record = self._open_record(server_round, MASKED_INPUT, SHARE_KEYS)
        try:
            primes, degree = check_ring(primes, degree)
        except ValueError as error:
            raise SecAggRefusal(f"ring: {error}") from None
        senders = _ids(request["senders"], "senders")
        dropped = _ids(request["dropped"], "dropped")
        tokens = _byte_strings(request["tokens"], "tokens", len(senders))
        if any(len(token) > MAX_TOKEN_BYTES for token in tokens):
            raise SecAggRefusal(f"tokens: a token is longer than {MAX_TOKEN_BYTES} bytes")
        neighbours = set(record.neighbours)
        if not set(dropped) <= neighbours:
            raise SecAggRefusal("dropped: an id is not a neighbour of this round")
        if set(senders) != neighbours - set(dropped):
            raise SecAggRefusal("senders: not the neighbours less the dropped ones")
        limit = max_dropouts(len(neighbours) + 1, self.params)
        if len(dropped) > limit:
            raise SecAggRefusal(f"dropped: {len(dropped)} neighbours dropped, more than {limit}")
        if len(senders) + 1 < record.threshold:
            raise SecAggRefusal(
                f"senders: {len(senders)} senders and the node are fewer than t = "
                f"{record.threshold}"
            )

        enc_private = round_private_key(self.state.master, ENCRYPTION, server_round)
        own_x = holder_indices([self.node_id, *record.neighbours])[self.node_id]
        own_keys = round_public_keys(self.state.master, server_round)
        view = view_digest(
            server_round, record.threshold, {**record.neighbours, self.node_id: own_keys}
        )
        held = {}
        for sender, token in zip(senders, tokens, strict=True):
            try:
                held[sender] = self._open_token(
                    enc_private, record, server_round, sender, token, own_x, view
                )
            except SecAggRefusal:
                self._stop(record)
                raise

        mask_private = round_private_key(self.state.master, MASK, server_round)
        pair_terms = [
            (
                1 if self.node_id < peer else -1,
                pair_seed(
                    mask_private,
                    load_public_key(record.neighbours[peer][1], "mask_keys"),
                    server_round,
                    self.node_id,
                    peer,
                ),
            )
            for peer in sorted(senders)
        ]
        mask = MaskSum(server_round, [record.self_seed], pair_terms, primes, degree)
        record.stages.add(MASKED_INPUT)
        record.senders = sorted(senders)
        record.held = held
        record.self_seed = None
        record.neighbours = {}
        return mask

    def _open_token(
        self,
        enc_private,
        record: RoundRecord,
        server_round: int,
        sender: int,
        token: bytes,
        own_x: int,
        view: bytes,
    ) -> tuple[bytes, bytes]:
        enc_public = load_public_key(record.neighbours[sender][0], "encryption_keys")
        key = share_key(enc_private, enc_public, server_round, self.node_id, sender)
        try:
            plaintext = decrypt(key, token)
        except (InvalidToken, ValueError, TypeError):
            raise SecAggRefusal(
                TOKEN_REFUSAL.format(sender=sender) + "does not open under the round's key"
            ) from None
        if len(plaintext) != TOKEN_PLAINTEXT_BYTES or not plaintext.startswith(TOKEN_MAGIC):
            raise SecAggRefusal(TOKEN_REFUSAL.format(sender=sender) + "is not a share token")
        header = plaintext[len(TOKEN_MAGIC) : len(TOKEN_MAGIC) + _TOKEN_HEADER.size]
        *binding, sender_view = _TOKEN_HEADER.unpack(header)
        if tuple(binding) != (sender, self.node_id, server_round):
            raise SecAggRefusal(
                TOKEN_REFUSAL.format(sender=sender)
                + "is bound to another sender, receiver or round"
            )
        if sender_view != view:
            raise SecAggRefusal(
                TOKEN_REFUSAL.format(sender=sender) + f"was made for another view of round "
                f"{server_round} (its participants, their keys or t are not the ones this "
                "node was shown)"
            )
        shares = plaintext[len(TOKEN_MAGIC) + _TOKEN_HEADER.size :]
        b_share, key_share = shares[:SHARE_BYTES], shares[SHARE_BYTES:]
        for share in (b_share, key_share):
            try:
                x, _ = decode_share(share)
            except ValueError:
                x = None
            if x != own_x:
                raise SecAggRefusal(
                    TOKEN_REFUSAL.format(sender=sender) + "does not hold a share at this node's "
                    f"x = {own_x}"
                )
        return b_share, key_share

    def _stop(self, record: RoundRecord) -> None:
        record.stages.add(STOPPED)
        record.self_seed = None
        record.neighbours = {}
        record.held = {}

    # -- unmask ----------------------------------------------------------------------
    def unmask(self, request: dict) -> dict:
        """Reveal, once, a share of b_v for survivors and of sk_v for dropped peers.

        Raises
        ------
        SecAggRefusal
            If the stage is out of order or repeated, a field is malformed, S and D
            overlap, the node is not in S, |S| < t, |D| > d, or an id is not a peer the
            node masked with.
        """
        names = ("round", "survivors", "dropped")
        request = _fields(request, names, "unmask")
        server_round = _round(request["round"])
        record = self._open_record(server_round, UNMASK, MASKED_INPUT)
        survivors = _ids(request["survivors"], "survivors")
        dropped = _ids(request["dropped"], "dropped")
        if set(survivors) & set(dropped):
            raise SecAggRefusal("survivors: an id is both a survivor and dropped")
        if self.node_id not in survivors:
            raise SecAggRefusal("survivors: the node itself is not among them")
        if len(survivors) < record.threshold:
            raise SecAggRefusal(
                f"survivors: {len(survivors)} survivors, fewer than t = {record.threshold}"
            )
        limit = max_dropouts(record.participants, self.params)
        if len(dropped) > limit:
            raise SecAggRefusal(f"dropped: {len(dropped)} peers dropped, more than {limit}")
        masked_with = set(record.senders)
        for field, ids in (("survivors", set(survivors) - {self.node_id}), ("dropped", dropped)):
            if not set(ids) <= masked_with:
                raise SecAggRefusal(f"{field}: an id is not a peer the node masked with")
        owners = sorted(set(survivors) - {self.node_id})
        dropped = sorted(dropped)
        reply = {
            "round": server_round,
            "self_mask_owners": owners,
            "self_mask_shares": [record.held[peer][0] for peer in owners],
            "mask_key_owners": dropped,
            "mask_key_shares": [record.held[peer][1] for peer in dropped],
        }
        record.stages.add(UNMASK)
        record.held = {}
        return reply
