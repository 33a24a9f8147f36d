"""Secure aggregation's protocol core (issue 20): rounds, dropouts, attacks and refusals.

Real clients and a real server round, masks in a small ring (the default context's two
40-bit primes, degree 64). The attacks play a malicious server against honest nodes:
whatever the nodes accept is tried, and what the server could reconstruct is checked
against the victim's own mask.
"""

import itertools
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt

import lepton_flwr.secagg.client as client_module
import lepton_flwr.secagg.keys as keys_module
import lepton_flwr.secagg.server as server_module
from lepton_flwr.he.ring_masks import add_mod, sub_mod
from lepton_flwr.secagg import (
    ClientState,
    MaskSum,
    PublicKeyBook,
    RoundNotUnmaskedError,
    SecAggClient,
    SecAggParams,
    SecAggRefusal,
    SecAggServerRound,
    colluders,
    threshold,
    tolerated_dropouts,
)
from lepton_flwr.secagg.client import token_plaintext
from lepton_flwr.secagg.keys import (
    ENCRYPTION,
    FIELD_PRIME,
    MASK,
    check_public_key,
    commitment,
    load_public_key,
    pair_seed,
    public_bytes,
    round_private_key,
    round_public_keys,
    share_key,
    view_digest,
)
from lepton_flwr.secagg.server import TOKEN_BYTES, SecAggReplyError
from lepton_flwr.secagg.shamir import (
    PRIME,
    combine,
    decode,
    decode_share,
    encode_share,
    evaluate,
    holder_indices,
)
from lepton_flwr.secagg.state import STOPPED

PRIMES = [1099511390209, 1099511480321]  # the default context's two 40-bit data primes
DEGREE = 64
ROUND = 7
# The u-coordinates of Curve25519's points of order 8 (the tests below check the order).
ORDER_8_U = (
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
)
# Every low-order u: order 2 (0), order 4 on the curve or its twist (1, p − 1), order 8.
LOW_ORDER_U = (0, 1, FIELD_PRIME - 1, *ORDER_8_U)


def _u_bytes(u):
    """An X25519 public key's wire form: u in 32 little-endian bytes."""
    return u.to_bytes(32, "little")


def _top_bit(key):
    """The same u with the top bit set: a non-canonical encoding X25519 itself ignores."""
    return key[:31] + bytes([key[31] | 0x80])


def node_ids(n):
    """n node ids, the last one near 2^64 (Flower's ids are unsigned 64-bit)."""
    return [3 + 7919 * i for i in range(n - 1)] + [2**64 - 2]


class Round:
    """One round between fresh clients and a server, stage by stage."""

    def __init__(self, n, params=None, server_round=ROUND):
        self.params = params or SecAggParams()
        self.ids = node_ids(n)
        self.r = server_round
        self.clients = {u: SecAggClient(u, ClientState.new(), self.params) for u in self.ids}
        self.book = PublicKeyBook()
        request = self.book.advertise_request(server_round, 2)
        for u, client in self.clients.items():
            self.book.record_advertised(u, request, client.advertise(request))
        self.server = SecAggServerRound(
            server_round, self.book.round_keys(self.ids, server_round), self.params
        )
        self.masks = {}
        self.refusals = {}

    def share_keys(self, drop=()):
        replies = {
            u: self.clients[u].share_keys(request)
            for u, request in self.server.share_keys_requests().items()
            if u not in drop
        }
        return self.server.receive_share_keys(replies)

    def masked_input(self, drop=()):
        for u, request in self.server.masked_input_requests().items():
            if u in drop:
                continue
            try:
                self.masks[u] = self.clients[u].masked_input(request, PRIMES, DEGREE)
            except SecAggRefusal as error:
                self.refusals[u] = str(error)
        self.server.set_survivors(self.masks)

    def unmask(self, drop=()):
        replies = {}
        for u, request in self.server.unmask_requests().items():
            if u in drop:
                continue
            try:
                replies[u] = self.clients[u].unmask(request)
            except SecAggRefusal as error:
                self.refusals[u] = str(error)
        return self.server.receive_unmask(replies)

    def run(self, drop_share_keys=(), drop_masked_input=(), drop_unmask=()):
        self.share_keys(drop_share_keys)
        self.masked_input(drop_masked_input)
        self.unmask(drop_unmask)
        return self.server.correction(PRIMES, DEGREE)


def masked_sum(masks, chunk):
    total = np.zeros((len(PRIMES), DEGREE), np.uint64)
    for mask in masks:
        total = add_mod(total, mask(chunk), PRIMES)
    return total


def assert_exact(round_, correction):
    """Σ survivors' masks − correction is 0, word for word, on two chunks."""
    assert set(round_.masks) == set(round_.server.survivors)
    for chunk in (0, 5):
        total = masked_sum(round_.masks.values(), chunk)
        assert total.any()
        np.testing.assert_array_equal(sub_mod(total, correction(chunk), PRIMES), 0)


# -- full rounds and dropouts -----------------------------------------------------------


@pytest.mark.parametrize("n", range(5, 13))
def test_a_full_round_unmasks_the_sum_word_for_word(n):
    round_ = Round(n)
    correction = round_.run()
    assert round_.server.dropped == [] and round_.refusals == {}
    assert_exact(round_, correction)
    one = next(iter(round_.masks.values()))(0)
    assert one.any() and not np.array_equal(one, correction(0))


def test_a_wrong_correction_is_caught():
    """The check above fails when one survivor's self-mask is left in the sum."""
    round_ = Round(6)
    round_.run()
    seeds, _ = round_.server.recover_secrets()
    partial = MaskSum(ROUND, list(seeds.values())[1:], [], PRIMES, DEGREE)
    total = masked_sum(round_.masks.values(), 0)
    assert sub_mod(total, partial(0), PRIMES).any()


def _drops(round_, stage, count):
    victims = round_.ids[1 : 1 + count]
    return {
        "share-keys": {"drop_share_keys": victims},
        "masked-input": {"drop_masked_input": victims},
        "unmask": {"drop_unmask": victims},
    }[stage]


def _stage_tolerance(n, stage, params):
    """Dropouts one stage survives: the caps apply before the upload, not after it."""
    if stage == "unmask":
        return n - 1 - threshold(n, params)
    return tolerated_dropouts(n, params)


@pytest.mark.parametrize("n", [6, 9, 12])
@pytest.mark.parametrize("stage", ["share-keys", "masked-input", "unmask"])
def test_dropouts_up_to_the_tolerated_number_keep_the_sum_exact(n, stage):
    params = SecAggParams()
    count = _stage_tolerance(n, stage, params)
    assert count >= 1
    round_ = Round(n, params)
    correction = round_.run(**_drops(round_, stage, count))
    assert_exact(round_, correction)
    if stage == "masked-input":
        assert len(round_.server.dropped) == count  # their pairwise masks were removed


