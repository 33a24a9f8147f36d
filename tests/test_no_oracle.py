"""A client is not a decryption service (issue 18, item 1).

A server holding only the public context builds ciphertexts from a client's upload (a
one-slot mask, a forged scale) and sends them to another client. Before: the client's
refusal quoted the largest decrypted value, and the server read a client's model value
by value, two messages per value. Now the refusal is a fixed sentence, each client
decrypts at most one model per round, and only ciphertexts shaped like a sum of fresh
uploads.
"""

import logging

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi
from conftest import client_message
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lepton_flwr import protocol
from lepton_flwr.he import CkksAdder, CkksEncoder, CKKSParams, EncryptedModel, TensorSpec
from lepton_flwr.he.codec import load
from lepton_flwr.he.keys import create_secret_context, fingerprint, secret_context_bytes
from lepton_flwr.mods import make_he_mod
from lepton_flwr.mods.decryptions import KEPT_MODEL, LEDGER, MAX_DECRYPTIONS, REFUSAL
from lepton_flwr.mods.he_mod import HANDLER_FAILED

SIZE = 12


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    secret = create_secret_context(CKKSParams())
    public = ts.context_from(secret.serialize(save_secret_key=False))
    path = tmp_path_factory.mktemp("keys") / "secret.ctx"
    path.write_bytes(secret_context_bytes(secret))
    return secret, public, path


def _app(path, evaluated):
    """A client with he_mod whose evaluation reports a value computed from the model."""
    app = ClientApp(mods=[make_he_mod(path, workers=1, allow_evaluation=True)])

    @app.train()
    def train(msg, context):
        arrays = ArrayRecord({k: Array(v.numpy() + 0.01) for k, v in msg.content["arrays"].items()})
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg, context):
        weights = msg.content["arrays"]["w"].numpy()
        evaluated.append(weights.copy())
        metrics = MetricRecord({"num-examples": 1, "eval-loss": float(weights.sum())})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def _context():
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _message(arrays, server_round, message_type="evaluate"):
    config = {protocol.SERVER_ROUND: server_round, protocol.VALUE_BOUND: 100.0}
    return client_message(arrays, config, server_round, message_type)


def _model(secret, public, values, *, max_abs=None, chunks=None):
    """An honest sum of one fresh upload of ``values`` (or the given chunks), as a record."""
    if chunks is None:
        upload = CkksEncoder(secret, workers=1).encrypt(np.asarray(values, dtype=np.float64))
        chunks, _ = CkksAdder(public).sum_updates([upload], workers=1)
    bound = float(np.abs(values).max()) if max_abs is None else max_abs
    manifest = [TensorSpec("w", (SIZE,), "float32")]
    return EncryptedModel(manifest, chunks, 1.0, fingerprint(public), bound).to_record()


def _masked(public, chunks, slot):
    """What the review's server did: one sum times a one-slot plaintext mask, sent as a
    sum (c1 travels whole in sums and downloads, so a server can send this product; the
    packed format carries no scale, so it reads at the key's, as a forged scale did)."""
    from lepton_flwr.he.seal_words import ciphertext_words

    adder = CkksAdder(public)
    seal = public.seal_context().data
    encoder, evaluator = sealapi.CKKSEncoder(seal), sealapi.Evaluator(seal)
    words = []
    for ciphertext in load(adder.formats, chunks):
        mask, plain = [0.0] * encoder.slot_count(), sealapi.Plaintext()
        mask[slot] = 1.0
        encoder.encode(mask, 2.0**20, plain)
        evaluator.multiply_plain_inplace(ciphertext, plain)
        words.append(ciphertext_words(ciphertext))
    stacked = np.stack(words)
    c0 = adder.formats.ring.transform(stacked[:, 0], to_ntt=False)
    return adder.formats.sum_chunks(c0, stacked[:, 1])


def _decryptions(context):
    ledger = context.state.config_records.get(LEDGER)
    return int(ledger["count"]) if ledger else 0


@pytest.mark.parametrize("secret_value", [0.3, -7.25])
def test_a_masked_upload_reveals_at_most_a_fixed_refusal(keys, secret_value):
    """Before: the refusal quoted the masked value (the review read 12 of 12 values)."""
    secret, public, path = keys
    values = np.zeros(SIZE)
    values[3] = secret_value
    upload = CkksEncoder(secret, workers=1).encrypt(values)  # client A's upload
    total, _ = CkksAdder(public).sum_updates([upload], workers=1)
    evaluated = []
    app, context = _app(path, evaluated), _context()
    chunks = _masked(public, total, 3)
    reply = app(_message(_model(secret, public, values, max_abs=1e-6, chunks=chunks), 1), context)
    assert reply.has_error() and not evaluated
    assert _decryptions(context) == 1  # decrypted once, refused
    assert reply.error.reason == f"he_mod: {REFUSAL}"  # the same sentence whatever the value
    assert str(abs(secret_value)) not in reply.error.reason


