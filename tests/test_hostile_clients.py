"""One client must not stall or own the model (issue 18, item 6).

A key holder (or a node with another key and the server's fingerprint) that uploads
values past its bound makes clients refuse the model: the server falls back and finds
the node by leaving suspects out, then excludes it. Refusals from a minority, or of a
model sent in the clear, change nothing. One reply cannot take most of the weight, and
what one HE + DP share can move is what ``HEDPFedAvg``'s docstring says.
"""

import logging
import math

import numpy as np
import pytest
from conftest import client_message, flooding_atol, he_dp_fedavg
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from lepton_flwr.strategies import HEFedAvg
from lepton_flwr.strategies.last_good import LastGoodModel, TrainingHeldBackError, Verdict
from test_hostile_replies import (
    SHIFT,
    SIZE,
    _app,
    _foreign_key_with_our_fingerprint,
    _start,
    _values_past_the_bound,
)

from lepton_flwr import protocol
from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.he import CKKSParams, EncryptedModel, decrypt_arrays, is_encrypted, write_keys
from lepton_flwr.he.keyholder import encoder_for
from lepton_flwr.mods import make_he_dp_mod, make_he_mod
from lepton_flwr.mods.he_mod import encrypt_update

REFUSAL = f"he_mod: {protocol.MODEL_REFUSED}"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("other"))