@pytest.mark.parametrize("n", [6, 9, 12])
@pytest.mark.parametrize("stage", ["share-keys", "masked-input", "unmask"])
def test_one_dropout_more_than_tolerated_releases_nothing(n, stage):
    params = SecAggParams()
    round_ = Round(n, params)
    with pytest.raises(RoundNotUnmaskedError):
        round_.run(**_drops(round_, stage, _stage_tolerance(n, stage, params) + 1))


def test_dropouts_spread_over_the_stages_keep_the_sum_exact():
    n = 12
    params = SecAggParams()
    assert tolerated_dropouts(n, params) == 2
    round_ = Round(n, params)
    ids = round_.ids
    correction = round_.run(drop_share_keys=[ids[2]], drop_masked_input=[ids[5]])
    assert_exact(round_, correction)
    round_ = Round(n, params)
    correction = round_.run(drop_masked_input=[ids[1], ids[4]], drop_unmask=[ids[7], ids[9]])
    assert_exact(round_, correction)


# -- the server claims a live client dropped --------------------------------------------


def _open(shares, check, t):
    """Whether a server holding ``shares`` obtains a secret passing ``check``."""
    if not shares:
        return False
    secret = combine(shares[:t])
    return secret is not None and check(secret)


def _masked_round(n, params=None):
    round_ = Round(n, params)
    round_.share_keys()
    round_.masked_input()
    assert not round_.refusals
    return round_


def _restore(round_, snapshot, u):
    return SecAggClient(u, ClientState.from_bytes(snapshot[u]), round_.params)


def _mask_from_secrets(round_, victim, self_seed, victim_key):
    """The victim's whole upload mask, rebuilt from its seed b and its mask key."""
    terms = []
    for peer in round_.ids:
        if peer == victim:
            continue
        peer_key = round_.book.keys(peer, round_.r)[1]
        seed = pair_seed(
            victim_key, X25519PublicKey.from_public_bytes(peer_key), round_.r, victim, peer
        )
        terms.append((1 if victim < peer else -1, seed))
    return MaskSum(round_.r, [self_seed], terms, PRIMES, DEGREE)


def _claim_dropped_attack(n):
    """Every split of the honest holders: some asked with the victim a survivor (its b),
    the others with it dropped (its mask key); the colluders give both. Returns the
    splits where the server opens both secrets, and how often it opens each."""
    round_ = _masked_round(n)
    t = round_.server.threshold
    victim = round_.ids[0]
    colluding = round_.ids[1 : 1 + colluders(n, round_.params)]
    honest = [u for u in round_.ids if u != victim and u not in colluding]
    snapshot = {u: round_.clients[u].state.to_bytes() for u in round_.ids}
    advertised = round_.book.keys(victim, round_.r)[1]
    expected = round_.server._commitments[victim]

    def b_check(seed):
        return commitment(victim, round_.r, seed) == expected

    def key_check(key):
        return public_bytes(X25519PrivateKey.from_private_bytes(key)) == advertised

    held_by_colluders = [round_.clients[u].state.rounds[round_.r].held[victim] for u in colluding]
    opened = {"both": [], "b": 0, "key": 0}
    everyone = list(round_.ids)
    for mask in itertools.product((True, False), repeat=len(honest)):
        b_shares = [b for b, _ in held_by_colluders]
        key_shares = [k for _, k in held_by_colluders]
        for holder, as_survivor in zip(honest, mask, strict=True):
            client = _restore(round_, snapshot, holder)
            if as_survivor:
                request = {"round": round_.r, "survivors": everyone, "dropped": []}
            else:
                survivors = [u for u in everyone if u != victim]
                request = {"round": round_.r, "survivors": survivors, "dropped": [victim]}
            reply = client.unmask(request)
            if victim in reply["self_mask_owners"]:
                b_shares.append(reply["self_mask_shares"][reply["self_mask_owners"].index(victim)])
            if victim in reply["mask_key_owners"]:
                key_shares.append(reply["mask_key_shares"][reply["mask_key_owners"].index(victim)])
            with pytest.raises(SecAggRefusal, match="answered before"):
                client.unmask(request)
        got_b = _open(b_shares, b_check, t)
        got_key = _open(key_shares, key_check, t)
        opened["b"] += got_b
        opened["key"] += got_key
        if got_b and got_key:
            opened["both"].append((b_shares, key_shares))
    return round_, victim, opened


def test_a_server_calling_a_live_client_dropped_never_gets_both_its_secrets():
    round_, _, opened = _claim_dropped_attack(8)
    assert round_.server.threshold == 5  # c = 1: 2t > n − 1 + c
    assert opened["both"] == []
    assert opened["b"] > 0 and opened["key"] > 0  # each alone does open: the check can pass


def test_with_a_semi_honest_threshold_the_same_attack_reads_the_upload(monkeypatch):
    """Control: with t = c + 1 (enough against an honest-but-curious server) the split
    attack opens both secrets, and they rebuild the victim's mask word for word."""

    def weak(n, params):
        return colluders(n, params) + 1

    monkeypatch.setattr(client_module, "threshold", weak)
    monkeypatch.setattr(server_module, "threshold", weak)
    round_, victim, opened = _claim_dropped_attack(8)
    assert round_.server.threshold == 2 and opened["both"]
    b_shares, key_shares = opened["both"][0]
    seed = combine(b_shares[:2])
    key = X25519PrivateKey.from_private_bytes(combine(key_shares[:2]))
    rebuilt = _mask_from_secrets(round_, victim, seed, key)
    np.testing.assert_array_equal(rebuilt(0), round_.masks[victim](0))


# -- the server reveals the victim's peers' keys instead ---------------------------------


