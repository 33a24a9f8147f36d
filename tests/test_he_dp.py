"""HE + DP: noise shares and the server's top-up under encryption; nothing shows s or r."""

import json
import math

import numpy as np
import pytest
from conftest import needs_fashion_mnist
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from lepton_flwr.strategies import HEDPFedAvg
from scipy import stats

from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.dp import ClientLevelAccountant
from lepton_flwr.dp.accounting import PrivacyBudgetExhausted
from lepton_flwr.dp.rounds import DPRounds
from lepton_flwr.he import CKKSParams, write_keys
from lepton_flwr.he.records import META_KEY
from lepton_flwr.mods import dp_share_mod, make_he_mod
from lepton_flwr.mods.he_mod import decrypt_model, encoder_for

SIZE, NODES, Z, C = 20_000, 10, 1.2, 0.8


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("keys"))


def _client_app(keys, failing=(), shares=None):
    """Clients that send back the model unchanged (Δ = 0): what arrives is pure noise.

    ``shares``, a dict, receives each client's plaintext share (what a colluder knows).
    """
    mods = [make_he_mod(keys[0], workers=1), dp_share_mod]
    if shares is not None:

        def keep_share(msg, context, call_next):
            reply = call_next(msg, context)
            if not reply.has_error():
                shares[context.node_id] = reply.content["arrays"]["w"].numpy().astype(np.float64)
            return reply

        mods.insert(1, keep_share)
    app = ClientApp(mods=mods)

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


def _start():
    return ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})


def _one_round(keys, failing, colluders=0, shares=None):
    strategy = _strategy(keys, tolerated_colluders=colluders)
    grid = InProcessGrid(_client_app(keys, failing, shares), NODES)
    replies = grid.send_and_receive(strategy.configure_train(1, _start(), ConfigRecord(), grid))
    arrays, metrics = strategy.aggregate_train(1, replies)
    strategy.test_metrics = metrics
    return strategy, grid, arrays, _decrypted(keys, arrays)


def _decrypted(keys, arrays):
    encoder, own = encoder_for(keys[0], workers=1)
    return decrypt_model(arrays, encoder, own)["w"].numpy().astype(np.float64)


@pytest.mark.parametrize("colluders", [0, 1, 3])
@pytest.mark.parametrize("failing", [(), (103, 107), (101, 102, 103, 104, 105, 106)])
def test_the_release_carries_the_same_noise_whoever_reports(keys, failing, colluders):
    """The server's top-up fills in the missing shares: variance z²C² + cσ², any r."""
    strategy, _, _, released = _one_round(keys, failing, colluders)
    share_std = Z * C / math.sqrt(NODES - colluders)  # r_max = m = 10 (fixed size)
    assert strategy._share_std == pytest.approx(share_std)
    total_variance = (Z * C) ** 2 + colluders * share_std**2
    expected_std = math.sqrt(total_variance) / NODES  # over the fixed denominator m = 10
    # 20,000 draws: within 2 % of the truth with overwhelming probability.
    assert np.std(released) == pytest.approx(expected_std, rel=0.02)
    assert abs(np.mean(released)) < 4 * expected_std / math.sqrt(SIZE)
    assert strategy.server_counts[1] == {"sampled": NODES, "reported": NODES - len(failing)}
    # ε is central DP-FedAvg's at z, whoever reported.
    central = ClientLevelAccountant("rdp", "fixed", NODES)
    central.compose(Z, 1.0)
    assert strategy.epsilon() == pytest.approx(central.epsilon(1e-3), rel=1e-9)
    assert strategy.accountant.history == [(Z, 1.0, 1, NODES)]


@pytest.mark.parametrize("failing", [(), (104, 105, 106)])
def test_colluders_who_subtract_their_shares_leave_exactly_zc(keys, failing):
    """c = 2 reporters pool their plaintext shares: what remains has std zC / d."""
    shares = {}
    strategy, _, _, released = _one_round(keys, failing, colluders=2, shares=shares)
    assert len(shares) == NODES - len(failing)
    remaining = released - shares[100] - shares[101]
    assert np.std(remaining) == pytest.approx(Z * C / NODES, rel=0.02)
    # The colluders' own shares carry σ = zC / √(r_max − c) each, not zC.
    assert np.std(shares[100]) == pytest.approx(Z * C / math.sqrt(NODES - 2) / NODES, rel=0.02)


