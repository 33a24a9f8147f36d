"""Secure aggregation (issue 20) under adversarial reviews: the defences the attacks met.

Each test plays a hostile server (or client) against honest nodes and checks a defence
that the attacks of the reviews ran into: stages answered once whatever order the rounds
come in, a merged exchange that answers each stage on its own, a node that refuses a
genuine token cut for another view of the round, stage messages with hostile fields that
end in a refusal, never an unexpected exception, and two findings of the second review
turned into regressions: a server that shows nodes split views of a round (it read one
upload with no colluder before tokens carried their sender's view), and a client that
advertises keys that are not keys (it voided every round it joined).
"""

import itertools
import logging
import random

import numpy as np
import pytest
from conftest import flooding_atol
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
from lepton_flwr.strategies import HEFedAvg

import lepton_flwr.secagg.client as client_module
from lepton_flwr import protocol
from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.he import CKKSParams, decrypt_arrays, write_keys
from lepton_flwr.mods import make_he_mod
from lepton_flwr.mods.common import ModError
from lepton_flwr.mods.secagg_stages import answer_stage
from lepton_flwr.secagg import (
    ClientState,
    MaskSum,
    PublicKeyBook,
    SecAggClient,
    SecAggParams,
    SecAggRefusal,
    threshold,
)
from lepton_flwr.secagg.keys import commitment, pair_seed, public_bytes
from lepton_flwr.secagg.shamir import combine
from lepton_flwr.secagg.state import KEEP_ROUNDS, SHARE_KEYS, STOPPED, UNMASK
from lepton_flwr.secagg.wire import EMPTY_LISTS, REFUSED, REPLY_KEY, as_config, fields

PRIMES = [1099511390209, 1099511480321]  # the default context's two 40-bit data primes
DEGREE = 64


def _nodes(ids, rounds):
    """Fresh clients for ``ids`` and a key book holding their keys for ``rounds``."""
    clients = {u: SecAggClient(u, ClientState.new()) for u in ids}
    book = PublicKeyBook()
    request = book.advertise_request(rounds[0], rounds[1] - rounds[0] + 1)
    for u, client in clients.items():
        book.record_advertised(u, request, client.advertise(request))
    return clients, book


def _share_keys_request(book, node, neighbours, server_round):
    """A well-formed share-keys request for ``node``, its view being ``neighbours``."""
    return {
        "round": server_round,
        "threshold": threshold(len(neighbours) + 1, SecAggParams()),
        "neighbours": list(neighbours),
        "encryption_keys": [book.keys(v, server_round)[0] for v in neighbours],
        "mask_keys": [book.keys(v, server_round)[1] for v in neighbours],
        "signers": [book.signatures([v], server_round)[v][0] for v in neighbours],
        "signatures": [book.signatures([v], server_round)[v][1] for v in neighbours],
    }


def test_no_order_of_round_numbers_gets_a_stage_answered_twice():
    """A server sending share-keys for rounds in any order (repeats, far ahead, below
    the kept ones), with the state restored from bytes before every message, never
    gets one round's share-keys answered twice: each stage once per round, ever, is
    what the state promises (``lepton_flwr.secagg.state``)."""
    rng = random.Random(20)
    ids = [11, 22, 33, 44, 55]
    u, neighbours = ids[0], ids[1:]
    clients, book = _nodes(ids, (1, 60))
    saved = clients[u].state.to_bytes()
    answered = []
    for _ in range(150):
        server_round = rng.choice([rng.randint(1, 60), max(answered, default=1), 1, 60])
        client = SecAggClient(u, ClientState.from_bytes(saved))
        try:
            client.share_keys(_share_keys_request(book, u, neighbours, server_round))
        except SecAggRefusal as refusal:
            assert "answered before" in str(refusal) or "is closed" in str(refusal)
        else:
            answered.append(server_round)
        saved = client.state.to_bytes()
    assert len(answered) == len(set(answered)) and len(answered) > KEEP_ROUNDS
    state = ClientState.from_bytes(saved)
    assert all(r in state.rounds or state.is_closed(r) for r in answered)