def _peer_key_attack(n=5):
    """Search every strategy the nodes accept for reading one upload through its peers'
    mask keys: the victim is told some neighbours dropped before the masked input, and
    each honest holder is sent any (S, D) it would answer. Returns a winning plan with
    its real replies (or None), and how many dropout claims the victim accepted."""
    params = SecAggParams()
    round_ = Round(n, params)
    round_.share_keys()
    t = round_.server.threshold
    victim, colluder = round_.ids[0], round_.ids[1]
    honest = [u for u in round_.ids if u not in (victim, colluder)]
    requests = round_.server.masked_input_requests()
    victim_before = round_.clients[victim].state.to_bytes()
    for u in round_.ids:
        if u != victim:
            round_.masks[u] = round_.clients[u].masked_input(requests[u], PRIMES, DEGREE)
    accepted = 0
    for told_dropped in itertools.chain.from_iterable(
        itertools.combinations(honest, size) for size in range(3)
    ):
        victim_client = SecAggClient(victim, ClientState.from_bytes(victim_before), params)
        base = requests[victim]
        keep = [i for i, s in enumerate(base["senders"]) if s not in told_dropped]
        request = {
            "round": round_.r,
            "senders": [base["senders"][i] for i in keep],
            "tokens": [base["tokens"][i] for i in keep],
            "dropped": sorted(told_dropped),
        }
        try:
            victim_mask = victim_client.masked_input(request, PRIMES, DEGREE)
        except SecAggRefusal:
            assert len(told_dropped) > 1  # the cap d = 1
            continue
        accepted += 1
        partners = [u for u in request["senders"] if u != colluder]
        targets = [victim, *partners]  # the mask keys that would help
        holders = {victim: victim_client.state.to_bytes()}
        holders.update({u: round_.clients[u].state.to_bytes() for u in honest})
        options = []
        for holder, state in holders.items():
            others = [u for u in round_.ids if u != holder]
            seen = {}
            for roles in itertools.product("SDx", repeat=len(others)):
                survivors = [holder] + [u for u, r in zip(others, roles, strict=True) if r == "S"]
                dropped = [u for u, r in zip(others, roles, strict=True) if r == "D"]
                client = SecAggClient(holder, ClientState.from_bytes(state), params)
                try:
                    reply = client.unmask(
                        {"round": round_.r, "survivors": survivors, "dropped": dropped}
                    )
                except SecAggRefusal:
                    continue
                gives_b = victim in reply["self_mask_owners"]
                keys = frozenset(u for u in reply["mask_key_owners"] if u in targets)
                seen.setdefault((gives_b, keys), reply)
            options.append([*seen.items(), ((False, frozenset()), None)])
        for plan in itertools.product(*options):
            b_count = 1 + sum(gives_b for (gives_b, _), _ in plan)  # the colluder gives b
            key_count = {u: 1 + sum(u in keys for (_, keys), _ in plan) for u in targets}
            via_own_key = key_count[victim] >= t
            via_peers = all(key_count[u] >= t for u in partners)
            if b_count >= t and (via_own_key or via_peers):
                return {
                    "round": round_,
                    "victim": victim,
                    "mask": victim_mask,
                    "senders": request["senders"],
                    "colluder": colluder,
                    "replies": [reply for _, reply in plan if reply is not None],
                    "t": t,
                }, accepted
    return None, accepted


def test_revealing_the_peers_keys_cannot_read_an_upload_under_the_rule():
    """n = 5, c = 1, d = 1: rule 2 raises t to 4; no strategy the nodes accept opens b_u
    and the mask key of every honest peer the victim masked with (or its own)."""
    assert threshold(5, SecAggParams()) == 4
    found, accepted = _peer_key_attack(5)
    assert found is None
    assert accepted == 1 + 3  # no claim, or one of the three honest peers dropped


def test_with_only_the_majority_rule_revealing_the_peers_keys_reads_an_upload(monkeypatch):
    """Control: t = floor((n − 1 + c)/2) + 1 = 3 alone; the search finds a plan, and its
    real shares rebuild the victim's whole mask word for word."""

    def majority(n, params):
        return (n - 1 + colluders(n, params)) // 2 + 1

    monkeypatch.setattr(client_module, "threshold", majority)
    monkeypatch.setattr(server_module, "threshold", majority)
    found, _ = _peer_key_attack(5)
    assert found is not None
    round_, victim, t, colluder = found["round"], found["victim"], found["t"], found["colluder"]
    assert t == 3
    held = round_.clients[colluder].state.rounds[round_.r].held  # the colluder gives all
    b_shares = [held[victim][0]]
    key_shares = {owner: [shares[1]] for owner, shares in held.items()}
    for reply in found["replies"]:
        if victim in reply["self_mask_owners"]:
            b_shares.append(reply["self_mask_shares"][reply["self_mask_owners"].index(victim)])
        for owner, share in zip(reply["mask_key_owners"], reply["mask_key_shares"], strict=True):
            key_shares[owner].append(share)
    seed = combine(b_shares[:t])
    assert commitment(victim, round_.r, seed) == round_.server._commitments[victim]
    victim_public = X25519PublicKey.from_public_bytes(round_.book.keys(victim, round_.r)[1])
    terms = []
    for peer in found["senders"]:
        if peer == colluder:
            private = round_private_key(round_.clients[colluder].state.master, MASK, round_.r)
        else:
            private = X25519PrivateKey.from_private_bytes(combine(key_shares[peer][:t]))
        seed_uv = pair_seed(private, victim_public, round_.r, peer, victim)
        terms.append((1 if victim < peer else -1, seed_uv))
    rebuilt = MaskSum(round_.r, [seed], terms, PRIMES, DEGREE)
    np.testing.assert_array_equal(rebuilt(0), found["mask"](0))


# -- a node answers each stage once, and refuses what is malformed ----------------------


def _stage_requests(n=6):
    """A round up to the masked input, and one request of each stage for its first node."""
    round_ = Round(n)
    u = round_.ids[0]
    share_keys = round_.server.share_keys_requests()
    round_.share_keys()
    return round_, u, share_keys[u], round_.server.masked_input_requests()


def test_each_stage_is_answered_once_per_round_even_after_a_restart():
    round_, u, share_request, masked_requests = _stage_requests()
    client = round_.clients[u]
    with pytest.raises(SecAggRefusal, match="round: share-keys of round 7 was answered before"):
        client.share_keys(share_request)
    round_.masked_input()
    with pytest.raises(SecAggRefusal, match="masked-input of round 7 was answered before"):
        client.masked_input(masked_requests[u], PRIMES, DEGREE)
    request = round_.server.unmask_requests()[u]
    client.unmask(request)
    restored = SecAggClient(u, ClientState.from_bytes(client.state.to_bytes()), round_.params)
    for again in (client, restored):
        with pytest.raises(SecAggRefusal, match="unmask of round 7 was answered before"):
            again.unmask(request)
        with pytest.raises(SecAggRefusal, match="answered before"):
            again.share_keys(share_request)


def test_the_node_shares_with_each_neighbour_and_keeps_no_share_of_its_own():
    round_ = Round(6)
    u = round_.ids[0]
    request = round_.server.share_keys_requests()[u]
    reply = round_.clients[u].share_keys(request)
    assert reply["recipients"] == sorted(request["neighbours"]) and u not in reply["recipients"]
    assert len(reply["tokens"]) == 5
    record = round_.clients[u].state.rounds[ROUND]
    assert record.held == {} and record.self_seed is not None
    assert commitment(u, ROUND, record.self_seed) == reply["commitment"]


def _next_round(round_):
    """The same clients in round r + 1 (keys were advertised for it)."""
    follow = Round.__new__(Round)
    follow.__dict__.update(round_.__dict__)
    follow.r = round_.r + 1
    follow.server = SecAggServerRound(
        follow.r, round_.book.round_keys(round_.ids, follow.r), round_.params
    )
    follow.masks, follow.refusals = {}, {}
    return follow