def test_a_refusal_is_the_same_sentence_whatever_the_values(keys):
    secret, public, path = keys
    reasons = []
    for values in (np.full(SIZE, 0.5), np.linspace(-40, 40, SIZE)):
        app = _app(path, [])
        reply = app(_message(_model(secret, public, values, max_abs=1e-3), 1), _context())
        reasons.append(reply.error.reason)
    assert reasons[0] == reasons[1] == f"he_mod: {REFUSAL}"


def test_one_model_per_round_evaluated_then_trained_on(keys):
    """Evaluation of round r and training of round r + 1 share one decryption."""
    secret, public, path = keys
    evaluated = []
    app, context = _app(path, evaluated), _context()
    model = _model(secret, public, np.linspace(-1, 1, SIZE))
    assert not app(_message(model, 1, "evaluate"), context).has_error()
    reply = app(_message(model, 2, "train"), context)
    assert not reply.has_error(), reply.error.reason
    assert _decryptions(context) == 1
    other = _model(secret, public, np.linspace(-2, 2, SIZE))
    for server_round, kind in ((1, "evaluate"), (2, "train"), (1, "train")):
        reply = app(_message(other, server_round, kind), context)
        assert reply.has_error() and "without decrypting" in reply.error.reason
    assert _decryptions(context) == 1 and len(evaluated) == 1


def test_a_refused_model_stays_refused_without_decrypting_again(keys):
    secret, public, path = keys
    app, context = _app(path, []), _context()
    model = _model(secret, public, np.full(SIZE, 3.0), max_abs=1e-3)
    first = app(_message(model, 4, "evaluate"), context)
    again = app(_message(model, 5, "train"), context)  # the same model, next round's training
    assert first.error.reason == again.error.reason == f"he_mod: {REFUSAL}"
    assert _decryptions(context) == 1


def test_a_run_decrypts_at_most_the_models_its_flooding_is_sized_for(keys):
    secret, public, path = keys
    app, context = _app(path, []), _context()
    model = _model(secret, public, np.linspace(-1, 1, SIZE))
    assert not app(_message(model, 1), context).has_error()
    ledger = dict(context.state.config_records[LEDGER])
    context.state[LEDGER] = type(context.state.config_records[LEDGER])(
        {**ledger, "count": MAX_DECRYPTIONS}
    )
    reply = app(_message(_model(secret, public, np.linspace(-2, 2, SIZE)), 2), context)
    assert reply.has_error() and f"used {MAX_DECRYPTIONS} global models" in reply.error.reason


