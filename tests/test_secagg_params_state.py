"""Secure aggregation's threshold rules and the node's state (issue 20)."""

import base64
import json
import math

import pytest

from lepton_flwr.secagg import (
    ClientState,
    SecAggClient,
    SecAggParams,
    SecAggParamsError,
    SecAggRefusal,
    SecAggServerRound,
    SecAggStateError,
    colluders,
    max_dropouts,
    smallest_exposed_sum,
    threshold,
    tolerated_dropouts,
)
from lepton_flwr.secagg.keys import round_public_keys
from lepton_flwr.secagg.shamir import PRIME, encode_share
from lepton_flwr.secagg.state import KEEP_ROUNDS

PRIMES = [1099511390209, 1099511480321]

# -- the threshold rules -----------------------------------------------------------------


@pytest.mark.parametrize(
    "n,t", [(5, 4), (6, 4), (8, 5), (10, 6), (12, 7), (20, 11), (100, 53), (1000, 525)]
)
def test_the_default_thresholds(n, t):
    assert threshold(n, SecAggParams()) == t


@pytest.mark.parametrize("gamma,delta", [(0.05, 0.1), (0.0, 0.0), (0.1, 0.2), (0.2, 0.05)])
def test_the_threshold_is_the_smallest_meeting_both_rules(gamma, delta):
    params = SecAggParams(colluding_fraction=gamma, dropout_fraction=delta)

    def safe(n, t):
        c, d = colluders(n, params), max_dropouts(n, params)
        own_secrets = 2 * (t - c) > n - 1 - c  # honest holders cannot give t − c of both
        peer_keys = (n - 1 - c - d) * (t - c) > (n - c) * d
        return t <= n - 1 and own_secrets and peer_keys

    for n in range(3, 300):
        try:
            t = threshold(n, params)
        except SecAggParamsError:
            assert not any(safe(n, t) for t in range(1, n))
            continue
        assert safe(n, t) and not safe(n, t - 1)
        assert t >= colluders(n, params) + 1  # the honest-but-curious bound is covered


def test_rule_two_raises_the_threshold_where_the_majority_rule_alone_leaks():
    params = SecAggParams()
    majority = [
        n for n in range(5, 200) if threshold(n, params) != (n - 1 + colluders(n, params)) // 2 + 1
    ]
    assert majority == [5]


def test_fractions_are_read_as_decimals():
    """0.07 × 100 is 7.000000000000001 in floats; the rule reads it as 7."""
    params = SecAggParams(colluding_fraction=0.07, dropout_fraction=0.07)
    assert math.ceil(0.07 * 100) == 8
    assert colluders(100, params) == 7 and max_dropouts(100, params) == 7


def test_tolerated_dropouts_and_validation_name_the_numbers():
    params = SecAggParams()
    assert params.validate(100) == 53 and tolerated_dropouts(100, params) == 10
    assert params.validate(6) == 4 and tolerated_dropouts(6, params) == 1
    assert tolerated_dropouts(5, params) == 0
    with pytest.raises(SecAggParamsError, match=r"ceil\(δ n\) = 1 .* n − 1 − t = 0"):
        params.validate(5)
    assert SecAggParams(dropout_fraction=0.0).validate(5) == 3
    with pytest.raises(SecAggParamsError, match="below min_neighbours = 4"):
        params.validate(4)
    with pytest.raises(SecAggParamsError, match="no threshold"):
        threshold(3, params)
    with pytest.raises(SecAggParamsError, match=r"ceil\(δ n\) = 3 .* t = 7 .* n − 1 − t = 2"):
        SecAggParams(dropout_fraction=0.3).validate(10)
    with pytest.raises(SecAggParamsError, match="no threshold t ≤ n − 1 = 19"):
        SecAggParams(dropout_fraction=0.45).validate(20)


def test_the_smallest_sum_a_malicious_server_could_unmask():
    params = SecAggParams()
    assert smallest_exposed_sum(100, params) == 66
    assert smallest_exposed_sum(1000, params) == 650
    no_dropouts = SecAggParams(dropout_fraction=0.0)
    assert smallest_exposed_sum(20, no_dropouts) == 20 - colluders(20, no_dropouts)
    for n in range(6, 200):
        size = smallest_exposed_sum(n, params)
        c, d, t = colluders(n, params), max_dropouts(n, params), threshold(n, params)
        assert (n - c - d - (size - 1)) * (t - c) > (n - c) * d >= (n - c - d - size) * (t - c)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"colluding_fraction": 0.5},
        {"colluding_fraction": -0.01},
        {"colluding_fraction": True},
        {"dropout_fraction": float("nan")},
        {"dropout_fraction": "0.1"},
        {"min_neighbours": 1},
        {"min_neighbours": 4.0},
    ],
)
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(SecAggParamsError):
        SecAggParams(**kwargs)


# -- the node's state --------------------------------------------------------------------


def _round_of(n=6, server_round=3):
    ids = list(range(10, 10 + n))
    clients = {u: SecAggClient(u, ClientState.new()) for u in ids}
    keys = {u: round_public_keys(c.state.master, server_round) for u, c in clients.items()}
    server = SecAggServerRound(server_round, keys)
    return ids, clients, server