class Culprit:
    """A mod outside the HE mod: ``node`` replaces its upload by ``encrypt(honest)``.

    ``rounds`` limits the rounds it cheats in (None: all); ``trained`` records which
    node got a training message in which round.
    """

    def __init__(self, node, encrypt, rounds=None):
        self.node, self.encrypt, self.rounds = node, encrypt, rounds
        self.trained: dict[int, set[int]] = {}

    def __call__(self, msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type != "train":
            return reply
        server_round = int(msg.content["config"][protocol.SERVER_ROUND])
        self.trained.setdefault(server_round, set()).add(context.node_id)
        cheats = self.rounds is None or server_round in self.rounds
        if context.node_id != self.node or reply.has_error() or not cheats:
            return reply
        forged = self.encrypt(EncryptedModel.from_record(reply.content["arrays"]), msg)
        return Message(
            RecordDict({"arrays": forged.to_record(), "metrics": reply.content["metrics"]}),
            reply_to=msg,
        )


def _ignoring_message(encrypt):
    return lambda honest, msg: encrypt(honest)


def _he_fedavg(keys, **kwargs):
    settings = dict(
        min_available_nodes=kwargs.pop("nodes"),
        min_train_nodes=1,
        fraction_evaluate=0.0,
        workers=1,
        weight_scale=1.0,
    )
    return HEFedAvg(keys[1], **(settings | kwargs))


# ---- the verdict of a round's refusals ---------------------------------------------------


def _replies(refusals, total):
    sent = client_message(_start())
    refused = [Message(Error(code=0, reason=REFUSAL), reply_to=sent) for _ in range(refusals)]
    kept = [Message(RecordDict(), reply_to=sent) for _ in range(total - refusals)]
    return refused + kept


@pytest.mark.parametrize(
    ("refusals", "replies", "verdict"),
    [
        (1, 1, Verdict.DISPUTED),  # one node alone: never a fallback
        (1, 2, Verdict.DISPUTED),  # before: a fallback (half of the replies refused)
        (1, 3, Verdict.ACCEPTED),  # a minority
        (2, 4, Verdict.DISPUTED),
        (2, 3, Verdict.REFUSED),
        (4, 4, Verdict.REFUSED),
    ],
)
def test_only_a_majority_of_two_or_more_refuses_a_model(refusals, replies, verdict):
    last_good = LastGoodModel("test")
    last_good.produced({100, 101, 102})  # the model holds uploads clients have not accepted
    assert last_good.judge(2, _replies(refusals, replies)) is verdict


def test_refusals_of_a_model_holding_no_new_upload_are_not_believed():
    last_good = LastGoodModel("test")
    last_good.sent(1, _start())  # in the clear: it cannot wrap
    assert last_good.judge(1, _replies(3, 3)) is Verdict.ACCEPTED
    assert last_good.model is not None  # the model sent is the last good one


def test_a_minority_share_for_refusals_is_refused():
    with pytest.raises(ValueError, match="a minority must not decide"):
        LastGoodModel("test", refusal_share=0.4)


def test_refused_models_that_hold_no_common_node_stop_training():
    """Two nodes at fault (or a lying majority): the search cannot explain it, and says so."""
    last_good = LastGoodModel("test")
    last_good.produced({100, 101, 102, 103})
    assert last_good.judge(2, _replies(4, 4)) is Verdict.REFUSED
    assert last_good.suspects.nodes == {100, 101, 102, 103}
    last_good.produced({104, 105})
    assert last_good.judge(4, _replies(4, 4)) is Verdict.REFUSED
    with pytest.raises(TrainingHeldBackError, match="holds none of them"):
        last_good.leave_out(5, [100, 101, 102, 103, 104, 105], lambda n: True)


def test_suspects_and_excluded_nodes_survive_a_checkpoint():
    last_good = LastGoodModel("test")
    last_good.sent(1, _start())
    last_good.judge(1, _replies(0, 3))
    last_good.produced({100, 101, 102, 103})
    last_good.judge(2, _replies(3, 3))
    last_good.suspects.excluded.add(107)
    again = LastGoodModel("test")
    again.load_state(last_good.state())
    assert again.suspects.nodes == {100, 101, 102, 103}
    assert again.suspects.excluded == {107}
    assert again.leave_out(3, [100, 101, 102, 103, 107], lambda n: True) == [100, 102]


# ---- through Flower's loop ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("forgery", "culprit_node"),
    [
        ("values past the bound", 100),
        ("values past the bound", 103),
        ("values past the bound", 105),
        ("foreign key, our fingerprint", 102),
    ],
)
def test_one_node_at_fault_is_found_in_log2_refusals_and_excluded(
    keys, other_keys, caplog, forgery, culprit_node
):
    """Before: every other round fell back, for ever; the model never moved."""
    caplog.set_level(logging.INFO, logger="flwr")
    nodes = 6
    encrypt = (
        _values_past_the_bound(keys)
        if forgery == "values past the bound"
        else _foreign_key_with_our_fingerprint(other_keys)
    )
    culprit = Culprit(culprit_node, _ignoring_message(encrypt))
    grid = InProcessGrid(_app([culprit, make_he_mod(keys[0], workers=1)]), nodes)
    # Each refusal comes at most 3 rounds after the one before (the culprit's half trains
    # in every other round): the last of 1 + ⌈log2 6⌉ = 4 by round 11.
    result = _he_fedavg(keys, nodes=nodes).start(grid, _start(), num_rounds=13)
    refused = caplog.text.count("falling back to the last good global model")
    assert 1 <= refused <= 1 + math.ceil(math.log2(nodes))
    assert f"Node {culprit_node} is excluded from training" in caplog.text
    others = set(range(100, 100 + nodes)) - {culprit_node}
    assert culprit.trained[12] == culprit.trained[13] == others  # all the others train again
    # The final model is one clients accept, and moved by SHIFT in every accepted round.
    steps = decrypt_arrays(result.arrays, keys[0])["w"].numpy() / SHIFT
    assert np.allclose(steps, np.round(steps[0]), atol=0.05) and round(steps[0]) >= 2


def test_refusals_of_the_model_sent_in_the_clear_change_nothing(keys, caplog):
    """Before: two nodes replying 'refused' in round 1 made the server fall back."""
    caplog.set_level(logging.INFO, logger="flwr")

    def liars(msg, context, call_next):
        config = msg.content["config"]
        if context.node_id in (101, 102) and config[protocol.SERVER_ROUND] == 1:
            return Message(Error(code=0, reason=REFUSAL), reply_to=msg)
        return call_next(msg, context)

    grid = InProcessGrid(_app([liars, make_he_mod(keys[0], workers=1)]), 3)
    result = _he_fedavg(keys, nodes=3).start(grid, _start(), num_rounds=2)
    assert "not believed, nothing changes" in caplog.text
    assert "falling back" not in caplog.text
    assert np.allclose(
        decrypt_arrays(result.arrays, keys[0])["w"].numpy(),
        2 * SHIFT,
        atol=flooding_atol(result.arrays, 2),
    )


