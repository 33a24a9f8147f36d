"""HE-FedAvg: parameters, keys, codec, and whole runs driven in-process."""

import json
import logging

import numpy as np
import pytest
import tenseal as ts
import torch
from flwr.app import Array, ArrayRecord
from lepton_flwr.strategies import HEFedAvg

from lepton_flwr.apps.client import make_client_app
from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.apps.server import ENCRYPTED_MODEL_FILE, run_server
from lepton_flwr.config import ConfigError, load_config
from lepton_flwr.he import (
    CiphertextError,
    CkksAdder,
    CkksEncoder,
    CKKSParams,
    EncryptedModel,
    HEParamsError,
    create_secret_context,
    fingerprint,
    flatten,
    load_context,
    load_encrypted,
    unflatten,
    write_keys,
)
from lepton_flwr.he.records import META_KEY, chunk_key
from lepton_flwr.mods.he_mod import decrypt_model, encoder_for

# digits, a 2,410-parameter MLP (2 ciphertexts per update), 3 clients
SETUP = "+experiment=digits_smoke model=mlp model.hidden=[32] num_rounds=5"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def secret_ctx(keys):
    return load_context(keys[0], expect_secret=True)


@pytest.fixture(scope="module")
def public_ctx(keys):
    return load_context(keys[1], expect_secret=False)


# ---- parameters and keys -------------------------------------------------------------


def test_default_parameters_meet_the_128_bit_standard():
    CKKSParams().validate()
    assert sum(CKKSParams().coeff_mod_bit_sizes) <= 109


@pytest.mark.parametrize(
    ("params", "hint"),
    [
        (CKKSParams(4096, (60, 60), 40), "poly_modulus_degree=8192"),
        (CKKSParams(8192, (60, 60, 60, 60), 40), "poly_modulus_degree=16384"),
        (CKKSParams(3000, (60, 40), 40), "use one of"),
        (CKKSParams(4096, (60,), 40), "at least two primes"),
        (CKKSParams(4096, (56, 53), 50), "scale_bits"),
        (CKKSParams(4096, (56, 53), 36), "too coarse"),  # the old default: no room to flood
    ],
)
def test_insecure_or_unusable_parameters_are_refused_with_what_would_work(params, hint):
    with pytest.raises(HEParamsError, match=hint):
        params.validate()


def test_insecure_parameters_fail_at_config_time():
    with pytest.raises(ConfigError, match="Insecure"):
        load_config("strategy=he_fedavg he.coeff_mod_bit_sizes=[60,60]")


def test_server_context_holds_no_secret_key(keys, secret_ctx, public_ctx):
    assert public_ctx.is_public() and not public_ctx.has_secret_key()
    assert secret_ctx.has_secret_key()
    assert fingerprint(secret_ctx) == fingerprint(public_ctx)
    # The public file itself holds no secret key, and the server refuses a secret one.
    assert not ts.context_from(keys[1].read_bytes()).has_secret_key()
    with pytest.raises(ValueError, match="holds a secret key"):
        load_context(keys[0], expect_secret=False)
    with pytest.raises(ValueError, match="secret key"):
        HEFedAvg(secret_ctx)
    with pytest.raises(ValueError, match="secret"):
        CkksEncoder(public_ctx)


# ---- codec ---------------------------------------------------------------------------


def test_flatten_round_trip_is_exact():
    tensors = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1.5, -2.25], dtype=np.float64),
        "c": np.zeros((0,), dtype=np.float32),
    }
    vector, manifest = flatten(tensors)
    back = unflatten(vector, manifest)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and np.array_equal(back[name], tensor)


def test_encrypt_add_decrypt_precision_and_size(secret_ctx, public_ctx):
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 3, 5000) for _ in range(4)]
    encoder, adder = CkksEncoder(secret_ctx, workers=1), CkksAdder(public_ctx)
    uploads = [encoder.encrypt(u) for u in updates]
    assert len(uploads[0]) == 2  # 5000 values / 4096 per ciphertext (2,048 complex slots)
    per_value = sum(map(len, uploads[0])) / (2 * 4096)
    assert per_value < 9.6  # packed, c0 at 76 bits and a seed: 9.5 B per value, 2.38x float32
    sums, failed = adder.sum_updates(uploads, workers=1)
    assert failed == {} and len(sums) == 2
    result = encoder._decrypt_exact(sums, 5000)
    assert np.abs(result - np.sum(updates, axis=0)).max() < 1e-12  # exact: never published


