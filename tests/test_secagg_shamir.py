"""Shamir sharing over GF(2^521 − 1) (issue 20): the field, secrecy, global x-coordinates.

The field's modulus is checked prime by the Lucas–Lehmer test (a proof for Mersenne
numbers); t − 1 shares are checked to say nothing about the secret, exhaustively in a
small field and constructively in the real one; the server's Lagrange coefficients are
checked to be computed once per round.
"""

import itertools
import os
from collections import Counter

import pytest

import lepton_flwr.secagg.server as server_module
import lepton_flwr.secagg.shamir as shamir
from lepton_flwr.secagg import ClientState, PublicKeyBook, SecAggClient, SecAggServerRound
from lepton_flwr.secagg.shamir import (
    PRIME,
    SHARE_BYTES,
    LagrangeAtZero,
    combine,
    decode_share,
    encode_share,
    holder_indices,
    interpolate_at_zero,
    split,
)

PRIMES = [1099511390209, 1099511480321]
DEGREE = 64


def lucas_lehmer(exponent):
    """Whether 2^exponent − 1 is prime, for an odd prime exponent (Lucas–Lehmer)."""
    mersenne = (1 << exponent) - 1
    s = 4
    for _ in range(exponent - 2):
        s = (s * s - 2) % mersenne
    return s == 0


def test_the_modulus_is_the_mersenne_prime_2_521_minus_1():
    assert PRIME == 2**521 - 1
    assert lucas_lehmer(521)
    assert not lucas_lehmer(523)  # control: 523 is prime, 2^523 − 1 is not
    assert PRIME > 2**256  # a 32-byte secret is one field element


def test_a_share_is_70_bytes_index_first():
    shares = split(bytes(range(32)), 3, [1, 2, 7, 9])
    assert SHARE_BYTES == 4 + 66 and all(len(share) == SHARE_BYTES for share in shares)
    assert [decode_share(share)[0] for share in shares] == [1, 2, 7, 9]


def test_any_t_shares_rebuild_the_secret_and_t_minus_1_do_not():
    secret = os.urandom(32)
    t, xs = 5, [1, 2, 4, 5, 6, 8, 9, 10, 12]  # 3, 7, 11 are not holders
    shares = split(secret, t, xs)
    for subset in itertools.combinations(shares, t):
        assert combine(list(subset)) == secret
    assert combine(shares) == secret  # more than t: the same polynomial
    for subset in itertools.combinations(shares, t - 1):
        assert combine(list(subset)) != secret


def test_split_draws_t_minus_1_coefficients_uniform_in_the_field(monkeypatch):
    """Exactly t − 1 draws from ``secrets.randbelow(p)``; shares are f(x) of that f."""
    calls = []
    values = iter([PRIME - 1, 12345, 2**400 + 7])

    def record(bound):
        calls.append(bound)
        return next(values)

    monkeypatch.setattr(shamir.secrets, "randbelow", record)
    secret = bytes([0xAB] * 32)
    shares = split(secret, 4, [3, 5, 6, 11])
    assert calls == [PRIME] * 3
    s = int.from_bytes(secret, "big")
    for share in shares:
        x, value = decode_share(share)
        expected = (s + (PRIME - 1) * x + 12345 * x**2 + (2**400 + 7) * x**3) % PRIME
        assert value == expected


@pytest.mark.parametrize("prime,t,xs", [(11, 3, (2, 5)), (7, 4, (1, 3, 6)), (13, 2, (4,))])
def test_t_minus_1_shares_are_uniform_whatever_the_secret_small_field(prime, t, xs):
    """Exhaustive over a small field: for every secret, the t − 1 shares over all
    coefficient vectors hit every possible share vector exactly once (a bijection), so
    their distribution does not depend on the secret."""
    everything = set(itertools.product(range(prime), repeat=t - 1))
    for secret in range(prime):
        seen = Counter(
            tuple(shamir._evaluate(secret, coefficients, x, prime) for x in xs)
            for coefficients in itertools.product(range(prime), repeat=t - 1)
        )
        assert set(seen) == everything and set(seen.values()) == {1}