def test_a_node_too_many_to_leave_out_stops_training_with_the_last_good_model(keys, caplog):
    """Three nodes, all needed each round: the culprit cannot be left out, so training
    stops with an error naming the suspects, and the Result is the model last accepted."""
    caplog.set_level(logging.INFO, logger="flwr")
    culprit = Culprit(101, _ignoring_message(_values_past_the_bound(keys)))
    grid = InProcessGrid(_app([culprit, make_he_mod(keys[0], workers=1)]), 3)
    strategy = _he_fedavg(keys, nodes=3, min_train_nodes=3)
    result = strategy.start(grid, _start(), num_rounds=8)
    assert "the refused model holds them all" in caplog.text
    assert "training stops" in caplog.text.lower()
    assert max(culprit.trained) == 4  # refused in rounds 2 and 4, stopped before round 5
    assert not is_encrypted(result.arrays)  # the initial model: the last one accepted
    assert np.array_equal(result.arrays["w"].numpy(), _start()["w"].numpy())


def test_a_node_that_is_half_of_every_round_stalls_it_then_training_stops(keys, caplog):
    """Two nodes, one says it refuses every model: the server cannot tell who lies."""
    caplog.set_level(logging.INFO, logger="flwr")

    def liar(msg, context, call_next):
        if context.node_id == 101:
            return Message(Error(code=0, reason=REFUSAL), reply_to=msg)
        return call_next(msg, context)

    grid = InProcessGrid(_app([liar, make_he_mod(keys[0], workers=1)]), 2)
    result = _he_fedavg(keys, nodes=2).start(grid, _start(), num_rounds=8)
    assert caplog.text.count("the round adds nothing and keeps it") == 2
    assert "in 3 rounds in a row" in caplog.text
    assert "falling back" not in caplog.text  # no fallback, and no node suspected
    assert not is_encrypted(result.arrays)


@pytest.mark.parametrize(("values", "accepted"), [(2.5, True), (3.5, False)])
def test_a_key_holder_can_put_the_he_fedavg_model_anywhere_within_the_bound(
    keys, caplog, values, accepted
):
    """What the README leaves unprotected: one of 3 equal clients, honest header (weight ×
    b, b = 1), may encrypt values past ±b as long as the decrypted mean stays within ±b."""
    caplog.set_level(logging.INFO, logger="flwr")

    def encrypt(honest):
        encoder, own = encoder_for(keys[0], workers=1)
        forged = np.full(SIZE, values, dtype=np.float32)
        model = EncryptedModel.from_record(
            encrypt_update(ArrayRecord({"w": Array(forged)}), honest.weight, encoder, own)
        )
        model.max_abs = honest.max_abs
        return model

    culprit = Culprit(101, _ignoring_message(encrypt), rounds={1})
    grid = InProcessGrid(_app([culprit, make_he_mod(keys[0], workers=1)]), 3)
    strategy = _he_fedavg(keys, nodes=3, value_bound=1.0)
    result = strategy.start(grid, _start(), num_rounds=2)
    if not accepted:
        assert "falling back to the last good global model, sent in round 1" in caplog.text
        return
    assert "falling back" not in caplog.text
    # Round 1's mean (2.5 + 2 × SHIFT) / 3 = 0.84; round 2 adds SHIFT (clamped to ±1).
    model = decrypt_arrays(result.arrays, keys[0])["w"].numpy()
    assert np.allclose(
        model, (values + 2 * SHIFT) / 3 + SHIFT, atol=flooding_atol(result.arrays, 2)
    )