@pytest.mark.parametrize(
    "tamper",
    [
        "extra chunk",
        "no server round",
        "a word past Q",
        "a truncated chunk",
    ],
)
def test_clients_decrypt_only_well_formed_packed_models_of_their_size(keys, tamper):
    secret, public, path = keys
    values = np.linspace(-1, 1, SIZE)
    upload = CkksEncoder(secret, workers=1).encrypt(values)
    chunks, _ = CkksAdder(public).sum_updates([upload], workers=1)
    msg = _message(_model(secret, public, values, chunks=chunks), 1)
    if tamper == "extra chunk":
        msg = _message(_model(secret, public, values, chunks=chunks + chunks), 1)
    elif tamper == "no server round":
        msg = client_message(_model(secret, public, values, chunks=chunks), {}, 1, "evaluate")
    elif tamper == "a word past Q":
        forged = b"\xff" * (len(chunks[0]) // 2) + chunks[0][len(chunks[0]) // 2 :]
        msg = _message(_model(secret, public, values, chunks=[forged]), 1)
    else:
        msg = _message(_model(secret, public, values, chunks=[chunks[0][:-1]]), 1)
    evaluated = []
    context = _context()
    reply = _app(path, evaluated)(msg, context)
    assert reply.has_error() and not evaluated
    assert protocol.MODEL_REFUSED not in reply.error.reason
    assert _decryptions(context) == 0


def test_the_last_accepted_model_is_served_again_without_decrypting(keys):
    """The fallback after a refused model: the model the client accepted before."""
    secret, public, path = keys
    evaluated = []
    app, context = _app(path, evaluated), _context()
    good = _model(secret, public, np.linspace(-1, 1, SIZE))
    bad = _model(secret, public, np.full(SIZE, 3.0), max_abs=1e-3)
    assert not app(_message(good, 1, "evaluate"), context).has_error()
    assert app(_message(bad, 2, "evaluate"), context).error.reason == f"he_mod: {REFUSAL}"
    reply = app(_message(good, 3, "train"), context)  # round 3 trains on the fallback
    assert not reply.has_error(), reply.error.reason
    assert _decryptions(context) == 3  # every use counts against the budget
    kept = context.state.array_records[KEPT_MODEL]["w"].numpy()
    assert np.array_equal(kept, evaluated[0])  # not decrypted again (flooding is fresh)


def test_a_kept_model_is_used_once_per_round_and_kind(keys):
    """Third review: the same accepted ciphertext sent again with other settings let a
    handler's NaN-or-not outcome read a value 20 bits deep from one decryption. Every use
    now needs a new round (or the other kind of use in the same round) and is counted."""
    secret, public, path = keys
    app, context = _app(path, []), _context()
    model = _model(secret, public, np.linspace(-1, 1, SIZE))
    assert not app(_message(model, 1, "evaluate"), context).has_error()
    assert not app(_message(model, 2, "train"), context).has_error()  # the same round's model
    for again in (_message(model, 1, "evaluate"), _message(model, 2, "train")):
        reply = app(again, context)
        assert reply.has_error() and "already used for" in reply.error.reason
    assert _decryptions(context) == 1
    context.node_config[protocol.HE_MAX_DECRYPTIONS] = 2
    assert not app(_message(model, 3, "train"), context).has_error()  # a new round: a use
    reply = app(_message(model, 4, "train"), context)
    assert reply.has_error() and "he-max-decryptions=2" in reply.error.reason


def test_what_a_handler_says_about_a_decrypted_model_stays_on_the_client(keys):
    """Before: a handler's exception text (a value of the model) reached the server."""
    secret, public, path = keys
    app = ClientApp(mods=[make_he_mod(path, workers=1, allow_evaluation=True)])

    @app.evaluate()
    def evaluate(msg, context):
        raise ValueError(f"weight 3 is {msg.content['arrays']['w'].numpy()[3]!r}")

    context = _context()
    reply = app(_message(_model(secret, public, np.linspace(-1, 1, SIZE)), 1), context)
    assert reply.has_error() and reply.error.reason == f"he_mod: {HANDLER_FAILED}"
    assert _decryptions(context) == 1  # the ledger survives the handler's failure


def test_an_he_training_reply_carries_only_public_metrics(keys):
    """Before: HE-FedAvg replies carried train-loss, a function of the decrypted model."""
    secret, public, path = keys
    app = ClientApp(mods=[make_he_mod(path, workers=1)])

    @app.train()
    def train(msg, context):
        arrays = msg.content["arrays"]
        loss = float(arrays["w"].numpy().sum())
        metrics = MetricRecord({"num-examples": 10, "train-loss": loss, "my-metric": 1.0})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    model = _model(secret, public, np.linspace(-1, 1, SIZE))
    reply = app(_message(model, 2, "train"), _context())
    assert not reply.has_error(), reply.error.reason
    assert dict(reply.content["metrics"]) == {"num-examples": 10}


def test_with_state_dir_the_budget_holds_across_runs(keys, tmp_path):
    """Before: the cap lived in context.state, so every new run started it again."""
    secret, public, path = keys
    node = {protocol.STATE_DIR: str(tmp_path), protocol.HE_MAX_DECRYPTIONS: 2}
    app = _app(path, [])
    for run_id, server_round in ((1, 1), (1, 2), (2, 1)):
        context = Context(
            run_id=run_id, node_id=1, node_config=node, state=RecordDict(), run_config={}
        )
        values = np.linspace(-1, 1, SIZE) * server_round * run_id
        reply = app(_message(_model(secret, public, values), server_round), context)
    assert reply.has_error() and "he-max-decryptions=2" in reply.error.reason
    assert [p.name for p in tmp_path.iterdir()] == [f"he-decryptions-{fingerprint(public)}.json"]


def test_without_state_dir_the_node_says_its_count_restarts_with_each_run(
    keys, caplog, monkeypatch
):
    """Without state-dir a server that starts a new run gets the budget again (attacker
    review M2): the node says so, once a run, before its first decryption; once a run
    and process, not once a node (a simulation runs a thousand nodes in one process, a
    deployment each message in a process of its own, so each node still says it)."""
    from lepton_flwr.mods import decryptions

    monkeypatch.setattr(decryptions, "_warned_without_state_dir", set())
    caplog.set_level(logging.WARNING, logger="flwr")
    secret, public, path = keys
    app = _app(path, [])
    for run_id, node_id in ((1, 1), (1, 2), (1, 3), (2, 1)):
        context = Context(
            run_id=run_id, node_id=node_id, node_config={}, state=RecordDict(), run_config={}
        )
        for server_round in (1, 2):
            values = np.linspace(-1, 1, SIZE) * server_round
            app(_message(_model(secret, public, values), server_round), context)
        expected = 1 if run_id == 1 else 2
        assert caplog.text.count("counted for this run only") == expected


@pytest.mark.parametrize("planted", ["link", "garbage", "negative"])
def test_an_unreadable_decryption_count_stops_decryption(keys, tmp_path, planted):
    secret, public, path = keys
    count_file = tmp_path / f"he-decryptions-{fingerprint(public)}.json"
    if planted == "link":
        (tmp_path / "elsewhere").write_text('{"count": 0}')
        count_file.symlink_to(tmp_path / "elsewhere")
    else:
        count_file.write_text("{" if planted == "garbage" else '{"count": -5}')
    context = Context(
        run_id=1,
        node_id=1,
        node_config={protocol.STATE_DIR: str(tmp_path)},
        state=RecordDict(),
        run_config={},
    )
    reply = _app(path, [])(_message(_model(secret, public, np.zeros(SIZE)), 1), context)
    assert reply.has_error() and "decryption count" in reply.error.reason
    assert _decryptions(context) == 0


@pytest.mark.parametrize("raw", [0, 1025, 2.5, "lots", ""])
def test_a_decryption_budget_outside_its_range_is_refused(keys, raw):
    secret, public, path = keys
    context = Context(
        run_id=1,
        node_id=1,
        node_config={protocol.HE_MAX_DECRYPTIONS: raw},
        state=RecordDict(),
        run_config={},
    )
    reply = _app(path, [])(_message(_model(secret, public, np.zeros(SIZE)), 1), context)
    assert reply.has_error() and "is not a whole number in [1, 1024]" in reply.error.reason


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({protocol.WEIGHTED_BY: "train-loss"}, "this client weights by 'num-examples'"),
        ({protocol.WEIGHT_SCALE: -1.0}, "weight scale is not a finite number > 0"),
        ({protocol.VALUE_BOUND: None}, "no public value bound"),
    ],
)
def test_an_he_training_reply_never_carries_a_value_of_the_model(keys, config, reason):
    """Before: without he-value-bound the header held max |trained model| (the review read
    12 of 12 values of an upload through it); weighted-by=train-loss sent the loss as the
    clear weight; weight-scale=-1 made the error quote a value of the model."""
    secret, public, path = keys
    app = ClientApp(mods=[make_he_mod(path, workers=1)])

    @app.train()
    def train(msg, context):
        arrays = msg.content["arrays"]
        loss = float(np.abs(arrays["w"].numpy()).max())
        metrics = MetricRecord({"num-examples": 10, "train-loss": loss})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    values = np.linspace(-1, 1, SIZE) * 4.02
    sent = {protocol.SERVER_ROUND: 2, protocol.VALUE_BOUND: 100.0, **config}
    sent = {k: v for k, v in sent.items() if v is not None}
    message = client_message(_model(secret, public, values), sent, 2, "train")
    reply = app(message, _context())
    assert reply.has_error() and reason in reply.error.reason
    assert "4.02" not in reply.error.reason