@pytest.fixture
def task_identity():
    """Flower's Message needs a task identity outside a running app."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _stage_message(node, by_stage, message_id):
    config = {protocol.SECAGG_STAGE: ",".join(by_stage), **as_config(by_stage)}
    msg = Message(
        RecordDict({"config": ConfigRecord(config)}), dst_node_id=node, message_type="train"
    )
    msg.metadata.__dict__["_message_id"] = message_id
    return msg


def _masked_round(ids, book, clients, server_round):
    """Share-keys and masked input for every node, everyone in one view."""
    tokens = {}
    for u in ids:
        peers = [v for v in ids if v != u]
        reply = clients[u].share_keys(_share_keys_request(book, u, peers, server_round))
        for peer, token in zip(reply["recipients"], reply["tokens"], strict=True):
            tokens[(u, peer)] = token
    for u in ids:
        senders = [v for v in ids if v != u]
        request = {
            "round": server_round,
            "senders": senders,
            "tokens": [tokens[(v, u)] for v in senders],
            "dropped": [],
        }
        clients[u].masked_input(request, PRIMES, DEGREE)


def test_a_merged_exchange_answers_each_stage_on_its_own(task_identity):
    """Round 3's unmask (malformed: the node is not among the survivors) and round 4's
    share-keys in one message: the unmask is refused and recorded nowhere, the
    share-keys answered and recorded; round 3's unmask, asked again properly, is then
    answered once and only once."""
    ids = [101, 102, 103, 104, 105, 106]
    clients, book = _nodes(ids, (3, 4))
    _masked_round(ids, book, clients, 3)
    u = ids[0]
    context = Context(run_id=1, node_id=u, node_config={}, state=RecordDict(), run_config={})
    context.state[protocol.SECAGG_STATE] = ConfigRecord({"state": clients[u].state.to_bytes()})
    bad_unmask = {"round": 3, "survivors": ids[1:], "dropped": []}
    share_keys = _share_keys_request(book, u, ids[1:], 4)
    reply = answer_stage(
        _stage_message(u, {"unmask": bad_unmask, "share-keys": share_keys}, "m1"), context
    )
    record = reply.content.config_records[REPLY_KEY]
    assert "the node itself is not among them" in fields(record, "unmask")[REFUSED]
    assert len(fields(record, "share-keys")["tokens"]) == 5
    state = ClientState.from_bytes(context.state.config_records[protocol.SECAGG_STATE]["state"])
    assert UNMASK not in state.rounds[3].stages and SHARE_KEYS in state.rounds[4].stages
    good_unmask = {"round": 3, "survivors": ids, "dropped": []}
    first = answer_stage(_stage_message(u, {"unmask": good_unmask}, "m2"), context)
    assert len(fields(first.content.config_records[REPLY_KEY], "unmask")["self_mask_shares"]) == 5
    again = answer_stage(_stage_message(u, {"unmask": good_unmask}, "m3"), context)
    assert "answered before" in fields(again.content.config_records[REPLY_KEY], "unmask")[REFUSED]


def _receiver_request(extra):
    """Round 9 of six nodes; the second one is shown ``extra`` too (None: nobody).

    Returns the first node's client and its masked-input request.
    """
    ids = [10, 20, 30, 40, 50, 60]
    clients, book = _nodes([*ids, 5], (9, 9))
    receiver, sender = ids[0], ids[1]
    tokens = {}
    for u in ids:
        view = [v for v in ids if v != u] + ([extra] if u == sender and extra else [])
        reply = clients[u].share_keys(_share_keys_request(book, u, view, 9))
        for peer, token in zip(reply["recipients"], reply["tokens"], strict=True):
            tokens[(u, peer)] = token
    senders = [v for v in ids if v != receiver]
    request = {
        "round": 9,
        "senders": senders,
        "tokens": [tokens[(v, receiver)] for v in senders],
        "dropped": [],
    }
    return clients[receiver], request


def test_a_genuine_token_cut_for_another_view_of_the_round_is_refused():
    """The server shows one sender a round with an extra participant (id 5): the
    sender's honest token carries the digest of that view, not the receiver's, so the
    receiver refuses it naming the sender and stops the round. Control: the same round
    with one view for all is taken."""
    receiver, request = _receiver_request(extra=5)
    with pytest.raises(SecAggRefusal, match="tokens: the token from 20 was made for another view"):
        receiver.masked_input(request, PRIMES, DEGREE)
    assert STOPPED in receiver.state.rounds[9].stages
    receiver, request = _receiver_request(extra=None)
    receiver.masked_input(request, PRIMES, DEGREE)
    assert len(receiver.state.rounds[9].held) == 5


HOSTILE_VALUES = [-1, 2**63, 1.5, True, "", "x" * 5000, b"\x00" * 5000, [b"a"], ["s"], [1.5]]
HOSTILE_STAGES = ["advertise,advertise", "masked-input", "", ",", "ADVERTISE", "unmask,"]
HOSTILE_EMPTIES = ["advertise.rounds,advertise.rounds", ",,,", "unmask.survivors"]


@pytest.mark.parametrize("field", ["first_round", "rounds", "round", "survivors", "neighbours"])
def test_hostile_stage_messages_end_in_a_refusal_or_a_mod_error(task_identity, field):
    """Hostile stage names, empty-list encodings and field values, in real
    ConfigRecords: he_mod's stage answer replies (refusals inside, naming the field) or
    raises ModError (an error reply naming the reason); nothing else escapes."""
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    cases = itertools.chain(
        itertools.product(["advertise", "share-keys", "unmask"], [None], HOSTILE_VALUES),
        itertools.product(HOSTILE_STAGES, [None], [3]),
        itertools.product(["advertise", "unmask"], HOSTILE_EMPTIES, [3]),
    )
    for i, (stage, empty, value) in enumerate(cases):
        config = {protocol.SECAGG_STAGE: stage}
        for name in ("advertise", "share-keys", "unmask"):
            config[f"lepton-secagg.{name}.{field}"] = value
        if empty is not None:
            config[EMPTY_LISTS] = empty
        msg = Message(
            RecordDict({"config": ConfigRecord(config)}), dst_node_id=5, message_type="train"
        )
        msg.metadata.__dict__["_message_id"] = f"m{i}"
        try:
            reply = answer_stage(msg, context)
        except ModError:
            continue
        answers = reply.content.config_records[REPLY_KEY]
        for name in stage.split(","):
            answer = fields(answers, name)
            assert REFUSED in answer or set(answer) == {
                "first_round",
                "encryption_keys",
                "mask_keys",
            }


# -- split views (the second review's A1) ------------------------------------------------

SPLIT_ROUND = 3


def _split_views():
    """The review's split views: 26 honest nodes, genuine keys, no colluder.

    The victim u sees u and five peers v_1..v_5 (n = 6, t = 4, d = 1); each v_i sees u
    and four nodes of its own A_i (n = 6); each a in A_i sees v_i and the rest of A_i
    (n = 5, t = 4). The ids make each node's place (its x) the same in every view that
    holds it, so the x-check of a token cannot tell the views apart.

    Returns
    -------
    tuple
        (victim, its peers, A by peer, view by node, clients, key book)
    """
    victim = 10**6
    peers = [100 * i for i in range(1, 6)]
    groups = {
        v: [v - k for k in range(1, i)] + [v + k for k in range(1, 6 - i)]
        for i, v in enumerate(peers, start=1)
    }
    view = {victim: peers}
    for v in peers:
        view[v] = [victim, *groups[v]]
        for a in groups[v]:
            view[a] = [v, *[b for b in groups[v] if b != a]]
    clients, book = _nodes(list(view), (SPLIT_ROUND, SPLIT_ROUND))
    return victim, peers, groups, view, clients, book


def _split_view_round():
    """Share-keys and masked input of the split views, each node in its own view.

    Returns the attack's parts, and node -> its mask or its refusal's text.
    """
    victim, peers, groups, view, clients, book = parts = _split_views()
    tokens, commitments = {}, {}
    for node, neighbours in view.items():
        reply = clients[node].share_keys(_share_keys_request(book, node, neighbours, SPLIT_ROUND))
        commitments[node] = reply["commitment"]
        for peer, token in zip(reply["recipients"], reply["tokens"], strict=True):
            tokens[(node, peer)] = token
    outcome = {}
    for node, senders in view.items():
        request = {
            "round": SPLIT_ROUND,
            "senders": senders,
            "tokens": [tokens[(sender, node)] for sender in senders],
            "dropped": [],
        }
        try:
            outcome[node] = clients[node].masked_input(request, PRIMES, DEGREE)
        except SecAggRefusal as refusal:
            outcome[node] = str(refusal)
    return parts, commitments, outcome


def _unmask_for_the_victim(parts, commitments):
    """The server's unmask requests of the attack, and the victim's mask they rebuild.

    Each v_i is asked with S = {v_i, u, two of A_i} (its share of b_u); each a in A_i
    with S = A_i and D = {v_i} (its share of sk_{v_i}). Returns the rebuilt mask.
    """
    victim, peers, groups, view, clients, book = parts
    b_shares, key_shares = [], {v: [] for v in peers}
    for v in peers:
        request = {"round": SPLIT_ROUND, "survivors": [v, victim, *groups[v][:2]], "dropped": []}
        reply = clients[v].unmask(request)
        b_shares.append(reply["self_mask_shares"][reply["self_mask_owners"].index(victim)])
        for a in groups[v]:
            request = {"round": SPLIT_ROUND, "survivors": groups[v], "dropped": [v]}
            reply = clients[a].unmask(request)
            key_shares[v].append(reply["mask_key_shares"][reply["mask_key_owners"].index(v)])
    seed = combine(b_shares)
    assert commitment(victim, SPLIT_ROUND, seed) == commitments[victim]
    terms = []
    for v in peers:
        key = X25519PrivateKey.from_private_bytes(combine(key_shares[v]))
        assert public_bytes(key) == book.keys(v, SPLIT_ROUND)[1]
        victim_key = X25519PublicKey.from_public_bytes(book.keys(victim, SPLIT_ROUND)[1])
        terms.append((1 if victim < v else -1, pair_seed(key, victim_key, SPLIT_ROUND, v, victim)))
    return MaskSum(SPLIT_ROUND, [seed], terms, PRIMES, DEGREE)


def test_split_views_fail_at_the_first_token_from_another_view():
    """Regression for the review's split views: every one of the 26 honest nodes
    refuses its masked input at its first sender, whose view differs from its own, and
    stops the round; so none uploads, and the attack's unmask requests are refused by
    every node: the server gets no share."""
    parts, commitments, outcome = _split_view_round()
    victim, peers, groups, view, clients, book = parts
    for node, senders in view.items():
        assert outcome[node] == (
            f"tokens: the token from {senders[0]} was made for another view of round "
            f"{SPLIT_ROUND} (its participants, their keys or t are not the ones this node "
            "was shown)"
        ), node
        assert STOPPED in clients[node].state.rounds[SPLIT_ROUND].stages
    refused = f"round: the node did not answer masked-input of round {SPLIT_ROUND}"
    with pytest.raises(SecAggRefusal, match=refused):
        _unmask_for_the_victim(parts, commitments)
    for node, client in clients.items():
        with pytest.raises(SecAggRefusal, match=refused):
            client.unmask({"round": SPLIT_ROUND, "survivors": [node, *view[node]], "dropped": []})


def test_without_the_view_digest_the_split_views_read_the_victims_mask(monkeypatch):
    """Control: with every view digest made equal (the binding off), all 26 nodes take
    the tokens of the split views, and the attack's unmask replies rebuild the victim's
    whole upload mask word for word, with no colluder."""
    monkeypatch.setattr(client_module, "view_digest", lambda *args: bytes(32))
    parts, commitments, outcome = _split_view_round()
    victim = parts[0]
    assert all(isinstance(mask, MaskSum) for mask in outcome.values())
    rebuilt = _unmask_for_the_victim(parts, commitments)
    for chunk in (0, 3):
        np.testing.assert_array_equal(rebuilt(chunk), outcome[victim](chunk))


# -- keys that are not keys (the second review's M1) -------------------------------------

NODES = 6
LOW_ORDER_CLIENT = 102


@pytest.fixture(scope="module")
def he_keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("keys"))


def _low_order_keys(msg, context, call_next):
    """Node 102 advertises 32 zero bytes (a low-order point) as every mask key."""
    reply = call_next(msg, context)
    record = None if reply.has_error() else reply.content.config_records.get(REPLY_KEY)
    if context.node_id != LOW_ORDER_CLIENT or record is None:
        return reply
    changed = dict(record)
    field = "lepton-secagg.advertise.mask_keys"
    if field in changed:
        changed[field] = [bytes(32)] * len(changed[field])
    return Message(RecordDict({REPLY_KEY: ConfigRecord(changed)}), reply_to=msg)


def test_a_client_advertising_a_low_order_key_is_dropped_and_the_round_goes_on(he_keys, caplog):
    """Before, the server kept the key, and every honest peer refused share-keys: one
    client voided each round it joined. Now the server drops it at advertise, naming the
    node, the field and the round, and the other five release their mean."""
    caplog.set_level(logging.WARNING, logger="flwr")
    app = ClientApp(mods=[_low_order_keys, make_he_mod(he_keys[0], workers=1)])

    @app.train()
    def train(msg, context):
        shift = np.float32((context.node_id - 99) / 100)
        arrays = {k: Array(v.numpy() + shift) for k, v in msg.content["arrays"].items()}
        content = {"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 10})}
        return Message(RecordDict(content), reply_to=msg)

    strategy = HEFedAvg(
        he_keys[1],
        secure_aggregation=True,
        min_available_nodes=NODES,
        workers=1,
        weight_scale=1.0,
    )
    start = ArrayRecord({"w": Array(np.zeros(40, dtype=np.float32))})
    result = strategy.start(InProcessGrid(app, NODES), start, num_rounds=1)
    model = decrypt_arrays(result.arrays, he_keys[0])["w"].numpy()
    others = [n for n in range(100, 100 + NODES) if n != LOW_ORDER_CLIENT]
    expected = np.mean([(n - 99) / 100 for n in others])
    assert np.allclose(model, expected, atol=flooding_atol(result.arrays))
    assert (
        f"node {LOW_ORDER_CLIENT} dropped at advertise: node {LOW_ORDER_CLIENT}: mask_keys: "
        "the public key is a low-order point (round 1)" in caplog.text
    )
    assert "refused" not in caplog.text
