"""Secure aggregation's protocol core (issue 20): rounds, dropouts, attacks and refusals.

Real clients and a real server round, masks in a small ring (the default context's two
40-bit primes, degree 64). The attacks play a malicious server against honest nodes:
whatever the nodes accept is tried, and what the server could reconstruct is checked
against the victim's own mask.
"""

import itertools

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from flwr.common.secure_aggregation.crypto.shamir import combine_shares

import lepton_flwr.secagg.client as client_module
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
from lepton_flwr.secagg.keys import (
    MASK,
    commitment,
    pair_seed,
    public_bytes,
    round_private_key,
)

PRIMES = [1099511390209, 1099511480321]  # the default context's two 40-bit data primes
DEGREE = 64
ROUND = 7


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
    try:
        secret = combine_shares(shares[:t] if len(shares) >= t else shares)
    except ValueError:
        return False
    return len(secret) == 32 and check(secret)


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
    seed = combine_shares(b_shares[:2])
    key = X25519PrivateKey.from_private_bytes(combine_shares(key_shares[:2]))
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
    seed = combine_shares(b_shares[:t])
    assert commitment(victim, round_.r, seed) == round_.server._commitments[victim]
    victim_public = X25519PublicKey.from_public_bytes(round_.book.keys(victim, round_.r)[1])
    terms = []
    for peer in found["senders"]:
        if peer == colluder:
            private = round_private_key(round_.clients[colluder].state.master, MASK, round_.r)
        else:
            private = X25519PrivateKey.from_private_bytes(combine_shares(key_shares[peer][:t]))
        seed_uv = pair_seed(private, victim_public, round_.r, peer, victim)
        terms.append((1 if victim < peer else -1, seed_uv))
    rebuilt = MaskSum(round_.r, [seed], terms, PRIMES, DEGREE)
    np.testing.assert_array_equal(rebuilt(0), found["mask"](0))