@pytest.mark.parametrize(
    ("allow_in_mod", "node_config", "answers"),
    [
        (False, {}, False),  # the default: no evaluation of an encrypted model
        (False, {protocol.ALLOW_EVALUATION: "true"}, True),  # the node opts in
        (True, {}, True),  # the app opts in (our simulation runner)
        (True, {protocol.ALLOW_EVALUATION: "false"}, False),  # the node's word wins
        (True, {protocol.MAX_CLIP_NORM: 1.0}, False),  # a node with a floor never, unasked
    ],
)
def test_evaluating_an_encrypted_model_is_opt_in(keys, allow_in_mod, node_config, answers):
    """Second review: evaluation metrics of a model the server built read the clients' key
    (and uploads) far faster than the refusal bit. Nothing is decrypted when refused."""
    secret, public, path = keys
    evaluated = []
    app = ClientApp(mods=[make_he_mod(path, workers=1, allow_evaluation=allow_in_mod)])

    @app.evaluate()
    def evaluate(msg, context):
        evaluated.append(True)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    context = Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={}
    )
    reply = app(_message(_model(secret, public, np.zeros(SIZE)), 1), context)
    assert reply.has_error() != answers and bool(evaluated) == answers
    assert _decryptions(context) == int(answers)
    plain = ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})
    if not node_config:  # a plaintext model needs no decryption: evaluated by default
        assert not app(_message(plain, 1), _context()).has_error()