def test_parallel_encryption_decrypts_to_the_same_values(secret_ctx):
    vector = np.random.default_rng(1).normal(size=4096 * 70)  # over the parallel threshold
    encoder = CkksEncoder(secret_ctx, workers=2)
    chunks = encoder.encrypt(vector)
    assert len(chunks) == 70
    assert np.abs(encoder._decrypt_exact(chunks, len(vector)) - vector).max() < 1e-7


def test_adder_rejects_garbage_and_foreign_parameters(secret_ctx, public_ctx):
    """The packed format fixes level, scale, size and NTT form: what a sender can get wrong
    is the length and the words (a scale forged in the old container is not expressible)."""
    adder = CkksAdder(public_ctx)
    good = CkksEncoder(secret_ctx, workers=1).encrypt(np.ones(10))[0]
    adder.check([good])
    with pytest.raises(CiphertextError, match="bytes"):
        adder.check([b"\x00" * 100])
    with pytest.raises(CiphertextError, match="bytes"):
        adder.check([good[: len(good) // 2]])
    other = create_secret_context(CKKSParams(8192, (60, 60, 60), 58))
    with pytest.raises(CiphertextError, match="bytes"):
        adder.check(CkksEncoder(other, workers=1).encrypt(np.ones(10)))
    download = adder.download(adder.encrypt_public(np.ones(10)), 1)
    with pytest.raises(CiphertextError, match="bytes"):  # a c1 that is not a seed's: refused
        adder.check(download)


def test_uploads_are_packed_with_a_seed_and_seeded_false_is_refused(secret_ctx, public_ctx):
    """Uploads carry c1's seed; ``seeded=False`` (full-size uploads) is refused, not ignored."""
    from lepton_flwr.config import ConfigError, load_config

    with pytest.raises(ValueError, match="seeded=False"):
        CkksEncoder(secret_ctx, workers=1, seeded=False)
    with pytest.raises(ConfigError, match="he.seeded must be true"):
        load_config("+experiment=digits_smoke he=ckks he.seeded=false")
    load_config("+experiment=digits_smoke he=ckks he.seeded=true")
    encoder = CkksEncoder(secret_ctx, workers=1)
    chunks = encoder.encrypt(np.arange(3000.0))
    assert len(chunks) == 1  # 3000 values fit one ciphertext of 4096
    assert sum(map(len, chunks)) / 4096 < 9.6  # 76 bits a value and a 64-byte seed: 2.4x
    sums, failed = CkksAdder(public_ctx).sum_updates([chunks, chunks], workers=1)
    assert failed == {}
    assert np.abs(encoder._decrypt_exact(sums, 3000) - 2 * np.arange(3000.0)).max() < 1e-6


# ---- whole runs, in process ----------------------------------------------------------


def _run(tmp_path, name, overrides, client_fn=None):
    cfg = load_config(f"{SETUP} {overrides} output_dir={tmp_path / name}")
    app = make_client_app(cfg)
    grid = InProcessGrid(client_fn(app) if client_fn else app, num_nodes=3)
    out = run_server(grid, cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return cfg, grid, out, rows


def _he(keys):
    return f"strategy=he_fedavg he.secret_context_path={keys[0]} he.public_context_path={keys[1]}"


def _decrypted_final(out, keys):
    encoder, own = encoder_for(keys[0], workers=1)
    record = load_encrypted(out / ENCRYPTED_MODEL_FILE).to_record()
    return decrypt_model(record, encoder, own).to_torch_state_dict()


@pytest.fixture(scope="module")
def plain_and_he_runs(tmp_path_factory, keys):
    tmp = tmp_path_factory.mktemp("runs")
    plain = _run(tmp, "plain", "strategy=fedavg")
    he = _run(tmp, "he", _he(keys))
    return plain, he


def test_he_fedavg_equals_plain_fedavg_after_5_rounds(plain_and_he_runs, keys):
    (_, _, plain_out, plain_rows), (_, _, he_out, he_rows) = plain_and_he_runs
    plain_model = torch.load(plain_out / "model.pt")
    he_model = _decrypted_final(he_out, keys)
    # Every decryption is flooded (σ_f ≈ 5e-5 here, lepton_flwr.he.publish): training
    # from slightly perturbed models drifts a little from plain FedAvg, and no further.
    diff = max(float((plain_model[k] - he_model[k]).abs().max()) for k in plain_model)
    assert diff < 0.05
    for he_row, plain_row in zip(he_rows, plain_rows, strict=True):
        assert he_row["federated_accuracy"] == pytest.approx(
            plain_row["federated_accuracy"], abs=0.02
        )
    assert he_rows[-1]["federated_accuracy"] > 0.85
    assert not (he_out / "model.pt").exists()


def test_the_server_receives_only_ciphertexts(plain_and_he_runs):
    _, (cfg, grid, _, he_rows) = plain_and_he_runs
    train_replies = [r for r in grid.received if r.metadata.message_type == "train"]
    assert len(train_replies) == 15 and not any(r.has_error() for r in train_replies)
    for reply in grid.received:
        for record in reply.content.array_records.values():
            assert META_KEY in record
            assert {a.stype for a in record.values()} <= {"lepton.ckks", "lepton.ckks-meta"}
            assert all(a.dtype == "uint8" for a in record.values())
    # Evaluation replies carry metrics only; no central evaluation could be run.
    assert all("central_loss" not in row for row in he_rows)


def _tamper(node, corrupt):
    """Wrap a ClientApp so that node ``node``'s training reply is corrupted."""

    def wrap(app):
        def client_fn(msg, context):
            reply = app(msg, context)
            if context.node_id == node and msg.metadata.message_type == "train":
                reply.content["arrays"] = corrupt(reply.content["arrays"])
            return reply

        return client_fn

    return wrap


def _with_chunk(record, index, data):
    arrays = dict(record.items())
    arrays[chunk_key(index)] = Array(
        dtype="uint8", shape=(len(data),), stype="lepton.ckks", data=data
    )
    return ArrayRecord(arrays)


def _drop_last_chunk(record):
    model = EncryptedModel.from_record(record)
    model.chunks = model.chunks[:-1]
    return model.to_record()


def _plaintext(record):
    model = EncryptedModel.from_record(record)
    return ArrayRecord([np.zeros(model.num_values, dtype=np.float32)])


def _foreign_key(record):
    other = create_secret_context(CKKSParams())
    model = EncryptedModel.from_record(record)
    model.chunks = CkksEncoder(other, workers=1).encrypt(np.ones(model.num_values))
    model.fingerprint = fingerprint(other)
    return model.to_record()


def _other_manifest(record):
    model = EncryptedModel.from_record(record)
    first = model.manifest[0]
    model.manifest = [
        type(first)(first.name, (first.shape[0] + 1, *first.shape[1:]), first.dtype),
        *model.manifest[1:],
    ]
    return model.to_record()


def _garbled(record):
    data = bytearray(record[chunk_key(0)].data)
    data[len(data) // 2 :] = b"\xff" * (len(data) - len(data) // 2)
    return _with_chunk(record, 0, bytes(data))


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_garbled, "has a word not below"),
        (_foreign_key, "encrypted under key"),
        (_drop_last_chunk, "chunks"),
        (_plaintext, "plaintext reply where a ciphertext is expected"),
        (_other_manifest, "manifest"),
    ],
)
def test_a_bad_reply_is_rejected_and_the_round_goes_on(tmp_path, keys, caplog, corrupt, reason):
    caplog.set_level(logging.WARNING, logger="flwr")
    overrides = f"{_he(keys)} num_rounds=2 strategy.min_train_nodes=2"
    _, _, out, rows = _run(tmp_path, "bad", overrides, _tamper(101, corrupt))
    rejections = [
        r.getMessage() for r in caplog.records if "rejected the reply of node 101" in r.getMessage()
    ]
    assert len(rejections) == 2 and all(reason in m for m in rejections), caplog.text[-2000:]
    assert "node 100" not in caplog.text and "node 102" not in caplog.text
    # The two honest clients carried both rounds; the model trained and was saved.
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[1]["federated_accuracy"] > 0.6
    assert (out / ENCRYPTED_MODEL_FILE).is_file()


def test_too_few_valid_replies_skip_the_round_and_keep_the_model(tmp_path, keys, caplog):
    caplog.set_level(logging.WARNING, logger="flwr")
    from lepton_flwr.strategies import NoModelTrainedError

    overrides = f"{_he(keys)} num_rounds=2 strategy.min_train_nodes=3"
    with pytest.raises(NoModelTrainedError, match="none of the 2 rounds produced a model"):
        _run(tmp_path, "few", overrides, _tamper(101, _garbled))
    out = tmp_path / "few"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert caplog.text.count("fewer than min_train_nodes=3; round skipped") == 2
    # Both rounds skipped: the global model is still the initial plaintext one; the run
    # failed (no summary.json) but kept its record.
    assert (out / "model.pt").is_file() and not (out / ENCRYPTED_MODEL_FILE).exists()
    assert not (out / "summary.json").exists()
    assert rows[0]["federated_accuracy"] == rows[1]["federated_accuracy"]


def test_nan_update_is_never_encrypted(tmp_path, keys):
    def nan_weights(app):
        def client_fn(msg, context):
            if context.node_id == 102 and msg.metadata.message_type == "train":
                nan = {
                    k: Array(np.full(v.shape, np.nan, dtype=np.float32))
                    for k, v in msg.content["arrays"].items()
                }
                msg.content["arrays"] = ArrayRecord(nan)
            return app(msg, context)

        return client_fn

    overrides = f"{_he(keys)} num_rounds=1 strategy.min_train_nodes=2"
    _, grid, out, rows = _run(tmp_path, "nan", overrides, nan_weights)
    errors = [r for r in grid.received if r.has_error()]
    assert len(errors) == 1 and errors[0].metadata.src_node_id == 102
    assert (
        "NaN or Inf" in errors[0].error.reason and "nothing was encrypted" in errors[0].error.reason
    )
    assert rows[0]["train_failures"] == 1 and (out / ENCRYPTED_MODEL_FILE).is_file()


def test_parallel_sum_leaves_out_an_upload_with_a_bad_chunk(secret_ctx, public_ctx):
    rng = np.random.default_rng(2)
    updates = [rng.normal(size=4096 * 40) for _ in range(8)]
    encoder, adder = CkksEncoder(secret_ctx, workers=1), CkksAdder(public_ctx)
    uploads = [encoder.encrypt(u) for u in updates]
    uploads[5][33] = b"garbage"  # in the second worker's range only
    sums, failed = adder.sum_updates(uploads, workers=2)
    assert list(failed) == [5] and "bytes, not" in failed[5]
    expected = np.sum([u for i, u in enumerate(updates) if i != 5], axis=0)
    assert np.abs(encoder._decrypt_exact(sums, len(expected)) - expected).max() < 1e-6
    serial, _ = adder.sum_updates([u for i, u in enumerate(uploads) if i != 5], workers=1)
    assert np.abs(encoder._decrypt_exact(serial, len(expected)) - expected).max() < 1e-6


def test_parallel_sums_are_the_serial_sum_byte_for_byte(secret_ctx, public_ctx):
    """Forked workers write their chunks into memory shared with the caller, not through
    the pool's pipe: with two and three workers, and the server's own sums added, the
    chunks are the serial sum's; uploads that all fail sum to nothing."""
    rng = np.random.default_rng(3)
    encoder, adder = CkksEncoder(secret_ctx, workers=1), CkksAdder(public_ctx)
    uploads = [encoder.encrypt(rng.normal(size=4096 * 37)) for _ in range(8)]
    own = [adder.encrypt_public(rng.normal(size=4096 * 37))]
    serial, _ = adder.sum_updates(uploads, workers=1, sums=own)
    for workers in (2, 3):
        parallel, failed = adder.sum_updates(uploads, workers=workers, sums=own)
        assert not failed and parallel == serial
    bad = [[b"garbage"] * 37 for _ in range(8)]
    assert adder.sum_updates(bad, workers=2)[0] == []


def test_drop_in_use_with_flowers_own_start_loop(keys):
    """A user's own ClientApp + he_mod, and HEFedAvg driven by Flower's Strategy.start."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from lepton_flwr.mods import make_he_mod

    app = ClientApp(mods=[make_he_mod(keys[0], workers=1, allow_evaluation=True)])

    @app.train()
    def train(msg, context):
        pid = context.node_config["partition-id"]
        new = {k: Array(v.numpy() + pid + 1.0) for k, v in msg.content["arrays"].items()}
        metrics = MetricRecord({"train-loss": 0.5, "num-examples": 10 * (pid + 1)})
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg, context):
        mean = float(np.mean(msg.content["arrays"]["w"].numpy()))
        return Message(
            RecordDict({"metrics": MetricRecord({"mean-w": mean, "num-examples": 1})}), reply_to=msg
        )

    grid = InProcessGrid(app, num_nodes=3)
    strategy = HEFedAvg(keys[1], min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3)
    initial = ArrayRecord({"w": Array(np.zeros((3, 4), dtype=np.float32))})
    result = strategy.start(grid, initial, num_rounds=2, train_config=ConfigRecord())
    # Weighted mean of +1, +2, +3 with weights 10, 20, 30: +14/6 per round. Decryptions
    # are flooded: σ_f / W = 6.5e-5 / 0.06 ≈ 1.1e-3 with these tiny weights.
    encoder, own = encoder_for(keys[0], workers=1)
    final = decrypt_model(result.arrays, encoder, own)["w"].numpy()
    assert final.dtype == np.float32 and np.allclose(final, 2 * 14 / 6, atol=1e-2)
    assert result.evaluate_metrics_clientapp[2]["mean-w"] == pytest.approx(2 * 14 / 6, abs=1e-2)