def _value_at(points, x, prime=PRIME):
    """The interpolating polynomial through ``points`` (x -> y), evaluated at ``x``."""
    total = 0
    for x_i, y_i in points.items():
        term = y_i
        for x_j in points:
            if x_j != x_i:
                term = term * (x - x_j) % prime * pow(x_i - x_j, -1, prime) % prime
        total += term
    return total % prime


def test_t_minus_1_real_shares_are_consistent_with_every_candidate_secret():
    """For any s', the polynomial through (0, s') and t − 1 shares has degree < t: a t-th
    holder's share exists that makes the t shares rebuild s'."""
    secret, t = os.urandom(32), 6
    shares = split(secret, t, [1, 2, 3, 5, 8, 13, 21])
    seen = dict(decode_share(share) for share in shares[: t - 1])
    x_t = decode_share(shares[t - 1])[0]
    for candidate in (bytes(32), b"\xff" * 32, os.urandom(32), secret):
        points = {0: int.from_bytes(candidate, "big"), **seen}
        forged = encode_share(x_t, _value_at(points, x_t))
        assert combine([*shares[: t - 1], forged]) == candidate
    assert combine(shares[:t]) == secret  # and the real t-th share rebuilds the real one


def test_lagrange_without_one_point_equals_the_coefficients_of_the_smaller_set():
    xs = [1, 2, 3, 5, 8, 9, 40]
    basis = LagrangeAtZero(xs)
    for x in xs:
        assert basis.without(x) == LagrangeAtZero([v for v in xs if v != x]).coefficients
    assert basis.without(4) == basis.coefficients  # not in the set
    # f(0) = Σ λ f(x) on a polynomial of degree 6
    f = [17, 3, 0, 9, 2**300, 5, 1]
    points = {x: sum(c * x**k for k, c in enumerate(f)) % PRIME for x in xs}
    assert interpolate_at_zero(basis.coefficients, points) == 17
    with pytest.raises(ValueError, match="not at the coefficients"):
        interpolate_at_zero(basis.without(9), points)


@pytest.mark.parametrize(
    "share,message",
    [
        (encode_share(3, 5)[:-1], "70 bytes"),
        ("share", "70 bytes"),
        (encode_share(0, 5), "x is 0"),
        (encode_share(3, PRIME), "not below p"),
    ],
)
def test_a_malformed_share_is_refused(share, message):
    with pytest.raises(ValueError, match=message):
        decode_share(share)


def test_bad_split_arguments_are_refused():
    with pytest.raises(ValueError, match="32 bytes"):
        split(bytes(31), 2, [1, 2])
    for t in (0, 4, True, 2.0):
        with pytest.raises(ValueError, match="threshold"):
            split(bytes(32), t, [1, 2, 3])
    for xs in ([1, 1, 2], [0, 1, 2], [1, 2, 2**32]):
        with pytest.raises(ValueError, match="distinct"):
            split(bytes(32), 2, xs)
    with pytest.raises(ValueError, match="same x"):
        combine(split(bytes(32), 2, [1, 2])[:1] * 2)


# -- global x-coordinates in a round ------------------------------------------------------


def _ids(n):
    return [10 + 37 * i for i in range(n)]


def _round(n, server_round=3):
    ids = _ids(n)
    clients = {u: SecAggClient(u, ClientState.new()) for u in ids}
    book = PublicKeyBook()
    request = book.advertise_request(server_round, 1)
    for u, client in clients.items():
        book.record_advertised(u, request, client.advertise(request))
    server = SecAggServerRound(server_round, book.round_keys(ids, server_round))
    replies = {u: clients[u].share_keys(q) for u, q in server.share_keys_requests().items()}
    server.receive_share_keys(replies)
    return ids, clients, server


