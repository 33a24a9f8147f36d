"""The server's side of secure aggregation: one round's requests, checks and correction.

:class:`PublicKeyBook` holds the public keys nodes advertised, per node and round; a
reply with a key that is not a key (not in canonical form, or a low-order point, which
would void every round the node joins: each honest peer refuses its share-keys) is
refused whole, naming the node, the field and the round.
:class:`SecAggServerRound` runs one round over the participants whose keys it was given
(the complete graph: each one's neighbours are all the others):

1. :meth:`~SecAggServerRound.share_keys_requests`, then
   :meth:`~SecAggServerRound.receive_share_keys` (a missing or malformed reply drops
   that node, with a reason naming node and field);
2. :meth:`~SecAggServerRound.masked_input_requests`: the tokens addressed to each node
   that shared keys, and which of its neighbours dropped;
3. :meth:`~SecAggServerRound.set_survivors`: the nodes whose uploads were added to the
   sum (the others that shared keys are the dropped, D);
4. :meth:`~SecAggServerRound.unmask_requests`, then
   :meth:`~SecAggServerRound.receive_unmask` (a malformed reply is set aside, whole);
5. :meth:`~SecAggServerRound.correction`: reconstruct b_u for each survivor (checked
   against u's commitment) and sk_v for each dropped v (checked against its advertised
   public key), and return the ring element to subtract from the sum of the uploads,
   chunk by chunk: Σ_{u∈S} selfmask(u) + Σ_{u∈S, v∈D} the pairwise term u added for v.
   Each secret is interpolated from all its valid shares, with the Lagrange
   coefficients of the answering holders computed once for the round
   (:class:`~lepton_flwr.secagg.shamir.LagrangeAtZero`); if that fails its check (a
   holder sent a wrong share), by Reed–Solomon decoding of all of them (up to
   ⌊(m − t)/2⌋ wrong shares among m): the shares off the decoded polynomial name their
   holders in :attr:`~SecAggServerRound.liars` (liars, or holders whose owner dealt
   them a wrong share), whose shares later secrets try first to do without. A secret
   with fewer than t valid shares, or more wrong ones than decoding corrects, raises
   :class:`RoundNotUnmaskedError`: the round releases nothing.

Request and reply shapes are those of :mod:`lepton_flwr.secagg.client`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Mapping

from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from lepton_flwr.numbers import is_int
from lepton_flwr.secagg.client import MAX_ADVERTISED_ROUNDS, TOKEN_PLAINTEXT_BYTES
from lepton_flwr.secagg.keys import (
    COMMITMENT_BYTES,
    MAX_ROUND,
    PUBLIC_KEY_BYTES,
    check_node_id,
    check_public_key,
    check_round,
    commitment,
    load_public_key,
    pair_seed,
    public_bytes,
)
from lepton_flwr.secagg.masks import MaskSum
from lepton_flwr.secagg.params import SecAggParams, threshold
from lepton_flwr.secagg.shamir import (
    SHARE_BYTES,
    LagrangeAtZero,
    decode,
    decode_share,
    evaluate,
    holder_indices,
    interpolate_at_zero,
    secret_bytes,
)
from lepton_flwr.secagg.signatures import KEY_ID_BYTES, MAX_SIGNATURE_BYTES

SUBSET_SEARCHES = 200  # sets of t tried when decoding cannot correct a secret's shares
TOKEN_BYTES = len(Fernet(Fernet.generate_key()).encrypt(bytes(TOKEN_PLAINTEXT_BYTES)))


class RoundNotUnmaskedError(RuntimeError):
    """The round's sum cannot be unmasked: release nothing for it."""


class SecAggReplyError(ValueError):
    """A node's reply is malformed; the message names the node and the field."""


def _exact_fields(reply: object, names: set[str], node: int) -> dict:
    if not isinstance(reply, dict) or set(reply) != names:
        raise SecAggReplyError(
            f"node {node}: the reply must have exactly the fields {sorted(names)}"
        )
    return reply


def _byte_list(reply: dict, field: str, count: int, size: int, node: int) -> list[bytes]:
    value = reply[field]
    if (
        not isinstance(value, list | tuple)
        or len(value) != count
        or not all(isinstance(item, bytes) and len(item) == size for item in value)
    ):
        raise SecAggReplyError(f"node {node}: {field}: {count} byte strings of {size} expected")
    return list(value)