def test_a_token_replayed_from_another_round_is_refused_and_stops_the_round():
    first = Round(6)
    first.run()
    old_tokens = first.server._tokens
    second = _next_round(first)
    second.share_keys()
    requests = second.server.masked_input_requests()
    u = second.ids[0]
    replayed = dict(requests[u])
    sender = replayed["senders"][0]
    replayed["tokens"] = [old_tokens[sender][u], *replayed["tokens"][1:]]
    client = second.clients[u]
    with pytest.raises(SecAggRefusal, match=f"tokens: the token from {sender} does not open"):
        client.masked_input(replayed, PRIMES, DEGREE)
    with pytest.raises(SecAggRefusal, match="stopped round 8"):
        client.masked_input(requests[u], PRIMES, DEGREE)
    assert client.state.rounds[8].held == {} and client.state.rounds[8].self_seed is None


def test_a_token_addressed_to_another_node_is_refused():
    round_, u, _, requests = _stage_requests()
    request = dict(requests[u])
    sender, other = request["senders"][0], request["senders"][1]
    request["tokens"] = [round_.server._tokens[sender][other], *request["tokens"][1:]]
    with pytest.raises(SecAggRefusal, match=f"the token from {sender} does not open"):
        round_.clients[u].masked_input(request, PRIMES, DEGREE)


def test_a_token_under_the_right_key_but_bound_to_another_round_is_refused():
    """The binding inside the token is checked, not only the key it opens under."""
    round_, u, _, requests = _stage_requests()
    request = dict(requests[u])
    sender = request["senders"][0]
    sender_state = round_.clients[sender].state
    key = share_key(
        round_private_key(sender_state.master, ENCRYPTION, ROUND),
        X25519PublicKey.from_public_bytes(
            round_public_keys(round_.clients[u].state.master, ROUND)[0]
        ),
        ROUND,
        sender,
        u,
    )
    share = encode_share(holder_indices(round_.ids)[u], 1)  # at u's x: only the round is wrong
    forged = encrypt(key, token_plaintext(sender, u, ROUND + 1, _view(round_), share, share))
    request["tokens"] = [forged, *request["tokens"][1:]]
    with pytest.raises(SecAggRefusal, match="bound to another sender, receiver or round"):
        round_.clients[u].masked_input(request, PRIMES, DEGREE)


def _view(round_, server_round=ROUND):
    """The view digest every node of a round run by the server has: all participants."""
    keys = round_.book.round_keys(round_.ids, server_round)
    return view_digest(server_round, round_.server.threshold, keys)


def _forged_token(round_, sender, u, b_share, key_share, view=None):
    """A token from ``sender`` to ``u`` under their real key, bound to the real round and
    (unless ``view`` says otherwise) to the round's one view."""
    key = share_key(
        round_private_key(round_.clients[sender].state.master, ENCRYPTION, ROUND),
        X25519PublicKey.from_public_bytes(
            round_public_keys(round_.clients[u].state.master, ROUND)[0]
        ),
        ROUND,
        sender,
        u,
    )
    view = _view(round_) if view is None else view
    return encrypt(key, token_plaintext(sender, u, ROUND, view, b_share, key_share))


def test_a_token_whose_shares_are_not_at_the_nodes_x_stops_the_round():
    """Both shares must be field elements at the receiver's x (its place in the round)."""
    x = holder_indices(node_ids(6))
    good = encode_share(x[node_ids(6)[0]], 5)
    for b_share, key_share in (
        (encode_share(x[node_ids(6)[0]] + 1, 5), good),  # another holder's x
        (good, encode_share(x[node_ids(6)[0]], PRIME)),  # not below p
        (good, encode_share(0, 5)),
    ):
        round_, u, _, requests = _stage_requests()
        request = dict(requests[u])
        sender = request["senders"][0]
        forged = _forged_token(round_, sender, u, b_share, key_share)
        request["tokens"] = [forged, *request["tokens"][1:]]
        with pytest.raises(SecAggRefusal, match="does not hold a share at this node's x = "):
            round_.clients[u].masked_input(request, PRIMES, DEGREE)
        assert STOPPED in round_.clients[u].state.rounds[ROUND].stages
    round_, u, _, requests = _stage_requests()  # control: good shares at its x are taken
    request = dict(requests[u])
    request["tokens"] = [
        _forged_token(round_, request["senders"][0], u, good, good),
        *request["tokens"][1:],
    ]
    round_.clients[u].masked_input(request, PRIMES, DEGREE)


def _other_views(round_):
    """View digests of round 7 that differ from the round's one view in one thing each."""
    keys = round_.book.round_keys(round_.ids, ROUND)
    t = round_.server.threshold
    stranger = SecAggClient(99, ClientState.new())
    last = round_.ids[-1]
    return {
        "another t": view_digest(ROUND, t + 1, keys),
        "another round": view_digest(ROUND + 1, t, keys),
        "one participant fewer": view_digest(
            ROUND, t, {v: k for v, k in keys.items() if v != last}
        ),
        "one participant more": view_digest(
            ROUND, t, {**keys, 99: round_public_keys(stranger.state.master, ROUND)}
        ),
        "another key for one participant": view_digest(
            ROUND, t, {**keys, last: (keys[last][0], round_.book.keys(last, ROUND + 1)[1])}
        ),
    }


def test_a_token_made_for_another_view_of_the_round_is_refused_naming_its_sender():
    """A token that opens under the pair's real key, is bound to (sender, receiver,
    round) and holds good shares at the receiver's x, but carries the digest of a view
    that differs in t, the round, the participants or one key, is refused naming its
    sender, and the round is stopped. Control: the same token with the receiver's own
    view is taken."""
    x = holder_indices(node_ids(6))
    good = encode_share(x[node_ids(6)[0]], 5)
    for what, other in _other_views(Round(6)).items():
        round_, u, _, requests = _stage_requests()
        request = dict(requests[u])
        sender = request["senders"][1]
        forged = _forged_token(round_, sender, u, good, good, view=_other_views(round_)[what])
        request["tokens"] = [request["tokens"][0], forged, *request["tokens"][2:]]
        with pytest.raises(
            SecAggRefusal,
            match=f"tokens: the token from {sender} was made for another view of round {ROUND}",
        ):
            round_.clients[u].masked_input(request, PRIMES, DEGREE)
        record = round_.clients[u].state.rounds[ROUND]
        assert STOPPED in record.stages and record.held == {} and record.self_seed is None, what
        assert other != _view(round_)
    round_, u, _, requests = _stage_requests()
    request = dict(requests[u])
    sender = request["senders"][1]
    request["tokens"][1] = _forged_token(round_, sender, u, good, good, view=_view(round_))
    round_.clients[u].masked_input(request, PRIMES, DEGREE)
    assert round_.clients[u].state.rounds[ROUND].held[sender] == (good, good)


def test_the_view_digest_is_a_function_of_the_whole_view_and_nothing_else():
    """The same view, its members in any order, gives one digest; each field changes it;
    a malformed view is refused."""
    round_ = Round(6)
    keys = round_.book.round_keys(round_.ids, ROUND)
    t = round_.server.threshold
    assert view_digest(ROUND, t, dict(reversed(list(keys.items())))) == _view(round_)
    digests = {_view(round_), *_other_views(round_).values()}
    assert len(digests) == 1 + len(_other_views(round_))
    first = round_.ids[0]
    for bad in (
        {**keys, first: (keys[first][0], bytes(31))},
        {**keys, first: (keys[first][0],)},
        {**keys, -1: keys[first]},
    ):
        with pytest.raises(ValueError):
            view_digest(ROUND, t, bad)