def test_the_server_sees_only_ciphertexts_and_holds_no_key(keys):
    strategy, grid, arrays, _ = _one_round(keys, ())
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
            "summed",
        }
    assert META_KEY in arrays  # the new global model stays encrypted too


def _header(arrays):
    return json.loads(arrays[META_KEY].data)


def _poisson_rounds(keys, plan, **settings):
    """Rounds of Poisson sampling (q = 0.5 of NODES); ``plan``: round -> failing nodes.

    Returns per round: the sampled count, the train configs sent (without the round
    number), the released model's header bound (None if withheld) and the MetricRecord.
    """
    strategy = _strategy(keys, sampling="poisson", sample_rate=0.5, **settings)
    arrays, seen = _start(), []
    for rnd, failing in plan.items():
        grid = InProcessGrid(_client_app(keys, failing), NODES)
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        configs = {
            json.dumps(
                {k: v for k, v in m.content["config"].items() if k != "server-round"},
                sort_keys=True,
            )
            for m in messages
        }
        replies = grid.send_and_receive(messages)
        released, metrics = strategy.aggregate_train(rnd, replies)
        if released is not None:
            arrays = released
        bound = None if released is None else _header(released)["max_abs"]
        seen.append((strategy._sampled, configs, bound, dict(metrics)))
    return strategy, seen


def test_nothing_released_depends_on_how_many_were_sampled_or_reported(keys):
    """Rounds with different s and r send the same config and release the same figures."""
    everyone = tuple(range(100, 100 + NODES))
    plan = {1: (), 2: everyone, 3: (101, 102, 103)}
    strategy, seen = _poisson_rounds(keys, plan, min_train_nodes=0)
    counts = [(c["sampled"], c["reported"]) for c in strategy.server_counts.values()]
    assert len(set(counts)) == 3, counts  # the seed gives three different (s, r)
    configs = set().union(*(s[1] for s in seen))
    assert len(configs) == 1  # σ, B, 1/d, C: run-wide constants
    bounds = [0.0] + [s[2] for s in seen]
    steps = np.diff(bounds)
    assert steps == pytest.approx([strategy.round_bound] * 3, rel=1e-12)
    assert strategy.round_bound == pytest.approx(
        10 * strategy._share_bound + 10 * math.sqrt(10) * strategy._share_std / 5
    )
    assert [set(s[3]) for s in seen] == [{"epsilon", "delta"}] * 3
    central = ClientLevelAccountant("rdp")
    epsilons = []
    for _ in range(3):
        central.compose(Z, 0.5)
        epsilons.append(central.epsilon(1e-3))
    assert [s[3]["epsilon"] for s in seen] == pytest.approx(epsilons, rel=1e-9)
    assert strategy.accountant.history == [(Z, 0.5, 3)]


def test_more_clients_sampled_than_r_max_withholds_the_round_and_accounts_it(keys, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="flwr")
    # Binomial(10, 0.5): P(s > 6) = 0.17 <= 0.2 < P(s > 5), so r_max = 6.
    strategy, seen = _poisson_rounds(keys, dict.fromkeys(range(1, 6), ()), tail_probability=0.2)
    assert strategy._most == 6
    sampled = [s[0] for s in seen]
    withheld = [n > 6 for n in sampled]
    assert any(withheld) and not all(withheld), sampled
    for (count, configs, bound, metrics), held in zip(seen, withheld, strict=True):
        assert (bound is None) == held and (not configs) == held, (count, held)
        assert set(metrics) == {"epsilon", "delta"}
    assert strategy.accountant.history == [(Z, 0.5, 5)]  # every round, withheld or not
    assert "more than r_max = 6 clients sampled" in caplog.text
    assert "server only, not covered by epsilon" in caplog.text