def test_the_state_keeps_only_what_the_next_stage_needs_and_round_trips():
    ids, clients, server = _round_of()
    u = ids[0]
    replies = {v: clients[v].share_keys(q) for v, q in server.share_keys_requests().items()}
    record = clients[u].state.rounds[3]
    assert record.self_seed and len(record.neighbours) == 5 and record.held == {}
    restored = ClientState.from_bytes(clients[u].state.to_bytes())
    assert restored == clients[u].state
    server.receive_share_keys(replies)
    requests = server.masked_input_requests()
    for v in ids:
        clients[v].masked_input(requests[v], PRIMES, 64)
    assert record.self_seed is None and record.neighbours == {} and len(record.held) == 5
    assert ClientState.from_bytes(clients[u].state.to_bytes()) == clients[u].state
    server.set_survivors(ids)
    clients[u].unmask(server.unmask_requests()[u])
    assert record.held == {} and record.stages == {"share-keys", "masked-input", "unmask"}
    assert ClientState.from_bytes(clients[u].state.to_bytes()) == clients[u].state
    assert ClientState.new().master != ClientState.new().master


def test_pruned_rounds_stay_closed_to_every_stage():
    ids, clients, _ = _round_of()
    u = ids[0]
    first_requests = {}
    for server_round in range(1, KEEP_ROUNDS + 2):
        keys = {v: round_public_keys(c.state.master, server_round) for v, c in clients.items()}
        server = SecAggServerRound(server_round, keys)
        requests = server.share_keys_requests()
        first_requests[server_round] = requests[u]
        clients[u].share_keys(requests[u])
    state = clients[u].state
    assert sorted(state.rounds) == list(range(2, KEEP_ROUNDS + 2)) and state.closed_through == 1
    restored = SecAggClient(u, ClientState.from_bytes(state.to_bytes()))
    for client in (clients[u], restored):
        with pytest.raises(SecAggRefusal, match="round: round 1 is closed"):
            client.share_keys(first_requests[1])
        with pytest.raises(SecAggRefusal, match="round: round 1 is closed"):
            client.unmask({"round": 1, "survivors": ids, "dropped": []})


def _document():
    ids, clients, server = _round_of()
    clients[ids[0]].share_keys(server.share_keys_requests()[ids[0]])
    return json.loads(clients[ids[0]].state.to_bytes())


def _mutated(change):
    document = _document()
    change(document)
    return json.dumps(document).encode()


def _b64_share(x, value):
    return base64.b64encode(encode_share(x, value)).decode()


_ZERO_SHARE = _b64_share(1, 0)


def _record(document):
    return document["rounds"]["3"]


HOSTILE_STATES = [
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "must be an object"),
    (b"x" * (4 << 20 | 1), "at most"),
    (_mutated(lambda d: d.update(version=1)), "version-2"),
    (_mutated(lambda d: d.pop("master")), "must be an object with keys"),
    (_mutated(lambda d: d.update(master=base64.b64encode(bytes(31)).decode())), "31 bytes, not 32"),
    (_mutated(lambda d: d.update(master="!!")), "not base64"),
    (_mutated(lambda d: d.update(master=7)), "not a base64 string"),
    (_mutated(lambda d: d.update(closed_through=-2)), "closed_through"),
    (_mutated(lambda d: d.update(closed_through=True)), "closed_through"),
    (_mutated(lambda d: d.update(closed_through=3)), "round 3 is kept but closed"),
    (
        _mutated(lambda d: d["rounds"].update({str(i): _record(d) for i in range(4, 9)})),
        "at most 4",
    ),
    (_mutated(lambda d: d["rounds"].update({"03": d["rounds"].pop("3")})), "not a decimal number"),
    (
        _mutated(lambda d: d["rounds"].update({"9" * 30: d["rounds"].pop("3")})),
        "not a decimal number",
    ),
    (_mutated(lambda d: d["rounds"].update({"-3": d["rounds"].pop("3")})), "not a decimal number"),
    (_mutated(lambda d: _record(d).update(threshold=6)), "threshold is not in"),
    (_mutated(lambda d: _record(d).update(threshold=True)), "threshold is not in"),
    (_mutated(lambda d: _record(d).update(participants=1)), "participants"),
    (_mutated(lambda d: _record(d).update(stages=["share-keys", "decrypt"])), "stages must list"),
    (_mutated(lambda d: _record(d).update(senders=[1, 1])), "senders must list distinct"),
    (_mutated(lambda d: _record(d).update(self_seed="AAAA")), "self_seed is 3 bytes"),
    (_mutated(lambda d: _record(d)["neighbours"].update({"11": ["AAAA"]})), "not a pair"),
    (_mutated(lambda d: _record(d).update(held={"11": ["AAAA", "AAAA"]})), "held.11 is 3 bytes"),
    (
        _mutated(lambda d: _record(d).update(held={"11": [_b64_share(1, PRIME), _ZERO_SHARE]})),
        "held.11: a share's x is 0 or its value is not below p",
    ),
    (
        _mutated(lambda d: _record(d).update(held={"11": [_b64_share(1, 5), _b64_share(0, 5)]})),
        "held.11: a share's x is 0",
    ),
    (_mutated(lambda d: _record(d).pop("held")), "must be an object with keys"),
]


@pytest.mark.parametrize("data,message", HOSTILE_STATES)
def test_a_corrupt_or_hostile_state_is_refused_with_a_reason(data, message):
    with pytest.raises(SecAggStateError, match=message):
        ClientState.from_bytes(data)


def test_the_unchanged_document_parses():
    """The mutations above start from a document that parses."""
    ClientState.from_bytes(json.dumps(_document()).encode())