def test_a_threshold_below_the_nodes_rule_or_too_few_neighbours_is_refused():
    round_ = Round(8)
    u = round_.ids[0]
    request = round_.server.share_keys_requests()[u]
    assert request["threshold"] == 5
    for bad in (4, 8, 5.0, True):
        with pytest.raises(SecAggRefusal, match=r"threshold: .* outside \[5, 7\]"):
            round_.clients[u].share_keys({**request, "threshold": bad})
    strict = SecAggClient(u, ClientState.new(), SecAggParams(colluding_fraction=0.3))
    with pytest.raises(SecAggRefusal, match=r"outside \[6, 7\]"):  # its own γ: c = 3
        strict.share_keys(request)
    few = {
        **request,
        "neighbours": request["neighbours"][:3],
        "encryption_keys": request["encryption_keys"][:3],
        "mask_keys": request["mask_keys"][:3],
        "threshold": 3,
    }
    with pytest.raises(SecAggRefusal, match="neighbours: 3 neighbours, below min_neighbours = 4"):
        round_.clients[u].share_keys(few)
    round_.clients[u].share_keys(request)  # refusals changed nothing


def _mutate(request, **changes):
    return {**request, **changes}


SHARE_KEYS_MUTATIONS = [
    (lambda q, u: _mutate(q, round="7"), "round: a round is an integer"),
    (lambda q, u: _mutate(q, round=-1), "round: a round is an integer"),
    (lambda q, u: {**q, "extra": 1}, "exactly the fields"),
    (lambda q, u: {k: v for k, v in q.items() if k != "mask_keys"}, "exactly the fields"),
    (
        lambda q, u: _mutate(q, neighbours=[*q["neighbours"][:-1], q["neighbours"][0]]),
        "neighbours: a node id is repeated",
    ),
    (lambda q, u: _mutate(q, neighbours=[*q["neighbours"][:-1], u]), "neighbours: the node itself"),
    (
        lambda q, u: _mutate(q, neighbours=[*q["neighbours"][:-1], -5]),
        "neighbours: a node id is an integer",
    ),
    (
        lambda q, u: _mutate(q, neighbours=[*q["neighbours"][:-1], 2**64]),
        "neighbours: a node id is an integer",
    ),
    (lambda q, u: _mutate(q, neighbours="1,2,3"), "neighbours: a list of node ids"),
    (
        lambda q, u: _mutate(q, encryption_keys=q["encryption_keys"][:-1]),
        "encryption_keys: a list of 5",
    ),
    (
        lambda q, u: _mutate(q, mask_keys=[*q["mask_keys"][:-1], bytes(31)]),
        "mask_keys: each item must be bytes of length 32",
    ),
    (
        lambda q, u: _mutate(q, mask_keys=[*q["mask_keys"][:-1], "k" * 32]),
        "mask_keys: each item must be bytes",
    ),
    (
        lambda q, u: _mutate(q, mask_keys=[*q["mask_keys"][:-1], q["mask_keys"][0]]),
        "mask_keys: a public key is repeated",
    ),
    (
        lambda q, u: _mutate(q, encryption_keys=[*q["encryption_keys"][:-1], bytes(32)]),
        rf"encryption_keys: the public key is a low-order point \(neighbour {node_ids(6)[-1]}\)",
    ),
    (
        lambda q, u: _mutate(q, mask_keys=[*q["mask_keys"][:-1], bytes(32)]),
        rf"mask_keys: the public key is a low-order point \(neighbour {node_ids(6)[-1]}\)",
    ),
    (
        lambda q, u: _mutate(
            q, mask_keys=[q["mask_keys"][0], _u_bytes(ORDER_8_U[1]), *q["mask_keys"][2:]]
        ),
        rf"mask_keys: the public key is a low-order point \(neighbour {node_ids(6)[2]}\)",
    ),
    (
        lambda q, u: _mutate(
            q, encryption_keys=[_top_bit(q["encryption_keys"][0]), *q["encryption_keys"][1:]]
        ),
        rf"encryption_keys: the public key is not in canonical .*\(neighbour {node_ids(6)[1]}\)",
    ),
    (
        lambda q, u: _mutate(q, mask_keys=[*q["mask_keys"][:-1], _u_bytes(FIELD_PRIME + 1)]),
        rf"mask_keys: the public key is not in canonical form .*\(neighbour {node_ids(6)[-1]}\)",
    ),
]


@pytest.mark.parametrize("mutation,message", SHARE_KEYS_MUTATIONS)
def test_a_malformed_share_keys_request_is_refused_with_its_field_named(mutation, message):
    round_ = Round(6)
    u = round_.ids[0]
    request = round_.server.share_keys_requests()[u]
    client = round_.clients[u]
    before = client.state.to_bytes()
    with pytest.raises(SecAggRefusal, match=message):
        client.share_keys(mutation(request, u))
    assert client.state.to_bytes() == before
    client.share_keys(request)


MASKED_INPUT_MUTATIONS = [
    (lambda q, r: _mutate(q, dropped=[12345]), "dropped: an id is not a neighbour"),
    (
        lambda q, r: _mutate(q, senders=q["senders"][1:], tokens=q["tokens"][1:]),
        "senders: not the neighbours less the dropped",
    ),
    (lambda q, r: _mutate(q, tokens=q["tokens"][1:]), "tokens: a list of 5"),
    (lambda q, r: _mutate(q, tokens=[*q["tokens"][1:], "x"]), "tokens: each item must be bytes"),
    (lambda q, r: _mutate(q, tokens=[*q["tokens"][1:], bytes(2000)]), "tokens: a token is longer"),
    (
        lambda q, r: _mutate(q, senders=[*q["senders"][:-1], q["senders"][0]]),
        "senders: a node id is repeated",
    ),
    (
        lambda q, r: _mutate(
            q, senders=q["senders"][2:], tokens=q["tokens"][2:], dropped=q["senders"][:2]
        ),
        "dropped: 2 neighbours dropped, more than 1",
    ),
    (lambda q, r: _mutate(q, round=r + 1), "round: the node did not answer share-keys of round 8"),
    (lambda q, r: {**q, "survivors": []}, "exactly the fields"),
]


@pytest.mark.parametrize("mutation,message", MASKED_INPUT_MUTATIONS)
def test_a_malformed_masked_input_request_is_refused_with_its_field_named(mutation, message):
    round_, u, _, requests = _stage_requests()
    client = round_.clients[u]
    before = client.state.to_bytes()
    with pytest.raises(SecAggRefusal, match=message):
        client.masked_input(mutation(requests[u], ROUND), PRIMES, DEGREE)
    assert client.state.to_bytes() == before  # a malformed request closes nothing
    client.masked_input(requests[u], PRIMES, DEGREE)


