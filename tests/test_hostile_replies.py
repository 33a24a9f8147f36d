"""Hostile replies against Flower's own loop: each is rejected alone or caught, never silent.

Issue 12's classes that concern the values a client encrypts: a header that lies about
its bound, values past the public bound under the right key, a ciphertext under another
key carrying the server's fingerprint, and an example count that would take the sum past
the CKKS headroom.
"""

import logging

import numpy as np
import pytest
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
    assert np.allclose(decrypt_arrays(result.arrays, keys[0])["w"].numpy(), SHIFT, atol=1e-4)


def test_clients_clamp_to_the_public_bound_and_declare_it(keys):
    """An honest client's weights past ±b are clamped; its header declares weight × b."""
    grid = InProcessGrid(_app([make_he_mod(keys[0], workers=1)]), NODES)
    strategy = _he_fedavg(keys, value_bound=0.005)  # below the trained weights (0.01)
    result = strategy.start(grid, _start(), num_rounds=1)
    model = EncryptedModel.from_record(result.arrays)
    assert model.max_abs == pytest.approx(NODES * 10 * 0.005)
    assert np.allclose(decrypt_arrays(result.arrays, keys[0])["w"].numpy(), 0.005, atol=1e-4)


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

    result = _he_fedavg(keys).start(InProcessGrid(app, NODES), _start(), num_rounds=1)
    assert "rejected the reply of node 101" in caplog.text
    assert "past the safe CKKS bound" in caplog.text
    assert np.allclose(decrypt_arrays(result.arrays, keys[0])["w"].numpy(), SHIFT, atol=1e-4)


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
    strategy = HEDPFedAvg(
        keys[1],
        noise_multiplier=0.5,
        clip_norm=1.0,
        delta=1e-3,
        sample_rate=1.0,
        sampling="fixed",
        min_available_nodes=NODES,
        workers=1,
    )
    result = strategy.start(InProcessGrid(_app(mods), NODES), _start(), num_rounds=2)
    assert "falling back to the last good global model, sent in round 1" in caplog.text
    metrics = result.train_metrics_clientapp
    assert metrics[2]["clients-reported"] == 0
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
        (_unknown_array_type, "cannot be read as numbers"),
        (_loss_as_list, None),  # a valid update: kept; the metrics are not aggregated
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
    if reason is None:
        assert "metrics were not aggregated" in caplog.text
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
    assert np.allclose(decrypt_arrays(result.arrays, keys[0])["w"].numpy(), 2 * SHIFT, atol=1e-4)
