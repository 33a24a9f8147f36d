"""Hostile replies against Flower's own loop: each is rejected alone or caught, never silent.

Issue 12's classes that concern the values a client encrypts: a header that lies about
its bound, values past the public bound under the right key, a ciphertext under another
key carrying the server's fingerprint, and an example count that would take the sum past
the CKKS headroom.
"""

import io
import logging
import math

import numpy as np
import pytest
from conftest import flooding_atol, he_dp_fedavg
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from lepton_flwr.strategies import HEDPFedAvg, HEFedAvg

from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.he import CKKSParams, EncryptedModel, decrypt_arrays, is_encrypted, write_keys
from lepton_flwr.he.keyholder import encoder_for
from lepton_flwr.mods import make_he_dp_mod, make_he_mod
from lepton_flwr.mods.he_mod import encrypt_update

NODES, SIZE, SHIFT = 3, 50, 0.01
BOUND = 100.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("other"))


def _start():
    return ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})


def _app(mods, examples=10):
    """A client that moves every weight by SHIFT and reports ``examples`` examples."""
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg, context):
        new = {k: Array(v.numpy() + SHIFT) for k, v in msg.content["arrays"].items()}
        metrics = MetricRecord({"num-examples": examples})
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

    return app


def _rogue(encrypt):
    """A mod outside he_mod: node 101 replaces its upload by ``encrypt(reply, weight)``."""

    def rogue(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_id != 101 or reply.has_error():
            return reply
        honest = EncryptedModel.from_record(reply.content["arrays"])
        forged = encrypt(honest)
        return Message(
            RecordDict({"arrays": forged.to_record(), "metrics": reply.content["metrics"]}),
            reply_to=msg,
        )

    return rogue


def _values_past_the_bound(keys):
    """Right key, honest header (weight × b), but one value at 5e4: what clamping prevents."""

    def encrypt(honest):
        encoder, own = encoder_for(keys[0], workers=1)
        values = np.full(SIZE, SHIFT, dtype=np.float32)
        values[0] = 5e4
        forged = encrypt_update(ArrayRecord({"w": Array(values)}), honest.weight, encoder, own)
        model = EncryptedModel.from_record(forged)
        model.max_abs = honest.max_abs
        return model

    return encrypt


def _foreign_key_with_our_fingerprint(other_keys):
    """Another key's ciphertext, labelled with the server's fingerprint and the honest bound."""

    def encrypt(honest):
        encoder, _ = encoder_for(other_keys[0], workers=1)
        model = EncryptedModel.from_record(
            encrypt_update(
                ArrayRecord({"w": Array(np.full(SIZE, SHIFT, dtype=np.float32))}),
                honest.weight,
                encoder,
                honest.fingerprint,
            )
        )
        model.max_abs = honest.max_abs
        return model

    return encrypt


def _lying_bound(honest):
    honest.max_abs = 1e-3
    return honest


def _he_fedavg(keys, **kwargs):
    # weight_scale 1: weights are example counts, so the flooding of decryptions
    # (σ_f / total weight) stays far below SHIFT in these small tests.
    settings = dict(min_available_nodes=NODES, workers=1, weight_scale=1.0)
    return HEFedAvg(keys[1], **(settings | kwargs))


def test_a_header_declaring_a_smaller_bound_is_rejected_alone(keys, caplog):
    """Before: a client declaring 0.01 and encrypting 5e4 was accepted."""
    caplog.set_level(logging.WARNING, logger="flwr")
    mods = [_rogue(_lying_bound), make_he_mod(keys[0], workers=1)]
    result = _he_fedavg(keys).start(InProcessGrid(_app(mods), NODES), _start(), num_rounds=1)
    assert "rejected the reply of node 101" in caplog.text
    assert "not its weight times the public bound" in caplog.text
    assert np.allclose(
        decrypt_arrays(result.arrays, keys[0])["w"].numpy(),
        SHIFT,
        atol=flooding_atol(result.arrays),
    )


def test_clients_clamp_to_the_public_bound_and_declare_it(keys):
    """An honest client's weights past ±b are clamped; its header declares weight × b."""
    grid = InProcessGrid(_app([make_he_mod(keys[0], workers=1)]), NODES)
    strategy = _he_fedavg(keys, value_bound=0.005)  # below the trained weights (0.01)
    result = strategy.start(grid, _start(), num_rounds=1)
    model = EncryptedModel.from_record(result.arrays)
    assert model.max_abs == pytest.approx(NODES * 10 * 0.005)
    assert np.allclose(
        decrypt_arrays(result.arrays, keys[0])["w"].numpy(),
        0.005,
        atol=flooding_atol(result.arrays),
    )


@pytest.mark.parametrize("forgery", ["values past the bound", "foreign key, our fingerprint"])
def test_clients_refuse_a_corrupted_global_model_and_the_server_falls_back(
    keys, other_keys, caplog, forgery
):
    """Before: the global model became garbage (±1.6e8 for a foreign key) with no log line."""
    caplog.set_level(logging.INFO, logger="flwr")
    encrypt = (
        _values_past_the_bound(keys)
        if forgery == "values past the bound"
        else _foreign_key_with_our_fingerprint(other_keys)
    )
    mods = [_rogue(encrypt), make_he_mod(keys[0], workers=1)]
    result = _he_fedavg(keys).start(InProcessGrid(_app(mods), NODES), _start(), num_rounds=2)
    # Round 2: every client decrypts the sum, sees a value past the bound and refuses.
    assert "refused the global model" in caplog.text
    assert "falling back to the last good global model, sent in round 1" in caplog.text
    fallback = result.arrays
    assert not is_encrypted(fallback)  # round 1's model: the public initial one
    assert np.array_equal(fallback["w"].numpy(), _start()["w"].numpy())


def test_an_example_count_that_would_overflow_the_sum_rejects_that_reply_only(keys, caplog):
    """Before: one huge weight voided the round (or, unchecked, wrapped it)."""
    caplog.set_level(logging.WARNING, logger="flwr")

    def huge_count(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_id == 101:
            reply.content["metrics"]["num-examples"] = 9_000
        return reply

    # The handler's count is rewritten before he_mod weights the update with it.
    app = ClientApp(mods=[make_he_mod(keys[0], workers=1), huge_count])

    @app.train()
    def train(msg, context):
        new = {k: Array(v.numpy() + SHIFT) for k, v in msg.content["arrays"].items()}
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

    # Without the weight cap, which would reject it first (tests/test_hostile_clients.py).
    strategy = _he_fedavg(keys, max_weight_ratio=None)
    result = strategy.start(InProcessGrid(app, NODES), _start(), num_rounds=1)
    assert "rejected the reply of node 101" in caplog.text
    assert "past the safe CKKS bound" in caplog.text
    assert np.allclose(
        decrypt_arrays(result.arrays, keys[0])["w"].numpy(),
        SHIFT,
        atol=flooding_atol(result.arrays),
    )


def test_he_dp_falls_back_too_and_spends_no_epsilon_on_the_refused_round(keys, caplog):
    caplog.set_level(logging.INFO, logger="flwr")

    def encrypt(honest):
        encoder, own = encoder_for(keys[0], workers=1)
        values = np.zeros(SIZE, dtype=np.float32)
        values[0] = 5e4
        model = EncryptedModel.from_record(
            encrypt_update(ArrayRecord({"w": Array(values)}), 1.0, encoder, own)
        )
        model.max_abs = honest.max_abs
        return model

    mods = [_rogue(encrypt), make_he_dp_mod(keys[0], workers=1)]
    strategy = he_dp_fedavg(keys[1], NODES)
    result = strategy.start(InProcessGrid(_app(mods), NODES), _start(), num_rounds=2)
    assert "falling back to the last good global model, sent in round 1" in caplog.text
    metrics = result.train_metrics_clientapp
    assert strategy.server_counts[2]["reported"] == 0
    assert metrics[2]["epsilon"] == pytest.approx(metrics[1]["epsilon"])


def test_waiting_for_nodes_ends_at_the_timeout_with_what_was_missing(caplog):
    """Before: a DP strategy polled for ``min_available_nodes`` for ever."""
    from lepton_flwr.strategies import DPFedAvg, NoModelTrainedError

    caplog.set_level(logging.INFO, logger="flwr")
    strategy = DPFedAvg(
        noise_multiplier=1.0, delta=1e-3, sample_rate=1.0, sampling="fixed", min_available_nodes=4
    )
    grid = InProcessGrid(_app([]), NODES)
    with pytest.raises(NoModelTrainedError, match="3 of the 4 nodes needed"):
        strategy.start(grid, _start(), num_rounds=2, timeout=1.5)
    assert "waiting for 4 nodes to connect (3 so far)" in caplog.text


# ---- plain FedAvg: one malformed reply must not void a round or crash the loop ----------


def _extra_metric_record_first(content):
    return RecordDict({"zzz": MetricRecord({"x": 1.0}), **content})


def _count(value):
    def corrupt(content):
        metrics = MetricRecord({**content["metrics"], "num-examples": value})
        return RecordDict({**content, "metrics": metrics})

    return corrupt


def _nan_weights(content):
    w = content["arrays"]["w"].numpy().copy()
    w[3] = np.nan
    return RecordDict({**content, "arrays": ArrayRecord({"w": Array(w)})})


def _unknown_array_type(content):
    strange = Array(dtype="weird", shape=(SIZE,), stype="unknown", data=b"\x00" * 8)
    return RecordDict({**content, "arrays": ArrayRecord({"w": strange})})


def _header_declares_a_huge_array(content):
    """80 bytes whose .npy header asks numpy for 32 GiB before it reads a value."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (2**33,)}
    )
    huge = Array(dtype="float32", shape=(SIZE,), stype="numpy.ndarray", data=header.getvalue())
    return RecordDict({**content, "arrays": ArrayRecord({"w": huge})})


def _as_dtype(dtype):
    """A reply whose tensor has another dtype than the model's (float32)."""

    def corrupt(content):
        values = content["arrays"]["w"].numpy().astype(dtype)
        return RecordDict({**content, "arrays": ArrayRecord({"w": Array(values)})})

    corrupt.__name__ = f"_as_{np.dtype(dtype).name}"
    return corrupt


def _loss_as_list(content):
    metrics = MetricRecord({**content["metrics"], "train-loss": [1.0, 2.0]})
    return RecordDict({**content, "metrics": metrics})


def _corrupt_node_101(corrupt):
    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_id == 101 and msg.metadata.message_type == "train":
            reply.content = corrupt(reply.content)
        return reply

    return mod


def _plain_app(mods):
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg, context):
        new = {k: Array(v.numpy() + SHIFT) for k, v in msg.content["arrays"].items()}
        metrics = MetricRecord({"num-examples": 10, "train-loss": 0.5})
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

    return app


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_extra_metric_record_first, "expected one MetricRecord, got 2"),
        (_count(-20), "is not in [1,"),
        (_count(10**12), "is not in [1,"),
        (_count([1, 2]), "whole number"),
        (_nan_weights, "holds NaN or Inf"),
        (_unknown_array_type, "has dtype 'weird', expected float32"),
        (_header_declares_a_huge_array, "its .npy header declares float32[8589934592]"),
        (_as_dtype(np.complex128), "has dtype 'complex128', expected float32"),
        (_as_dtype("U3"), "expected float32"),
        (_as_dtype(np.float16), "has dtype 'float16', expected float32"),
        (_loss_as_list, None),  # a valid update: kept; its loss is left out of the metrics
    ],
)
def test_checked_fedavg_rejects_one_bad_reply_and_the_round_goes_on(caplog, corrupt, reason):
    """Before: Flower's FedAvg raised (KeyError, ZeroDivisionError, TypeError, an
    InconsistentMessageReplies error) and the run ended, or averaged NaN into the model."""
    from lepton_flwr.strategies import CheckedFedAvg

    caplog.set_level(logging.WARNING, logger="flwr")
    grid = InProcessGrid(_plain_app([_corrupt_node_101(corrupt)]), NODES)
    result = CheckedFedAvg(min_available_nodes=NODES, fraction_evaluate=0.0).start(
        grid, _start(), num_rounds=2
    )
    assert np.allclose(result.arrays["w"].numpy(), 2 * SHIFT)
    if reason is None:  # before: all the round's metrics were dropped
        held = "'train-loss' (a number: nodes 100, 102; a list of 2: nodes 101)"
        assert f"left out: {held}" in caplog.text
    else:
        assert "rejected the training reply of node 101" in caplog.text and reason in caplog.text