def test_a_bad_ring_is_refused_before_anything_is_opened():
    round_, u, _, requests = _stage_requests()
    for primes, degree in (([], 64), ([2**62], 64), ([PRIMES[0]], 0), ("q", 64)):
        with pytest.raises(SecAggRefusal, match="ring: "):
            round_.clients[u].masked_input(requests[u], primes, degree)


UNMASK_MUTATIONS = [
    (
        lambda q, ids: _mutate(q, dropped=[q["survivors"][1]]),
        "survivors: an id is both a survivor and dropped",
    ),
    (
        lambda q, ids: _mutate(q, survivors=q["survivors"][1:]),
        "survivors: the node itself is not among them",
    ),
    (
        lambda q, ids: _mutate(q, survivors=q["survivors"][:3]),
        "survivors: 3 survivors, fewer than t = 4",
    ),
    (
        lambda q, ids: _mutate(q, survivors=q["survivors"][:4], dropped=q["survivors"][4:]),
        "dropped: 2 peers dropped, more than 1",
    ),
    (lambda q, ids: _mutate(q, dropped=[99]), "dropped: an id is not a peer the node masked with"),
    (
        lambda q, ids: _mutate(q, survivors=[*q["survivors"], 99]),
        "survivors: an id is not a peer the node masked with",
    ),
    (
        lambda q, ids: _mutate(q, survivors=[*q["survivors"], q["survivors"][0]]),
        "survivors: a node id is repeated",
    ),
    (lambda q, ids: _mutate(q, dropped=None), "dropped: a list of node ids"),
    (lambda q, ids: _mutate(q, round=6), "round: the node did not answer masked-input of round 6"),
]


@pytest.mark.parametrize("mutation,message", UNMASK_MUTATIONS)
def test_a_malformed_unmask_request_is_refused_with_its_field_named(mutation, message):
    round_ = Round(6)
    round_.share_keys()
    round_.masked_input()
    u = round_.ids[0]
    request = round_.server.unmask_requests()[u]
    client = round_.clients[u]
    before = client.state.to_bytes()
    with pytest.raises(SecAggRefusal, match=message):
        client.unmask(mutation(request, round_.ids))
    assert client.state.to_bytes() == before
    client.unmask(request)


def test_an_unmask_reply_holds_one_kind_of_share_per_peer():
    """Disjoint S and D, answered once: no peer's b share and key share leave together."""
    round_ = Round(9)
    round_.share_keys()
    round_.masked_input(drop=[round_.ids[3]])
    u = round_.ids[0]
    reply = round_.clients[u].unmask(round_.server.unmask_requests()[u])
    assert reply["mask_key_owners"] == [round_.ids[3]]
    assert not set(reply["self_mask_owners"]) & set(reply["mask_key_owners"])


def test_the_advertised_keys_are_the_ones_each_round_uses():
    client = SecAggClient(5, ClientState.new())
    reply = client.advertise({"first_round": 3, "rounds": 4})
    assert reply["first_round"] == 3 and len(reply["mask_keys"]) == 4
    for offset in range(4):
        enc, mask = round_public_keys(client.state.master, 3 + offset)
        assert (reply["encryption_keys"][offset], reply["mask_keys"][offset]) == (enc, mask)
    assert len(set(reply["mask_keys"]) | set(reply["encryption_keys"])) == 8
    for bad in (
        {"first_round": 3, "rounds": 257},
        {"first_round": 3, "rounds": 0},
        {"first_round": 2**63 - 2, "rounds": 5},
        {"first_round": 3},
    ):
        with pytest.raises(SecAggRefusal):
            client.advertise(bad)
    with pytest.raises(ValueError, match="rounds must be in"):
        PublicKeyBook.advertise_request(1, 257)


def test_a_revealed_mask_key_opens_its_own_round_only():
    round_ = Round(9)
    dropped = round_.ids[4]
    round_.run(drop_masked_input=[dropped])
    _, keys = round_.server.recover_secrets()
    revealed = public_bytes(keys[dropped])
    assert revealed == round_.book.keys(dropped, ROUND)[1]
    assert revealed != round_.book.keys(dropped, ROUND + 1)[1]
    assert (
        public_bytes(round_private_key(round_.clients[dropped].state.master, MASK, ROUND + 1))
        != revealed
    )


# -- keys that are not keys ---------------------------------------------------------------


def _small_order(u):
    """The order of the point with x-coordinate u (curve or twist) if it divides 8, else None.

    Affine x-only doubling on the Montgomery curve y² = x³ + 486662 x² + x:
    x(2P) = (x² − 1)² / (4 x (x² + A x + 1)); a zero denominator is the point at infinity.
    """
    p, a = FIELD_PRIME, 486662
    x = u % p
    for doublings in range(1, 4):
        denominator = 4 * x * (x * x + a * x + 1) % p
        if denominator == 0:
            return 2**doublings
        x = (x * x - 1) ** 2 * pow(denominator, -1, p) % p
    return None


def test_low_order_points_are_refused_by_x25519_and_by_the_key_check():
    """The five low-order u-coordinates (each checked to be of order 2, 4 or 8) give
    an all-zero agreement, which ``cryptography`` refuses for any private key; the key
    check refuses each, naming the field. Genuine keys pass and are of large order."""
    assert [_small_order(u) for u in LOW_ORDER_U] == [2, 4, 4, 8, 8]
    for u in LOW_ORDER_U:
        for _ in range(3):
            with pytest.raises(ValueError):
                X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(_u_bytes(u)))
        with pytest.raises(ValueError, match="mask_keys: the public key is a low-order point"):
            check_public_key(_u_bytes(u), "mask_keys")
    for _ in range(200):
        genuine = public_bytes(X25519PrivateKey.generate())
        assert _small_order(int.from_bytes(genuine, "little")) is None
        check_public_key(genuine, "mask_keys")


def test_non_canonical_keys_are_refused_even_where_x25519_would_take_them():
    """u ≥ 2^255 − 19 or the top bit set: another encoding of some u below p, which
    X25519 reduces or masks (so a dropped node's rebuilt key would never match the
    bytes it advertised). Refused by loading, naming the field."""
    genuine = public_bytes(X25519PrivateKey.generate())
    X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(_top_bit(genuine)))
    for bad in (
        _u_bytes(FIELD_PRIME),
        _u_bytes(FIELD_PRIME + 1),
        _u_bytes(2**255 - 1),
        _top_bit(genuine),
        _top_bit(bytes(32)),
    ):
        for load in (load_public_key, check_public_key):
            with pytest.raises(ValueError, match="encryption_keys: .* not in canonical form"):
                load(bad, "encryption_keys")
    with pytest.raises(ValueError, match="a public key is 32 bytes"):
        load_public_key(genuine[:31], "mask_keys")