def test_every_owner_gives_a_holder_its_place_in_the_round_and_skips_its_own_x():
    n, r = 9, 3
    ids, clients, server = _round(n, r)
    masks = {}
    for u, request in server.masked_input_requests().items():
        masks[u] = clients[u].masked_input(request, PRIMES, DEGREE)
    index = holder_indices(ids)
    assert sorted(index.values()) == list(range(1, n + 1))
    by_owner = {owner: set() for owner in ids}
    for holder in ids:
        for owner, (b_share, key_share) in clients[holder].state.rounds[r].held.items():
            assert decode_share(b_share)[0] == decode_share(key_share)[0] == index[holder]
            by_owner[owner].add(index[holder])
    for owner, xs in by_owner.items():
        assert xs == set(range(1, n + 1)) - {index[owner]}  # every other x, never its own


def _full_round(n, drop=(), corrupt=None):
    ids, clients, server = _round(n)
    masks = {}
    for u, request in server.masked_input_requests().items():
        if u not in drop:
            masks[u] = clients[u].masked_input(request, PRIMES, DEGREE)
    server.set_survivors(masks)
    replies = {u: clients[u].unmask(q) for u, q in server.unmask_requests().items()}
    if corrupt is not None:
        reply = replies[corrupt]
        x, value = decode_share(reply["self_mask_shares"][0])
        shares = [encode_share(x, value ^ 1), *reply["self_mask_shares"][1:]]
        replies[corrupt] = {**reply, "self_mask_shares": shares}
    assert server.receive_unmask(replies) == {}
    return ids, server


def test_the_server_computes_lagrange_coefficients_once_per_round(monkeypatch):
    """Every owner's holders are the answering survivors (less itself): one O(m²)
    computation serves the 10 seeds and 2 keys; a corrupt share costs its own subsets."""
    built = []

    class Counting(LagrangeAtZero):
        def __init__(self, indices, prime=PRIME):
            built.append(tuple(sorted(indices)))
            super().__init__(indices, prime)

    monkeypatch.setattr(server_module, "LagrangeAtZero", Counting)
    dropped = [_ids(12)[3], _ids(12)[7]]
    _, server = _full_round(12, drop=dropped)
    seeds, keys = server.recover_secrets()
    assert len(seeds) == 10 and set(keys) == set(dropped)
    assert len(built) == 1 and len(built[0]) == 10

    built.clear()
    _, server = _full_round(12, corrupt=_ids(12)[0])  # the first holder lies about one seed
    seeds, _ = server.recover_secrets()
    assert len(seeds) == 12 and server.liars == {_ids(12)[0]}
    # The round's set; that one owner's shares decoded (no more coefficient sets); then,
    # if secrets remain, the round's set less the liar, once.
    assert len(built[0]) == 12 and [len(b) for b in built[1:]] in ([], [11])


def test_a_nodes_two_secrets_lie_on_independent_polynomials(monkeypatch):
    """2(t − 1) fresh draws per share-keys; one shared set of coefficients would make
    f_b(x) − f_key(x) = b − sk the same at every x, and each holder holds both shares."""
    ids, clients, server = _round(9)
    draws = []
    real = shamir.secrets.randbelow

    def counted(bound):
        draws.append(bound)
        return real(bound)

    monkeypatch.setattr(shamir.secrets, "randbelow", counted)
    fresh = _round(9)  # a new round: 9 nodes' share-keys
    assert draws == [PRIME] * (9 * 2 * (fresh[2].threshold - 1))
    for u, request in server.masked_input_requests().items():
        clients[u].masked_input(request, PRIMES, DEGREE)
    owner = ids[0]
    differences = set()
    for holder in ids[1:]:
        b_share, key_share = clients[holder].state.rounds[3].held[owner]
        differences.add((decode_share(b_share)[1] - decode_share(key_share)[1]) % PRIME)
    assert len(differences) == len(ids) - 1