def test_the_runner_keeps_going_past_a_malformed_plain_reply(tmp_path, caplog):
    from lepton_flwr.apps.client import make_client_app
    from lepton_flwr.apps.server import run_server
    from lepton_flwr.config import load_config

    caplog.set_level(logging.WARNING, logger="flwr")
    cfg = load_config(
        f"+experiment=digits_smoke model=logreg num_rounds=2 output_dir={tmp_path / 'run'}"
    )
    app = make_client_app(cfg)

    def client(msg, context):
        reply = app(msg, context)
        if context.node_id == 101 and msg.metadata.message_type == "train":
            reply.content = _count(-5)(reply.content)
        return reply

    out = run_server(InProcessGrid(client, num_nodes=3), cfg)
    assert caplog.text.count("rejected the training reply of node 101") == 2
    assert (out / "model.pt").is_file()


def test_a_minority_claiming_to_refuse_a_good_model_changes_nothing(keys, caplog):
    """One client lying that it refused the model cannot force a fallback."""
    from flwr.app import Error

    from lepton_flwr import protocol

    caplog.set_level(logging.INFO, logger="flwr")

    def liar(msg, context, call_next):
        if context.node_id != 101 or msg.metadata.message_type != "train":
            return call_next(msg, context)
        reason = f"he_mod: {protocol.MODEL_REFUSED}: a decrypted value reaches 9e9"
        return Message(Error(code=0, reason=reason), reply_to=msg)

    mods = [liar, make_he_mod(keys[0], workers=1)]
    result = _he_fedavg(keys).start(InProcessGrid(_app(mods), NODES), _start(), num_rounds=2)
    assert "refused the global model the others accepted" in caplog.text
    assert "falling back" not in caplog.text
    # Both rounds aggregated the two honest clients: every weight moved twice.
    assert np.allclose(
        decrypt_arrays(result.arrays, keys[0])["w"].numpy(),
        2 * SHIFT,
        atol=flooding_atol(result.arrays, 2),
    )