def test_the_low_order_probe_finds_every_low_order_point_and_only_those():
    """One agreement with the fixed probe key is zero exactly for low-order points: its
    clamped scalar is a multiple of 8 (the curve's cofactor; the twist's is 4) and of
    neither large prime order, ℓ of the curve's group nor ℓ' of the twist's."""
    scalar = bytearray(keys_module._LOW_ORDER_PROBE.private_bytes_raw())
    scalar[0] &= 248
    scalar[31] = (scalar[31] & 127) | 64
    k = int.from_bytes(scalar, "little")
    order = 2**252 + 27742317777372353535851937790883648493
    twist_order, remainder = divmod(2 * (FIELD_PRIME + 1) - 8 * order, 4)
    assert remainder == 0
    for prime in (order, twist_order):
        assert pow(2, prime - 1, prime) == 1 and k % prime != 0
    assert k % 8 == 0


def test_the_key_book_refuses_an_advertised_reply_holding_a_key_that_is_not_a_key():
    """A low-order or non-canonical key, in either field and any round of the reply,
    refuses the reply whole (node, field and round named): a node that had keys keeps
    them, a new node gets none, so the server never sends such a key to a peer."""
    book = PublicKeyBook()
    request = book.advertise_request(3, 3)
    had, new = SecAggClient(5, ClientState.new()), SecAggClient(6, ClientState.new())
    book.record_advertised(5, request, had.advertise(request))
    kept = [book.keys(5, r) for r in (3, 4, 5)]
    genuine = had.advertise(request)["mask_keys"][0]
    bad_keys = [_u_bytes(u) for u in LOW_ORDER_U] + [_u_bytes(FIELD_PRIME), _top_bit(genuine)]
    for node, client in ((5, had), (6, new)):
        for field in ("encryption_keys", "mask_keys"):
            for bad in bad_keys:
                reply = client.advertise(request)
                reply[field] = [reply[field][0], bad, reply[field][2]]
                with pytest.raises(
                    SecAggReplyError,
                    match=rf"node {node}: {field}: the public key is (a low-order point|not in "
                    r"canonical form).* \(round 4\)",
                ):
                    book.record_advertised(node, request, reply)
    assert [book.keys(5, r) for r in (3, 4, 5)] == kept
    assert book.missing([5, 6], 4) == [6]
    book.record_advertised(6, request, new.advertise(request))
    assert book.missing([5, 6], 4) == []


def test_a_server_round_refuses_a_key_that_is_not_a_key():
    round_ = Round(6)
    keys = round_.book.round_keys(round_.ids, ROUND)
    node = round_.ids[3]
    for bad, field in (
        ((bytes(32), keys[node][1]), "encryption key"),
        ((keys[node][0], _u_bytes(1)), "mask key"),
    ):
        with pytest.raises(
            ValueError, match=f"public_keys: node {node}: {field}: the public key is a low-order"
        ):
            SecAggServerRound(ROUND, {**keys, node: bad})


# -- the server checks every reply -------------------------------------------------------


SHARE_KEYS_REPLY_MUTATIONS = [
    (lambda a: {**a, "round": 8}, "round: not round 7"),
    (lambda a: {**a, "recipients": a["recipients"][1:]}, "recipients: not the ids"),
    (lambda a: {**a, "recipients": list(reversed(a["recipients"]))}, "recipients: not the ids"),
    (
        lambda a: {**a, "tokens": [*a["tokens"][:-1], a["tokens"][-1][:-1]]},
        f"tokens: 5 byte strings of {TOKEN_BYTES}",
    ),
    (lambda a: {**a, "commitment": bytes(31)}, "commitment: 32 bytes expected"),
    (lambda a: {**a, "extra": b""}, "exactly the fields"),
    (lambda a: "reply", "exactly the fields"),
]


@pytest.mark.parametrize("mutation,message", SHARE_KEYS_REPLY_MUTATIONS)
def test_a_malformed_share_keys_reply_drops_its_node_with_a_reason(mutation, message):
    round_ = Round(6)
    bad = round_.ids[2]
    replies = {
        u: round_.clients[u].share_keys(request)
        for u, request in round_.server.share_keys_requests().items()
    }
    replies[bad] = mutation(replies[bad])
    dropped = round_.server.receive_share_keys(replies)
    assert list(dropped) == [bad]
    assert f"node {bad}: " in dropped[bad] and message in dropped[bad]
    round_.masked_input()
    assert "dropped" not in round_.refusals
    round_.unmask()
    assert_exact(round_, round_.server.correction(PRIMES, DEGREE))


def _unmask_replies(round_):
    return {u: round_.clients[u].unmask(q) for u, q in round_.server.unmask_requests().items()}


def test_a_malformed_unmask_reply_is_set_aside_whole():
    round_ = Round(12)
    round_.share_keys()
    round_.masked_input(drop=[round_.ids[11]])
    replies = _unmask_replies(round_)
    a, b, c = round_.ids[0], round_.ids[1], round_.ids[2]
    owner = replies[a]["self_mask_owners"][0]
    other = round_.ids[5]  # another holder's share of the same secret: its index differs
    shares = list(replies[a]["self_mask_shares"])
    shares[0] = replies[other]["self_mask_shares"][replies[other]["self_mask_owners"].index(owner)]
    replies[a] = {**replies[a], "self_mask_shares": shares}
    replies[b] = {**replies[b], "mask_key_owners": []}
    replies[c] = {**replies[c], "round": True}
    rejected = round_.server.receive_unmask(replies)
    assert set(rejected) == {a, b, c}
    assert "self_mask_shares: the share of" in rejected[a] and "has index" in rejected[a]
    assert "mask_key_owners: not the ids" in rejected[b]
    assert "round: not round 7" in rejected[c]
    assert_exact(
        round_, round_.server.correction(PRIMES, DEGREE)
    )  # each secret keeps ≥ 7 = t holders


def test_an_unmask_share_that_is_not_a_field_element_sets_its_reply_aside():
    round_ = Round(12)
    round_.share_keys()
    round_.masked_input(drop=[round_.ids[11]])
    replies = _unmask_replies(round_)
    a = round_.ids[0]
    x, _ = decode_share(replies[a]["mask_key_shares"][0])
    replies[a] = {**replies[a], "mask_key_shares": [encode_share(x, PRIME)]}
    rejected = round_.server.receive_unmask(replies)
    assert list(rejected) == [a]
    assert "mask_key_shares: the share of" in rejected[a] and "not below p" in rejected[a]
    assert_exact(round_, round_.server.correction(PRIMES, DEGREE))


def _corrupt_first_share(reply):
    """The first self-mask share, its value changed (still a field element at its x)."""
    shares = list(reply["self_mask_shares"])
    x, value = decode_share(shares[0])
    shares[0] = encode_share(x, (value + 1) % PRIME)
    return {**reply, "self_mask_shares": shares}