# ---- weights ------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "rejected"), [(100, False), (101, True), (260_000, True)])
def test_one_reply_cannot_take_most_of_the_weight(keys, caplog, count, rejected):
    """Before: 260,000 examples against 3 × 10 took 99.99 % of the weight. Now at most
    r / (r + ⌊n/2⌋) of it, r = max_weight_ratio (10), n = 4 replies."""
    caplog.set_level(logging.WARNING, logger="flwr")

    def big(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_id == 101:  # moves every weight to +1 and claims `count` examples
            ones = {k: Array(np.ones_like(v.numpy())) for k, v in reply.content["arrays"].items()}
            metrics = MetricRecord({"num-examples": count})
            reply.content = RecordDict({"arrays": ArrayRecord(ones), "metrics": metrics})
        return reply

    grid = InProcessGrid(_app([make_he_mod(keys[0], workers=1), big]), 4)
    strategy = _he_fedavg(keys, nodes=4, weight_scale=100.0, value_bound=1.0)
    result = strategy.start(grid, _start(), num_rounds=1)
    model = decrypt_arrays(result.arrays, keys[0])["w"].numpy()
    if rejected:
        assert "more than max_weight_ratio = 10 times the round's median" in caplog.text
        assert np.allclose(model, SHIFT, atol=flooding_atol(result.arrays))
    else:  # 10 times the median (10): kept
        assert "max_weight_ratio" not in caplog.text
        share = (model.mean() - SHIFT) / (1 - SHIFT)  # the weight of the reply at +1
        assert share == pytest.approx(100 / 130, abs=1e-3)
        assert share <= 10 / (10 + 4 // 2)


@pytest.mark.parametrize("sybil_reply", ["plaintext", "garbage under the fingerprint"])
def test_replies_that_are_rejected_anyway_cannot_lift_the_weight_cap(keys, caplog, sybil_reply):
    """Second review: three nodes without the key replied 100,000 examples (rejected), the
    median over every count became 100,000, and a key holder claiming as much owned
    99.97 % of the model. The median now counts only replies that are added."""
    caplog.set_level(logging.WARNING, logger="flwr")
    sybils, owner = (104, 105, 106), 103

    def claims(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_id == owner:  # an honest ciphertext of +1 claiming 100,000
            ones = {k: Array(np.ones_like(v.numpy())) for k, v in reply.content["arrays"].items()}
            reply.content = RecordDict(
                {"arrays": ArrayRecord(ones), "metrics": MetricRecord({"num-examples": 100_000})}
            )
        return reply

    def sybil(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_id in sybils:
            metrics = MetricRecord({"num-examples": 100_000})
            arrays = reply.content["arrays"]
            if sybil_reply == "plaintext":
                arrays = ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})
            else:  # a header the server's checks accept, chunks that do not load
                model = EncryptedModel.from_record(arrays)
                model.chunks = [b"\x00" * len(c) for c in model.chunks]
                model.weight = 100_000 / 100.0
                arrays = model.to_record()
            reply.content = RecordDict({"arrays": arrays, "metrics": metrics})
        return reply

    grid = InProcessGrid(_app([sybil, make_he_mod(keys[0], workers=1), claims]), 7)
    strategy = _he_fedavg(keys, nodes=7, weight_scale=100.0, value_bound=1.0)
    result = strategy.start(grid, _start(), num_rounds=1)
    model = decrypt_arrays(result.arrays, keys[0])["w"].numpy()
    # The three honest nodes' mean only, up to the flooding of the published decryption.
    assert np.allclose(model, SHIFT, atol=flooding_atol(result.arrays))
    assert "more than max_weight_ratio = 10 times the round's median" in caplog.text


def test_a_weight_cap_below_one_is_refused(keys):
    with pytest.raises(ValueError, match="max_weight_ratio must be a finite number >= 1"):
        HEFedAvg(keys[1], max_weight_ratio=0.5)


# ---- HE + DP: ε of refused models, what one share can move ----------------------------------


def _share(keys, values_for):
    """A culprit's share: ``values_for(bound B)`` on every value, the honest header."""

    def encrypt(honest, msg):
        encoder, own = encoder_for(keys[0], workers=1)
        bound = float(msg.content["config"][protocol.SHARE_BOUND])
        values = np.full(SIZE, values_for(bound), dtype=np.float32)
        model = EncryptedModel.from_record(
            encrypt_update(ArrayRecord({"w": Array(values)}), 1.0, encoder, own)
        )
        model.max_abs = honest.max_abs  # B, as the server announced
        return model

    return encrypt


def test_he_dp_finds_the_culprit_and_accounts_every_model_clients_decrypted(keys, caplog):
    """Refused models stay accounted (clients decrypted them); refusing rounds spend nothing."""
    caplog.set_level(logging.INFO, logger="flwr")
    nodes = 4
    culprit = Culprit(102, _share(keys, lambda bound: 5e4))
    grid = InProcessGrid(_app([culprit, make_he_dp_mod(keys[0], workers=1)]), nodes)
    strategy = he_dp_fedavg(keys[1], nodes)
    result = strategy.start(grid, _start(), num_rounds=9)
    assert "Node 102 is excluded from training" in caplog.text
    rounds = result.train_metrics_clientapp
    refusing = [r for r in rounds if strategy.server_counts[r]["reported"] == 0]
    assert 1 <= len(refusing) <= 1 + math.ceil(math.log2(nodes))
    for r in range(2, 10):  # ε grows exactly in the rounds that released a model
        grew = rounds[r]["epsilon"] > rounds[r - 1]["epsilon"]
        assert grew == (r not in refusing)
    decrypt_arrays(result.arrays, keys[0])  # the final model is one clients accept


@pytest.mark.parametrize(
    ("values_for", "accepted"),
    [
        (lambda bound: bound, True),  # the public bound B on every value
        (lambda bound: 0.95 * 4 * bound, True),  # more than B: within the sum's r·B
        (lambda bound: 1.05 * 4 * bound, False),  # past the sum's bound
    ],
)
def test_one_he_dp_share_moves_the_model_by_what_the_docstring_says(
    keys, caplog, values_for, accepted
):
    """M_1 = max|θ_0| + r·B (θ_0 = 0, r = 4 shares): one share may use all of it, no more."""
    caplog.set_level(logging.INFO, logger="flwr")
    nodes = 4
    culprit = Culprit(101, _share(keys, values_for), rounds={1})
    grid = InProcessGrid(_app([culprit, make_he_dp_mod(keys[0], workers=1)]), nodes)
    strategy = he_dp_fedavg(keys[1], nodes, noise_multiplier=0.001)  # noise std 4e-4 per value
    result = strategy.start(grid, _start(), num_rounds=2)
    bound = strategy._share_bound  # B = (C + 10σ)/d, the same in both rounds
    assert bound == pytest.approx((1.0 + 10 * 0.001 / math.sqrt(3)) / 4)
    if not accepted:
        assert "falling back to the last good global model, sent in round 1" in caplog.text
        assert np.array_equal(result.arrays["w"].numpy(), _start()["w"].numpy())
        return
    assert "falling back" not in caplog.text
    model = decrypt_arrays(result.arrays, keys[0])["w"].numpy().astype(np.float64)
    # Round 1: the culprit's values and three honest shares (SHIFT/4 each, tiny noise);
    # round 2: four honest shares.
    moved = model - 7 * SHIFT / 4
    assert np.allclose(moved, values_for(bound), atol=0.005)
    assert np.linalg.norm(moved) == pytest.approx(values_for(bound) * math.sqrt(SIZE), rel=0.02)


# ---- through the runner ---------------------------------------------------------------------


def test_the_runner_stops_on_a_culprit_it_cannot_leave_out_and_keeps_the_last_good_model(
    tmp_path, keys, caplog
):
    """digits_smoke needs all 3 nodes each round: node 101's dishonest uploads are refused
    twice, then training stops with the model last accepted (the initial one) saved."""
    from lepton_flwr.apps.client import make_client_app
    from lepton_flwr.apps.server import run_server
    from lepton_flwr.config import load_config

    caplog.set_level(logging.INFO, logger="flwr")
    he = f"strategy=he_fedavg he.secret_context_path={keys[0]} he.public_context_path={keys[1]}"
    cfg = load_config(
        f"+experiment=digits_smoke {he} num_rounds=6 strategy.min_train_nodes=3 "
        f"output_dir={tmp_path / 'r'}"
    )
    app = make_client_app(cfg)
    encoder, own = encoder_for(keys[0], workers=1)

    def client(msg, context):
        reply = app(msg, context)
        if context.node_id == 101 and msg.metadata.message_type == "train":
            if not reply.has_error():
                honest = EncryptedModel.from_record(reply.content["arrays"])
                values = np.zeros(honest.num_values, dtype=np.float32)
                values[0] = 5e4
                forged = EncryptedModel(
                    honest.manifest, encoder.encrypt(values), honest.weight, own, honest.max_abs
                )
                reply.content["arrays"] = forged.to_record()
        return reply

    # As the simulation runner does, the server also plays the key holder that tests
    # each decrypted model: a refused one is not tested, and does not end the run.
    out = run_server(InProcessGrid(client, num_nodes=3), cfg, keyholder_secret=keys[0])
    assert caplog.text.count("falling back to the last good global model") == 2
    assert "the refused model holds them all" in caplog.text
    assert "key holder: round 1's model not tested" in caplog.text
    assert (out / "model.pt").is_file()  # the initial model, the last one clients accepted