def test_the_withholding_probability_adds_to_delta_and_is_logged(keys, caplog):
    """10 clients at q = 0.5: P(s = 0) = 2^-10 a round, logged as not far below δ."""
    import logging

    caplog.set_level(logging.INFO, logger="flwr")
    strategy, _ = _poisson_rounds(keys, {1: ()}, num_rounds=20)
    assert strategy._most == NODES
    assert strategy.withholding_probability == pytest.approx(2**-10, rel=1e-9)
    assert strategy.delta_addition(2.0) == pytest.approx(2**-10 * (1 + math.exp(2.0)))
    assert "NOT far below delta" in caplog.text
    # min_train_nodes = 0 releases even a round without shares: nothing is withheld.
    quiet, _ = _poisson_rounds(keys, {1: ()}, min_train_nodes=0)
    assert quiet.withholding_probability == 0.0


def test_a_round_without_shares_releases_the_top_up_alone_when_min_train_nodes_is_0(keys):
    everyone = tuple(range(100, 100 + NODES))
    strategy = _strategy(keys, min_train_nodes=0, tolerated_colluders=0)
    grid = InProcessGrid(_client_app(keys, everyone), NODES)
    replies = grid.send_and_receive(strategy.configure_train(1, _start(), ConfigRecord(), grid))
    arrays, metrics = strategy.aggregate_train(1, replies)
    released = _decrypted(keys, arrays)
    assert np.std(released) == pytest.approx(Z * C / NODES, rel=0.02)
    assert set(metrics) == {"epsilon", "delta"} and strategy.server_counts[1]["reported"] == 0


def test_dropouts_cost_no_epsilon_and_never_pass_the_budget(keys):
    full = ClientLevelAccountant("rdp", "fixed", NODES)
    full.compose(Z, 1.0, 2)
    budget = full.epsilon(1e-3) * 1.001  # two rounds fit, a third does not
    strategy = _strategy(keys, tolerated_colluders=0, max_epsilon=budget)
    epsilons = []
    for rnd, failing in ((1, ()), (2, (101, 102, 103, 104, 105, 106))):
        grid = InProcessGrid(_client_app(keys, failing), NODES)
        replies = grid.send_and_receive(
            strategy.configure_train(rnd, _start(), ConfigRecord(), grid)
        )
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        assert arrays is not None
        epsilons.append(metrics["epsilon"])
    assert epsilons[1] == pytest.approx(full.epsilon(1e-3), rel=1e-9)
    with pytest.raises(PrivacyBudgetExhausted):
        strategy.configure_train(3, _start(), ConfigRecord(), InProcessGrid(_client_app(keys), 10))


def test_too_few_colluder_proof_clients_is_a_clear_error(keys):
    strategy = _strategy(keys, tolerated_colluders=NODES)
    grid = InProcessGrid(_client_app(keys), NODES)
    with pytest.raises(ValueError, match="cannot carry the noise against 10 tolerated"):
        strategy.configure_train(1, _start(), ConfigRecord(), grid)


def test_r_max_is_the_smallest_count_with_the_tail_below_the_bound():
    rounds = DPRounds(noise_multiplier=1.0, delta=1e-5, sample_rate=0.1)
    rounds.population = 1000
    most = rounds.most_sampled(1e-10)
    assert stats.binom.sf(most, 1000, 0.1) <= 1e-10 < stats.binom.sf(most - 1, 1000, 0.1)
    assert most == 165
    # The main job: P(s = 0) is 0.9^1000; the sampling part of p is below 1e-10 a round.
    assert rounds.withholding_probability(most, 1, 0.0) < 1e-10
    rounds.population = 10
    assert rounds.most_sampled(1e-10) == 10


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
    assert rows[-1]["epsilon"] == pytest.approx(3.0, rel=0.02)
    assert not {"noise_multiplier_present", "clients_reported"} & set(rows[0])
    accuracy = evaluate_encrypted_model(cfg, folder / ENCRYPTED_MODEL_FILE, secret)["accuracy"]
    assert accuracy > 0.3, accuracy  # chance is 0.1