def _id_list(reply: dict, field: str, expected: list[int], node: int) -> None:
    value = reply[field]
    if not isinstance(value, list | tuple) or list(value) != expected:
        raise SecAggReplyError(f"node {node}: {field}: not the ids {expected}")
    if not all(is_int(item) for item in value):
        raise SecAggReplyError(f"node {node}: {field}: not integers")


class PublicKeyBook:
    """The public keys each node advertised, per round: (encryption key, mask key)."""

    def __init__(self) -> None:
        self._keys: dict[int, dict[int, tuple[bytes, bytes]]] = {}
        self._signed: dict[int, dict[int, tuple[bytes, bytes]]] = {}

    @staticmethod
    def advertise_request(first_round: int, rounds: int) -> dict:
        """An ``advertise`` request for ``rounds`` rounds (at most 256) from ``first_round``."""
        check_round(first_round, "first_round")
        if not is_int(rounds) or not 1 <= rounds <= MAX_ADVERTISED_ROUNDS:
            raise ValueError(f"rounds must be in [1, {MAX_ADVERTISED_ROUNDS}]")
        if first_round + rounds - 1 > MAX_ROUND:
            raise ValueError("the range passes the last round number")
        return {"first_round": first_round, "rounds": rounds}

    def record_advertised(self, node: int, request: dict, reply: object) -> None:
        """Keep the keys of ``reply`` (to ``request``), replacing any the node had.

        Raises
        ------
        SecAggReplyError
            If the reply is not the keys asked for, or one of them is not in canonical
            form or is a low-order point (node, field and round named); nothing of the
            reply is kept then.
        """
        check_node_id(node, "node")
        names = {"first_round", "encryption_keys", "mask_keys"}
        signed = isinstance(reply, dict) and "signer" in reply
        reply = _exact_fields(reply, names | ({"signer", "signatures"} if signed else set()), node)
        if reply["first_round"] != request["first_round"] or not is_int(reply["first_round"]):
            raise SecAggReplyError(f"node {node}: first_round: not the round asked for")
        count = request["rounds"]
        enc = _byte_list(reply, "encryption_keys", count, PUBLIC_KEY_BYTES, node)
        mask = _byte_list(reply, "mask_keys", count, PUBLIC_KEY_BYTES, node)
        signer, signatures = (
            self._signatures_of(reply, count, node) if signed else (b"", [b""] * count)
        )
        for field, keys in (("encryption_keys", enc), ("mask_keys", mask)):
            for offset, key in enumerate(keys):
                try:
                    check_public_key(key, field)
                except ValueError as error:
                    raise SecAggReplyError(
                        f"node {node}: {error} (round {request['first_round'] + offset})"
                    ) from None
        book = self._keys.setdefault(node, {})
        signed = self._signed.setdefault(node, {})
        for offset in range(count):
            book[request["first_round"] + offset] = (enc[offset], mask[offset])
            signed[request["first_round"] + offset] = (signer, signatures[offset])

    @staticmethod
    def _signatures_of(reply: dict, count: int, node: int) -> tuple[bytes, list[bytes]]:
        """(signer, one signature a round) of a signed advertisement."""
        signer, signatures = reply["signer"], reply["signatures"]
        if not isinstance(signer, bytes) or len(signer) != KEY_ID_BYTES:
            raise SecAggReplyError(f"node {node}: signer: a {KEY_ID_BYTES}-byte key fingerprint")
        if (
            not isinstance(signatures, list | tuple)
            or len(signatures) != count
            or not all(
                isinstance(item, bytes) and 0 < len(item) <= MAX_SIGNATURE_BYTES
                for item in signatures
            )
        ):
            raise SecAggReplyError(
                f"node {node}: signatures: {count} signatures of at most "
                f"{MAX_SIGNATURE_BYTES} bytes expected"
            )
        return signer, list(signatures)

    def signatures(self, nodes: Iterable[int], server_round: int) -> dict[int, tuple[bytes, bytes]]:
        """Node -> (signer, signature) of its keys for the round (b"", b"" if unsigned)."""
        return {
            node: signed
            for node in nodes
            if (signed := self._signed.get(node, {}).get(server_round)) is not None
        }

    def keys(self, node: int, server_round: int) -> tuple[bytes, bytes] | None:
        """The node's (encryption, mask) public keys for the round, if advertised."""
        return self._keys.get(node, {}).get(server_round)

    def missing(self, nodes: Iterable[int], server_round: int) -> list[int]:
        """The nodes among ``nodes`` whose keys for the round the server lacks."""
        return sorted(node for node in nodes if self.keys(node, server_round) is None)

    def round_keys(self, nodes: Iterable[int], server_round: int) -> dict[int, tuple[bytes, bytes]]:
        """Node -> keys for the round, for the nodes that advertised them."""
        return {node: keys for node in nodes if (keys := self.keys(node, server_round)) is not None}

    def forget(self, node: int) -> None:
        """Drop every key and signature the node advertised (it will be asked again)."""
        self._keys.pop(node, None)
        self._signed.pop(node, None)

    def forget_before(self, server_round: int) -> None:
        """Drop the keys of rounds before ``server_round``."""
        for books in (self._keys, self._signed):
            for node in list(books):
                book = {r: k for r, k in books[node].items() if r >= server_round}
                if book:
                    books[node] = book
                else:
                    del books[node]


