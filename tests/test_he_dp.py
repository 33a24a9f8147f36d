"""HE + DP: noise shares under encryption, dropouts, accounting of the noise present."""

import json
import math

import numpy as np
import pytest
from conftest import needs_fashion_mnist
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from lepton_flwr.strategies import HEDPFedAvg

from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.dp import ClientLevelAccountant
from lepton_flwr.he import CKKSParams, write_keys
from lepton_flwr.he.records import META_KEY
from lepton_flwr.mods import dp_share_mod, make_he_mod
from lepton_flwr.mods.he_mod import decrypt_model, encoder_for

SIZE, NODES, Z, C = 20_000, 10, 1.2, 0.8


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("keys"))


def _client_app(keys, failing=()):
    """Clients that send back the model unchanged (Δ = 0): what arrives is pure noise."""
    app = ClientApp(mods=[make_he_mod(keys[0], workers=1), dp_share_mod])

    @app.train()
    def train(msg, context):
        if context.node_id in failing:
            raise RuntimeError("dropped out")
        metrics = MetricRecord({"train-loss": 0.0, "num-examples": 10})
        return Message(
            RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg
        )

    return app


def _strategy(keys, **settings):
    """HEDPFedAvg over all NODES (fixed size, q = 1), z = Z, C = C; ``settings`` override."""
    defaults = dict(
        clip_norm=C,
        noise_multiplier=Z,
        delta=1e-3,
        sample_rate=1.0,
        sampling="fixed",
        seed=0,
        min_available_nodes=NODES,
        workers=1,
    )
    return HEDPFedAvg(keys[1], **(defaults | settings))


def _one_round(keys, dropout_rate, failing, colluders=0):
    strategy = _strategy(keys, dropout_rate=dropout_rate, tolerated_colluders=colluders)
    grid = InProcessGrid(_client_app(keys, failing), NODES)
    start = ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})
    replies = grid.send_and_receive(strategy.configure_train(1, start, ConfigRecord(), grid))
    arrays, metrics = strategy.aggregate_train(1, replies)
    strategy.test_metrics = metrics
    encoder, own = encoder_for(keys[0], workers=1)
    released = decrypt_model(arrays, encoder, own)["w"].numpy().astype(np.float64)
    return strategy, grid, arrays, released


@pytest.mark.parametrize(
    ("dropout_rate", "failing", "z_present"),
    [
        (0.0, (), Z),  # everyone reports: full noise
        (0.2, (103, 107), Z),  # 2 of 10 drop, as planned: shares were sized for 8
        (0.0, (103, 107), Z * math.sqrt(8 / 10)),  # unplanned dropouts: less noise
    ],
)
def test_decrypted_noise_has_the_noise_actually_present(keys, dropout_rate, failing, z_present):
    strategy, _, _, released = _one_round(keys, dropout_rate, failing)
    expected_std = z_present * C / NODES  # noise on the sum, over the fixed denominator m = 10
    # 20,000 draws: within 2 % of the truth with overwhelming probability.
    assert np.std(released) == pytest.approx(expected_std, rel=0.02)
    assert abs(np.mean(released)) < 4 * expected_std / math.sqrt(SIZE)
    report = strategy.test_metrics  # privacy figures travel in the round's MetricRecord
    assert report["clients-sampled"] == NODES and report["clients-reported"] == NODES - len(failing)
    assert report["noise-multiplier-present"] == pytest.approx(z_present)
    assert report["epsilon"] == pytest.approx(strategy.epsilon()) and report["delta"] == 1e-3
    # ε is central DP-FedAvg's for the same total noise and sampling.
    central = ClientLevelAccountant("rdp", "fixed", NODES)
    central.compose(z_present, 1.0)
    assert strategy.epsilon() == pytest.approx(central.epsilon(1e-3), rel=1e-9)


def test_the_server_sees_only_ciphertexts_and_holds_no_key(keys):
    strategy, grid, arrays, _ = _one_round(keys, 0.0, ())
    assert not strategy.encrypted_sum.context.has_secret_key()
    train_replies = [r for r in grid.received if not r.has_error()]
    assert len(train_replies) == NODES
    for reply in train_replies:
        record = reply.content["arrays"]
        assert META_KEY in record
        assert {a.stype for a in record.values()} <= {"lepton.ckks", "lepton.ckks-meta"}
        # In the clear: only values the server itself sent or knows (issue 11, bug 4). The
        # handler's train-loss and num-examples, and the clip bit, never leave the client.
        assert set(reply.content.metric_records) == {"metrics"}
        assert dict(reply.content["metrics"]) == {
            "he-weight": 1.0,
            "dp-share-std": strategy._share_std,
            "he-bound": strategy._share_bound,
        }
        header = json.loads(record[META_KEY].data)
        assert header["weight"] == 1.0 and header["max_abs"] == strategy._share_bound
        assert set(header) == {
            "version",
            "fingerprint",
            "weight",
            "max_abs",
            "num_chunks",
            "manifest",
        }
    assert META_KEY in arrays  # the new global model stays encrypted too