def test_a_corrupt_share_is_outvoted_by_spare_shares_and_voids_the_round_without_them():
    n = 12
    round_ = Round(n)
    round_.share_keys()
    round_.masked_input()
    replies = _unmask_replies(round_)
    first = round_.ids[0]
    victim_owner = replies[first]["self_mask_owners"][0]
    replies[first] = _corrupt_first_share(replies[first])
    assert round_.server.receive_unmask(replies) == {}
    assert_exact(round_, round_.server.correction(PRIMES, DEGREE))

    round_ = Round(n)
    round_.share_keys()
    round_.masked_input()
    t = round_.server.threshold
    replies = _unmask_replies(round_)
    keep = [u for u in round_.ids if u != victim_owner][:t]
    replies = {u: replies[u] for u in [*keep, victim_owner]}
    replies[first] = _corrupt_first_share(replies[first])
    round_.server.receive_unmask(replies)
    with pytest.raises(RoundNotUnmaskedError, match=f"the self-mask seed of {victim_owner}"):
        round_.server.correction(PRIMES, DEGREE)


def test_fewer_survivors_than_t_release_nothing():
    round_ = Round(8)
    round_.share_keys()
    with pytest.raises(RoundNotUnmaskedError, match="4 survivors, fewer than t = 5"):
        round_.server.set_survivors(round_.ids[:4])
    with pytest.raises(ValueError, match="did not share keys"):
        round_.server.set_survivors([*round_.ids[:5], 424242])


# -- cost at n = 100 and 300 -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("n", [100, 300])
def test_print_the_cost_of_share_keys_and_unmask(n):
    """Prints per-client and server seconds; asserts only that the round is exact."""
    round_ = Round(n)
    timings = {"share-keys": [], "masked-input": [], "unmask": []}
    replies = {}
    for u, request in round_.server.share_keys_requests().items():
        start = time.perf_counter()
        replies[u] = round_.clients[u].share_keys(request)
        timings["share-keys"].append(time.perf_counter() - start)
    start = time.perf_counter()
    round_.server.receive_share_keys(replies)
    requests = round_.server.masked_input_requests()
    server_share_keys = time.perf_counter() - start
    dropped = round_.ids[-5:]
    for u, request in requests.items():
        if u in dropped:
            continue
        start = time.perf_counter()
        round_.masks[u] = round_.clients[u].masked_input(request, PRIMES, DEGREE)
        timings["masked-input"].append(time.perf_counter() - start)
    round_.server.set_survivors(round_.masks)
    answers = {}
    for u, request in round_.server.unmask_requests().items():
        start = time.perf_counter()
        answers[u] = round_.clients[u].unmask(request)
        timings["unmask"].append(time.perf_counter() - start)
    start = time.perf_counter()
    round_.server.receive_unmask(answers)
    correction = round_.server.correction(PRIMES, DEGREE)
    server_unmask = time.perf_counter() - start
    start = time.perf_counter()
    correction(0)
    server_chunk = time.perf_counter() - start
    start = time.perf_counter()
    round_.masks[round_.ids[0]](0)
    client_chunk = time.perf_counter() - start
    assert_exact(round_, correction)
    per_client = {stage: float(np.median(values)) for stage, values in timings.items()}
    print(
        f"\nn = {n}, t = {round_.server.threshold}, 5 dropped after share-keys: per client "
        f"(median) share-keys {per_client['share-keys']:.3f} s, masked-input "
        f"{per_client['masked-input']:.3f} s, unmask {per_client['unmask'] * 1e3:.2f} ms, "
        f"one chunk's mask at N = {DEGREE} {client_chunk * 1e3:.1f} ms; server share-keys "
        f"checks and routing {server_share_keys:.3f} s, unmask ({n - 5} seeds, 5 keys "
        f"reconstructed and checked) {server_unmask:.2f} s, one chunk's correction "
        f"{server_chunk * 1e3:.1f} ms"
    )


def _lie_everywhere(reply, seed):
    """Every share of the reply changed to another field element at the same x."""
    rng = np.random.default_rng(seed)
    lied = dict(reply)
    for field in ("self_mask_shares", "mask_key_shares"):
        shares = []
        for share in reply[field]:
            x, value = decode_share(share)
            shares.append(encode_share(x, (value + int(rng.integers(1, 2**62))) % PRIME))
        lied[field] = shares
    return lied


@pytest.mark.parametrize(("n", "liars", "dropped"), [(12, 1, 0), (12, 2, 1), (20, 3, 1)])
def test_holders_lying_on_every_share_are_found_and_the_sum_is_exact(n, liars, dropped):
    """M3 of the attack review: wrong shares, well formed, from a few survivors. The
    server corrects them (a random set of t honest shares checks) and names the liars;
    before, one such holder voided the round."""
    round_ = Round(n)
    round_.share_keys()
    gone = round_.ids[-dropped:] if dropped else []
    round_.masked_input(drop=gone)
    replies = _unmask_replies(round_)
    lying = round_.ids[:liars]
    for i, u in enumerate(lying):
        replies[u] = _lie_everywhere(replies[u], i)
    assert round_.server.receive_unmask(replies) == {}
    assert_exact(round_, round_.server.correction(PRIMES, DEGREE))
    assert round_.server.liars == set(lying)
    assert round_.server.dropped == gone


def test_without_decoding_one_lying_holder_voids_the_round(monkeypatch):
    """The control: without Reed–Solomon decoding, the same single liar voids the round."""
    monkeypatch.setattr(server_module, "decode", lambda points, t: None)
    round_ = Round(12)
    round_.share_keys()
    round_.masked_input()
    replies = _unmask_replies(round_)
    replies[round_.ids[0]] = _lie_everywhere(replies[round_.ids[0]], 0)
    round_.server.receive_unmask(replies)
    with pytest.raises(RoundNotUnmaskedError, match="do not reconstruct"):
        round_.server.correction(PRIMES, DEGREE)


@pytest.mark.parametrize(
    ("m", "t", "wrong"),
    [(6, 4, 1), (12, 7, 2), (94, 53, 5), (94, 53, 20), (189, 105, 10), (189, 105, 42)],
)
def test_decoding_corrects_up_to_half_the_spare_shares(m, t, wrong):
    """Attack review M, F1: the random search failed with c = 10 liars at n = 200 (m = 189,
    t = 105); decoding corrects up to ⌊(m − t)/2⌋ wrong shares, and says None beyond."""
    rng = np.random.default_rng(m + wrong)
    coefficients = [int(c) for c in rng.integers(1, 2**62, size=t)]
    xs = [int(x) for x in rng.choice(np.arange(1, 10_000), size=m, replace=False)]
    points = {x: evaluate(coefficients, x) for x in xs}
    for x in xs[:wrong]:
        points[x] = (points[x] + int(rng.integers(1, 2**62))) % PRIME
    assert decode(points, t) == coefficients
    for x in xs[wrong : (m - t) // 2 + 1]:  # one wrong share more than the bound
        points[x] = (points[x] + 1) % PRIME
    assert decode(points, t) != coefficients
    assert decode(dict(list(points.items())[: t - 1]), t) is None