class SecAggServerRound:
    """One round of SecAgg on the complete graph of the participants.

    Parameters
    ----------
    server_round
        The round number.
    public_keys
        Participant id -> (encryption public key, mask public key) for this round
        (ValueError naming the node if one is not a key: :class:`PublicKeyBook` keeps
        none such).
    params
        The server's γ and δ; t is :func:`~lepton_flwr.secagg.params.threshold` of the
        number of participants (SecAggParamsError if none holds).
    signatures
        Participant id -> (signer, signature) of its keys for the round, passed on to
        its neighbours (:meth:`PublicKeyBook.signatures`); absent: unsigned (b"", b"").

    Attributes
    ----------
    threshold
        t.
    dropped_reasons
        Node -> why it counts as dropped or its reply was set aside, stage by stage.
    """

    def __init__(
        self,
        server_round: int,
        public_keys: Mapping[int, tuple[bytes, bytes]],
        params: SecAggParams | None = None,
        signatures: Mapping[int, tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.server_round = check_round(server_round)
        self.params = params if params is not None else SecAggParams()
        signatures = signatures or {}
        self.signatures = {node: tuple(signatures.get(node, (b"", b""))) for node in public_keys}
        for node, keys in public_keys.items():
            check_node_id(node, "public_keys")
            if (
                not isinstance(keys, tuple | list)
                or len(keys) != 2
                or not all(isinstance(k, bytes) and len(k) == PUBLIC_KEY_BYTES for k in keys)
            ):
                raise ValueError(f"public_keys: node {node} needs two 32-byte public keys")
            for field, key in zip(("encryption key", "mask key"), keys, strict=True):
                check_public_key(key, f"public_keys: node {node}: {field}")
        self.public_keys = {node: tuple(keys) for node, keys in public_keys.items()}
        self.participants = sorted(self.public_keys)
        self.threshold = threshold(len(self.participants), self.params)
        self.neighbours = {
            node: [peer for peer in self.participants if peer != node] for node in self.participants
        }
        # Holder h's x in every owner's sharing: its place among the participants, + 1.
        self._x = holder_indices(self.participants)
        self.dropped_reasons: dict[int, str] = {}
        self._tokens: dict[int, dict[int, bytes]] = {}  # sender -> recipient -> token
        self._commitments: dict[int, bytes] = {}
        self.shared_keys: list[int] | None = None  # U2: the nodes whose share-keys held
        self.survivors: list[int] | None = None
        self.dropped: list[int] | None = None
        self._unmask_replies: dict[int, dict] = {}
        self.liars: set[int] = set()  # holders whose shares disagreed with a checked secret
        self._basis_for: tuple[int, ...] | None = None
        self._basis_cache: LagrangeAtZero | None = None

    # -- share-keys ------------------------------------------------------------------
    def share_keys_requests(self) -> dict[int, dict]:
        """Node -> its share-keys request: round, t, neighbours and their public keys."""
        return {
            node: {
                "round": self.server_round,
                "threshold": self.threshold,
                "neighbours": list(peers),
                "encryption_keys": [self.public_keys[peer][0] for peer in peers],
                "mask_keys": [self.public_keys[peer][1] for peer in peers],
                "signers": [self.signatures[peer][0] for peer in peers],
                "signatures": [self.signatures[peer][1] for peer in peers],
            }
            for node, peers in self.neighbours.items()
        }

    def receive_share_keys(self, replies: Mapping[int, object]) -> dict[int, str]:
        """Check every participant's reply; return node -> reason for those dropped here."""
        if self.shared_keys is not None:
            raise RuntimeError("share-keys replies were received already")
        dropped = {}
        for node in self.participants:
            if node not in replies:
                dropped[node] = f"node {node}: no share-keys reply"
                continue
            try:
                self._check_share_keys(node, replies[node])
            except SecAggReplyError as error:
                dropped[node] = f"share-keys: {error}"
        for node in set(replies) - set(self.participants):
            dropped[node] = f"node {node}: a share-keys reply from a node not in the round"
        self.shared_keys = [node for node in self.participants if node not in dropped]
        for node in dropped:
            self._tokens.pop(node, None)
            self._commitments.pop(node, None)
        self.dropped_reasons.update(dropped)
        return dropped

    def _check_share_keys(self, node: int, reply: object) -> None:
        reply = _exact_fields(reply, {"round", "recipients", "tokens", "commitment"}, node)
        if not is_int(reply["round"]) or reply["round"] != self.server_round:
            raise SecAggReplyError(f"node {node}: round: not round {self.server_round}")
        recipients = self.neighbours[node]
        _id_list(reply, "recipients", recipients, node)
        tokens = _byte_list(reply, "tokens", len(recipients), TOKEN_BYTES, node)
        value = reply["commitment"]
        if not isinstance(value, bytes) or len(value) != COMMITMENT_BYTES:
            raise SecAggReplyError(f"node {node}: commitment: {COMMITMENT_BYTES} bytes expected")
        self._tokens[node] = dict(zip(recipients, tokens, strict=True))
        self._commitments[node] = value

    # -- masked input ----------------------------------------------------------------
    def masked_input_requests(self) -> dict[int, dict]:
        """Node -> the tokens addressed to it and which of its neighbours dropped."""
        if self.shared_keys is None:
            raise RuntimeError("receive the share-keys replies first")
        shared = set(self.shared_keys)
        requests = {}
        for node in self.shared_keys:
            senders = [peer for peer in self.neighbours[node] if peer in shared]
            requests[node] = {
                "round": self.server_round,
                "senders": senders,
                "tokens": [self._tokens[peer][node] for peer in senders],
                "dropped": [peer for peer in self.neighbours[node] if peer not in shared],
            }
        return requests

    def set_survivors(self, survivors: Iterable[int]) -> None:
        """The nodes whose uploads are in the sum; every other node that shared keys is D.

        Raises
        ------
        ValueError
            If a survivor did not share keys in this round (a caller's mistake).
        RoundNotUnmaskedError
            If fewer than t survivors remain.
        """
        if self.shared_keys is None:
            raise RuntimeError("receive the share-keys replies first")
        survivors = sorted(set(survivors))
        unknown = set(survivors) - set(self.shared_keys)
        if unknown:
            raise ValueError(f"survivors {sorted(unknown)} did not share keys in this round")
        if len(survivors) < self.threshold:
            raise RoundNotUnmaskedError(
                f"round {self.server_round}: {len(survivors)} survivors, fewer than "
                f"t = {self.threshold}"
            )
        self.survivors = survivors
        self.dropped = [node for node in self.shared_keys if node not in set(survivors)]
        for node in self.dropped:
            self.dropped_reasons.setdefault(node, f"node {node}: its upload is not in the sum")

    # -- unmask ----------------------------------------------------------------------
    def unmask_requests(self) -> dict[int, dict]:
        """Survivor -> the unmask request (the same survivors S and dropped D for all)."""
        if self.survivors is None:
            raise RuntimeError("set the survivors first")
        request = {
            "round": self.server_round,
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
        }
        return {node: dict(request) for node in self.survivors}

    def receive_unmask(self, replies: Mapping[int, object]) -> dict[int, str]:
        """Keep the well-formed unmask replies; return node -> reason for those set aside."""
        if self.survivors is None:
            raise RuntimeError("set the survivors first")
        rejected = {}
        for node, reply in replies.items():
            if node not in self.survivors:
                rejected[node] = f"node {node}: an unmask reply from a node not among survivors"
                continue
            try:
                self._unmask_replies[node] = self._check_unmask(node, reply)
            except SecAggReplyError as error:
                rejected[node] = f"unmask: {error}"
        return rejected

    def _check_unmask(self, node: int, reply: object) -> dict:
        names = {
            "round",
            "self_mask_owners",
            "self_mask_shares",
            "mask_key_owners",
            "mask_key_shares",
        }
        reply = _exact_fields(reply, names, node)
        if not is_int(reply["round"]) or reply["round"] != self.server_round:
            raise SecAggReplyError(f"node {node}: round: not round {self.server_round}")
        owners = [peer for peer in self.survivors if peer != node]
        _id_list(reply, "self_mask_owners", owners, node)
        _id_list(reply, "mask_key_owners", list(self.dropped), node)
        kept = {}
        for owners_of, field in (
            (owners, "self_mask_shares"),
            (self.dropped, "mask_key_shares"),
        ):
            shares = _byte_list(reply, field, len(owners_of), SHARE_BYTES, node)
            values = {}
            for owner, share in zip(owners_of, shares, strict=True):
                try:
                    x, value = decode_share(share)
                except ValueError as error:
                    raise SecAggReplyError(
                        f"node {node}: {field}: the share of {owner}'s secret: {error}"
                    ) from None
                if x != self._x[node]:
                    raise SecAggReplyError(
                        f"node {node}: {field}: the share of {owner}'s secret has index "
                        f"{x}, not {self._x[node]}"
                    )
                values[owner] = value
            kept[field] = values
        return kept

    # -- correction ------------------------------------------------------------------
    def _reconstruct(
        self, owner: int, field: str, basis: LagrangeAtZero | None, check, what: str
    ) -> bytes:
        """The owner's secret from the holders' shares in ``field``, checked; see above."""
        t = self.threshold
        every = {
            self._x[holder]: reply[field][owner]
            for holder, reply in self._unmask_replies.items()
            if owner in reply[field]
        }
        if len(every) < t:
            raise RoundNotUnmaskedError(
                f"round {self.server_round}: {what}: {len(every)} valid shares, fewer than t = {t}"
            )
        # First without the holders whose shares disagreed with an earlier secret; then,
        # if that fails, decoding over all of this secret's shares: a holder named for
        # one secret may be honest (its owner dealt it a wrong share), so no share is
        # left out of a secret for what happened to another.
        liars_x = {self._x[holder] for holder in self.liars}
        points = {x: value for x, value in every.items() if x not in liars_x}
        if len(points) >= t:
            shared = basis.without(self._x[owner]) if basis is not None else {}
            coefficients = (
                shared if shared.keys() == points.keys() else LagrangeAtZero(points).coefficients
            )
            secret = secret_bytes(interpolate_at_zero(coefficients, points))
            if secret is not None and check(secret):
                return secret
        secret = self._correct(every, check) if len(every) > t else None
        if secret is not None:
            return secret
        raise RoundNotUnmaskedError(
            f"round {self.server_round}: {what}: the shares do not reconstruct a secret that "
            f"passes its check ({len(every)} shares, t = {t}: decoding corrects at most "
            f"{(len(every) - t) // 2} wrong ones, and no set of t tried checks)"
        )

    def _correct(self, points: dict[int, int], check) -> bytes | None:
        """Correct wrong shares: Reed–Solomon decoding of the secret's polynomial.

        With m shares of which e are wrong, :func:`~lepton_flwr.secagg.shamir.decode`
        finds the polynomial whenever e ≤ ⌊(m − t)/2⌋ (m = 94, t = 53: 20 wrong shares),
        in O(m²); beyond that, :meth:`_search` lets the secret's check decide. The shares
        off the polynomial name their holders in :attr:`liars`: the holder lied,
        or the secret's owner dealt it a wrong share. Later secrets are tried first
        without them, then decoded over all their shares.
        """
        t = self.threshold
        coefficients = decode(points, t)
        if coefficients is None or not self._checks(coefficients[0], check):
            coefficients = self._search(points, check)
        if coefficients is None:
            return None
        holder_of = {x: holder for holder, x in self._x.items()}
        for x, value in points.items():
            if evaluate(coefficients, x) != value:
                self.liars.add(holder_of[x])
        return secret_bytes(coefficients[0])

    @staticmethod
    def _checks(value: int, check) -> bool:
        secret = secret_bytes(value)
        return secret is not None and check(secret)

    def _search(self, points: dict[int, int], check) -> list[int] | None:
        """Sets of t shares until one gives a secret that passes its check.

        Every set when there are at most ``SUBSET_SEARCHES``, else that many at random;
        returns that polynomial's coefficients, or None. With one spare share (m = t + 1)
        decoding corrects nothing, yet one wrong share is found this way: the set without
        it is the one that checks.
        """
        t, xs = self.threshold, sorted(points)
        if math.comb(len(xs), t) <= SUBSET_SEARCHES:
            subsets = itertools.combinations(xs, t)
        else:
            chooser = random.SystemRandom()
            subsets = (sorted(chooser.sample(xs, t)) for _ in range(SUBSET_SEARCHES))
        for subset in subsets:
            chosen = {x: points[x] for x in subset}
            coefficients = decode(chosen, t)  # no error to correct: the interpolant
            if coefficients is not None and self._checks(coefficients[0], check):
                return coefficients
        return None

    def _basis(self) -> LagrangeAtZero | None:
        """The coefficients of the answering holders less the liars found so far (cached)."""
        holders = tuple(sorted(self._x[h] for h in self._unmask_replies if h not in self.liars))
        if self._basis_for != holders:
            self._basis_for = holders
            self._basis_cache = LagrangeAtZero(holders) if holders else None
        return self._basis_cache

    def recover_secrets(self) -> tuple[dict[int, bytes], dict[int, X25519PrivateKey]]:
        """(survivor -> self-mask seed, dropped -> mask private key), each one checked.

        Raises
        ------
        RoundNotUnmaskedError
            If a secret has fewer than t valid shares or fails its check.
        """
        if self.survivors is None:
            raise RuntimeError("set the survivors and receive the unmask replies first")
        # One set of coefficients for the holders that answered; each owner's set is
        # that one less the owner, if it answered (LagrangeAtZero.without, O(m)).
        seeds = {}
        for owner in self.survivors:
            expected = self._commitments[owner]
            seeds[owner] = self._reconstruct(
                owner,
                "self_mask_shares",
                self._basis(),
                lambda seed, owner=owner, expected=expected: (
                    commitment(owner, self.server_round, seed) == expected
                ),
                f"the self-mask seed of {owner}",
            )
        keys = {}
        for owner in self.dropped:
            advertised = self.public_keys[owner][1]
            secret = self._reconstruct(
                owner,
                "mask_key_shares",
                self._basis(),
                lambda key, advertised=advertised: (
                    public_bytes(X25519PrivateKey.from_private_bytes(key)) == advertised
                ),
                f"the mask key of {owner}",
            )
            keys[owner] = X25519PrivateKey.from_private_bytes(secret)
        return seeds, keys

    def correction(self, primes: list[int], degree: int) -> MaskSum:
        """The ring element, per chunk, to subtract from the sum of the survivors' uploads.

        Raises
        ------
        RoundNotUnmaskedError
            If a needed secret cannot be reconstructed and checked.
        """
        seeds, keys = self.recover_secrets()
        pair_terms = []
        for dropped, private in keys.items():
            for survivor in self.survivors:
                if survivor not in self.neighbours[dropped]:
                    continue
                seed = pair_seed(
                    private,
                    load_public_key(self.public_keys[survivor][1], "mask_keys"),
                    self.server_round,
                    dropped,
                    survivor,
                )
                pair_terms.append((1 if survivor < dropped else -1, seed))
        return MaskSum(
            self.server_round, [seeds[node] for node in self.survivors], pair_terms, primes, degree
        )