def test_colluders_get_their_own_noise_and_the_accountant_discounts_their_shares(keys):
    """c = 1: shares sized for r - 1 reporters; ε counts the noise of r - 1 shares only."""
    plain, _, _, _ = _one_round(keys, 0.0, ())
    guarded, _, _, released = _one_round(keys, 0.0, (), colluders=1)
    assert guarded._share_std == pytest.approx(plain._share_std * math.sqrt(NODES / (NODES - 1)))
    # All report: against one colluder the noise present is still z; in the model, more.
    assert guarded.test_metrics["noise-multiplier-present"] == pytest.approx(Z)
    assert np.std(released) == pytest.approx(
        Z * C / NODES * math.sqrt(NODES / (NODES - 1)), rel=0.02
    )
    assert guarded.epsilon() == pytest.approx(plain.epsilon(), rel=1e-9)
    # Two dropouts: σ·sqrt(8 - 1) against one colluder.
    dropped, _, _, _ = _one_round(keys, 0.0, (103, 107), colluders=1)
    expected = Z * math.sqrt((8 - 1) / (NODES - 1))
    assert dropped.test_metrics["noise-multiplier-present"] == pytest.approx(expected)
    central = ClientLevelAccountant("rdp", "fixed", NODES)
    central.compose(expected, 1.0)
    assert dropped.epsilon() == pytest.approx(central.epsilon(1e-3), rel=1e-9)


def test_dropouts_never_take_epsilon_past_the_budget(keys, caplog):
    """A round whose reporters carry too little noise for the budget releases nothing."""
    import logging

    caplog.set_level(logging.WARNING, logger="flwr")
    full = ClientLevelAccountant("rdp", "fixed", NODES)
    full.compose(Z, 1.0, 2)
    budget = full.epsilon(1e-3) * 1.001  # two full rounds fit, a weaker second one does not
    strategy = _strategy(keys, tolerated_colluders=0, max_epsilon=budget)
    start = ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})
    epsilons = []
    for rnd, failing in ((1, ()), (2, (101, 102, 103, 104, 105, 106)), (3, ())):
        grid = InProcessGrid(_client_app(keys, failing), NODES)
        replies = grid.send_and_receive(strategy.configure_train(rnd, start, ConfigRecord(), grid))
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        epsilons.append(metrics["epsilon"])
        assert (arrays is None) == (rnd == 2)  # 4 of 10 shares: nothing released
    assert "nothing released, not accounted" in caplog.text
    assert epsilons[0] == epsilons[1] < epsilons[2] <= budget


def test_more_dropouts_cost_more_epsilon(keys):
    planned, _, _, _ = _one_round(keys, 0.2, (103, 107))
    unplanned, _, _, _ = _one_round(keys, 0.0, (103, 107))
    assert unplanned.epsilon() > planned.epsilon()


@needs_fashion_mnist
def test_main_job_preset_trains_with_he_and_dp(keys, tmp_path):
    """The README's main job, shortened to 2 rounds of 1 epoch: 1,000 clients in-process."""
    from lepton_flwr.apps.client import make_client_app
    from lepton_flwr.apps.keyholder import evaluate_encrypted_model
    from lepton_flwr.apps.server import ENCRYPTED_MODEL_FILE, run_server
    from lepton_flwr.config import load_config

    secret, public = keys
    cfg = load_config(
        f"+experiment=main num_rounds=2 train.local_epochs=1 "
        f"he.secret_context_path={secret} he.public_context_path={public} output_dir={tmp_path}"
    )
    folder = run_server(InProcessGrid(make_client_app(cfg), 1000, keep_replies=False), cfg)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_reported"] for r in rows] == [r["clients_sampled"] for r in rows]
    assert all(60 <= r["clients_sampled"] <= 140 for r in rows)  # Poisson, q = 0.1, N = 1000
    assert rows[-1]["epsilon"] == pytest.approx(3.0, rel=0.02)
    assert rows[0]["noise_multiplier_present"] == pytest.approx(rows[1]["noise_multiplier_present"])
    accuracy = evaluate_encrypted_model(cfg, folder / ENCRYPTED_MODEL_FILE, secret)["accuracy"]
    assert accuracy > 0.3, accuracy  # chance is 0.1