# ---- issue 18, item 3: one reply must not end the run ---------------------------------


def _metrics_app(mods):
    """A client reporting training and evaluation metrics; weights differ by node.

    Node 100 + i trains on i + 1 examples and evaluates a loss of its node id on i + 1
    examples, so that a mean shows which nodes it counted.
    """
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg, context):
        new = {k: Array(v.numpy() + SHIFT) for k, v in msg.content["arrays"].items()}
        count = context.node_id - 99
        metrics = MetricRecord({"num-examples": count, "train-loss": float(context.node_id)})
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg, context):
        count = context.node_id - 99
        metrics = {"num-examples": count, "loss": float(context.node_id), "accuracy": 0.5}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def _node_101_metrics(phase, change):
    """A mod outside every other: node 101's ``phase`` reply gets ``change(metrics)``."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_id == 101 and msg.metadata.message_type == phase:
            name = next(k for k, r in reply.content.items() if isinstance(r, MetricRecord))
            reply.content = change(reply.content, name)
        return reply

    return mod


def _one_key_more(content, name):
    return RecordDict({**content, name: MetricRecord({**content[name], "extra": 1.0})})


def _one_key_less(content, name):
    kept = {k: v for k, v in content[name].items() if k not in ("train-loss", "accuracy")}
    return RecordDict({**content, name: MetricRecord(kept)})


def _strategy(name, keys, evaluate):
    """Each of our strategies, for 3 nodes, with federated evaluation on or off."""
    from lepton_flwr.strategies import CheckedFedAvg, DPFedAvg

    common = dict(min_available_nodes=NODES, fraction_evaluate=1.0 if evaluate else 0.0)
    dp = dict(noise_multiplier=0.5, delta=1e-3, sample_rate=1.0, sampling="fixed")
    if name == "fedavg":
        return CheckedFedAvg(**common), []
    if name == "he_fedavg":
        return _he_fedavg(keys, **common), [
            make_he_mod(keys[0], workers=1, allow_evaluation=evaluate)
        ]
    if name == "he_dp_fedavg":
        strategy = HEDPFedAvg(keys[1], clip_norm=1.0, workers=1, **dp, **common)
        return strategy, [make_he_dp_mod(keys[0], workers=1, allow_evaluation=evaluate)]
    return DPFedAvg(seed=0, release_client_metrics=True, **dp, **common), []


@pytest.mark.parametrize("change", ["one key more", "one key less"])
@pytest.mark.parametrize("phase", ["train", "evaluate"])
@pytest.mark.parametrize("name", ["fedavg", "he_fedavg", "he_dp_fedavg", "dp_fedavg"])
def test_one_reply_with_other_metric_keys_leaves_out_those_keys_only(
    keys, caplog, name, phase, change
):
    """Before: Flower's reply-consistency check raised and ended the run (training under
    CheckedFedAvg, evaluation under every strategy); the HE and DP strategies averaged a
    key that one reply lacked as if the others had sent 0."""
    caplog.set_level(logging.WARNING, logger="flwr")
    strategy, mods = _strategy(name, keys, evaluate=phase == "evaluate")
    corrupt = _one_key_more if change == "one key more" else _one_key_less
    app = _metrics_app([_node_101_metrics(phase, corrupt), *mods])
    result = strategy.start(InProcessGrid(app, NODES), _start(), num_rounds=1)
    every_node = 101 + 1 / 3  # (100 + 2·101 + 3·102) / 6: node 101 is counted
    if phase == "evaluate":
        metrics = result.evaluate_metrics_clientapp[1]
        assert metrics["loss"] == pytest.approx(every_node)
        left_out = "extra" if change == "one key more" else "accuracy"
    else:
        metrics = result.train_metrics_clientapp[1]
        if name in ("he_dp_fedavg", "dp_fedavg"):
            if name == "he_dp_fedavg":  # counts stay on the server (issue 19 item 2)
                assert strategy.server_counts[1]["reported"] == NODES
            else:
                assert strategy.server_counts[1]["accepted"] == NODES
        if name in ("fedavg", "he_fedavg"):  # the model is the mean of all three updates
            if name == "fedavg":
                assert np.allclose(result.arrays["w"].numpy(), SHIFT, atol=1e-6)
            else:
                model = decrypt_arrays(result.arrays, keys[0])["w"].numpy()
                assert np.allclose(model, SHIFT, atol=flooding_atol(result.arrays))
        if name.startswith("he_"):  # HE replies carry public values only: none averaged
            assert "extra" not in metrics and "train-loss" not in metrics
            return
        if change == "one key more":
            assert metrics["train-loss"] == pytest.approx(every_node)
        left_out = "extra" if change == "one key more" else "train-loss"
    assert left_out not in metrics
    held = "a number: nodes 101" if change == "one key more" else "missing: nodes 101"
    assert f"left out: '{left_out}' (" in caplog.text and held in caplog.text


def _two_metric_records(content, name):
    return RecordDict({**content, "zzz": MetricRecord({"num-examples": 1})})


def _no_metric_record(content, name):
    return RecordDict({k: r for k, r in content.items() if k != name})


def _evaluation_count(value):
    def change(content, name):
        return RecordDict({**content, name: MetricRecord({**content[name], "num-examples": value})})

    return change


def _without_count(content, name):
    kept = {k: v for k, v in content[name].items() if k != "num-examples"}
    return RecordDict({**content, name: MetricRecord(kept)})


@pytest.mark.parametrize("name", ["fedavg", "he_fedavg"])
@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_two_metric_records, "expected one MetricRecord, got 2"),
        (_no_metric_record, "expected one MetricRecord, got 0"),
        (_without_count, "no 'num-examples'"),
        (_evaluation_count(-1), "is not in [0,"),
        (_evaluation_count(10**30), "is not in [0,"),
        (_evaluation_count(2.5), "whole number"),
        (_evaluation_count([1, 2]), "whole number"),
    ],
)
def test_a_malformed_evaluation_reply_is_rejected_alone(keys, caplog, name, corrupt, reason):
    """Before: Flower's check raised for the whole round (or a count of 10^30 raised a
    TypeError in numpy); now node 101's reply is left out, the others' loss is the mean."""
    caplog.set_level(logging.WARNING, logger="flwr")
    strategy, mods = _strategy(name, keys, evaluate=True)
    app = _metrics_app([_node_101_metrics("evaluate", corrupt), *mods])
    result = strategy.start(InProcessGrid(app, NODES), _start(), num_rounds=1)
    assert "rejected the evaluation metrics of node 101" in caplog.text and reason in caplog.text
    loss = result.evaluate_metrics_clientapp[1]["loss"]
    assert loss == pytest.approx((100 * 1 + 102 * 3) / 4)  # nodes 100 and 102 only


def test_a_failing_metrics_aggregation_leaves_the_round_without_metrics(keys, caplog):
    """Before: an exception in evaluate_metrics_aggr_fn ended an HEFedAvg run."""
    caplog.set_level(logging.WARNING, logger="flwr")

    def broken(records, weighted_by_key):
        raise ZeroDivisionError("the weights sum to zero")

    strategy = _he_fedavg(keys, fraction_evaluate=1.0, evaluate_metrics_aggr_fn=broken)
    app = _metrics_app([make_he_mod(keys[0], workers=1, allow_evaluation=True)])
    result = strategy.start(InProcessGrid(app, NODES), _start(), num_rounds=2)
    assert "the clients' metrics were not aggregated: ZeroDivisionError" in caplog.text
    assert dict(result.evaluate_metrics_clientapp[2]) == {}
    assert np.allclose(
        decrypt_arrays(result.arrays, keys[0])["w"].numpy(),
        2 * SHIFT,
        atol=flooding_atol(result.arrays, 2),
    )


@pytest.mark.parametrize("reported", [float("nan"), -1.0, [0.5, 0.5]])
def test_an_unreadable_client_epsilon_counts_as_infinite_and_names_its_node(caplog, reported):
    """Before: node 100's NaN, first in the replies, made the round's client ε NaN (max
    keeps its first argument when comparisons fail), hiding nodes 101 and 102's 2.0 and 3.0."""
    from lepton_flwr.strategies import CheckedFedAvg, aggregate_train_metrics

    caplog.set_level(logging.WARNING, logger="flwr")

    def epsilon(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train":
            value = reported if context.node_id == 100 else float(context.node_id - 99)
            metrics = MetricRecord({**reply.content["metrics"], "client-epsilon": value})
            reply.content = RecordDict({**reply.content, "metrics": metrics})
        return reply

    strategy = CheckedFedAvg(
        min_available_nodes=NODES,
        fraction_evaluate=0.0,
        train_metrics_aggr_fn=aggregate_train_metrics,
    )
    result = strategy.start(InProcessGrid(_metrics_app([epsilon]), NODES), _start(), num_rounds=1)
    assert result.train_metrics_clientapp[1]["client-epsilon"] == math.inf
    assert "'client-epsilon' from nodes 100" in caplog.text


def test_the_round_epsilon_is_the_largest_and_never_nan():
    from lepton_flwr.strategies import aggregate_train_metrics

    def round_epsilon(*epsilons):
        records = [
            RecordDict({"metrics": MetricRecord({"num-examples": 1, "client-epsilon": e})})
            for e in epsilons
        ]
        return aggregate_train_metrics(records, "num-examples")["client-epsilon"]

    assert round_epsilon(1.0, 3.0, 2.0) == 3.0
    for hostile in (float("nan"), -1.0, float("-inf")):
        assert round_epsilon(hostile, 1.0, 2.0) == round_epsilon(1.0, 2.0, hostile) == math.inf
    assert round_epsilon(1.0, float("inf")) == math.inf  # a client without DP-SGD noise


def _forged_upload(forge):
    """A mod outside the HE mod: node 101's training reply gets ``forge(arrays)``."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_id == 101 and msg.metadata.message_type == "train":
            arrays = forge(reply.content["arrays"])
            reply.content = RecordDict({**reply.content, "arrays": arrays})
        return reply

    return mod


def _words_past_q(arrays):
    """Chunk 0's c0 all ones: words past ceil(Q / 2^d) (the packed format has no scale
    field to forge; its words and length are what a sender can get wrong)."""
    model = EncryptedModel.from_record(arrays)
    chunk = model.chunks[0]
    model.chunks[0] = b"\xff" * (len(chunk) - 64) + chunk[-64:]
    return model.to_record()


def _nested_header(arrays):
    from lepton_flwr.he.records import META_KEY, META_STYPE

    text = b'{"version": 1, "manifest": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    header = Array(dtype="uint8", shape=(len(text),), stype=META_STYPE, data=text)
    return ArrayRecord({**dict(arrays.items()), META_KEY: header})


@pytest.mark.parametrize("name", ["he_fedavg", "he_dp_fedavg"])
@pytest.mark.parametrize(
    ("forgery", "reason"),
    [
        ("words past Q", "has a word not below"),
        ("header nested too deep", "malformed ciphertext header"),
    ],
)
def test_a_forged_upload_is_rejected_alone_and_the_run_completes(
    keys, caplog, name, forgery, reason
):
    """Before: a scale of -1 (any node, no key needed) raised a ValueError while the server
    formatted it, and a header nested 100,000 deep a RecursionError: both ended the run.
    The packed format has no scale; words past Q stand for a forged field."""
    caplog.set_level(logging.WARNING, logger="flwr")
    forge = _words_past_q if forgery == "words past Q" else _nested_header
    strategy, mods = _strategy(name, keys, evaluate=False)
    app = _metrics_app([_forged_upload(forge), *mods])
    result = strategy.start(InProcessGrid(app, NODES), _start(), num_rounds=2)
    assert caplog.text.count("rejected the reply of node 101") == 2, caplog.text
    assert reason in caplog.text
    if name == "he_fedavg":  # the two others carried both rounds
        decrypted = decrypt_arrays(result.arrays, keys[0])["w"].numpy()
        assert np.allclose(decrypted, 2 * SHIFT, atol=flooding_atol(result.arrays, 2))
    else:
        assert [strategy.server_counts[r]["reported"] for r in (1, 2)] == [2, 2]


def test_a_reply_whose_check_raises_anything_is_rejected_alone(keys, caplog):
    """Before: a noise std sent as a list made HEDPFedAvg's check raise a TypeError, which
    ended the run; EncryptedSum now rejects the reply whatever its checks raise."""
    caplog.set_level(logging.WARNING, logger="flwr")

    def std_as_list(content, name):
        metrics = content[name]
        changed = {**metrics, "dp-share-std": [metrics["dp-share-std"]]}
        return RecordDict({**content, name: MetricRecord(changed)})

    strategy, mods = _strategy("he_dp_fedavg", keys, evaluate=False)
    app = _metrics_app([_node_101_metrics("train", std_as_list), *mods])
    strategy.start(InProcessGrid(app, NODES), _start(), num_rounds=1)
    assert "rejected the reply of node 101: cannot be read (TypeError" in caplog.text
    assert strategy.server_counts[1]["reported"] == NODES - 1


def test_he_dp_stops_before_its_running_sum_passes_what_the_flooding_covers(
    keys, caplog, monkeypatch
):
    """Before: the round after the count passed the limit ended the run with
    TooManySummedError, and the model it had was one no one may decrypt. Now training stops
    the round before, naming the count, and the last model is the result."""
    import lepton_flwr.strategies.he_dp_fedavg as he_dp

    caplog.set_level(logging.INFO, logger="flwr")
    monkeypatch.setattr(he_dp, "summed_limit", lambda drop: 12)
    strategy = he_dp_fedavg(keys[1], NODES)
    mods = [make_he_dp_mod(keys[0], workers=1)]
    result = strategy.start(InProcessGrid(_app(mods), NODES), _start(), num_rounds=6)
    assert "past the 12 that a flooded decryption covers; training stops" in caplog.text
    model = EncryptedModel.from_record(result.arrays)
    assert model.summed <= 12 and len(result.train_metrics_clientapp) < 6
    assert np.isfinite(decrypt_arrays(result.arrays, keys[0])["w"].numpy()).all()
