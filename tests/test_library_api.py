"""The library as a Flower user meets it: constructors, mods, guard rails, Flower's own loop."""

import logging

import numpy as np
import pytest
from conftest import flooding_atol
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.serverapp import RdpAccountant as FlowerRdpAccountant
from flwr.serverapp.exception import PrivacyBudgetExhausted as FlowerBudgetExhausted
from lepton_flwr.strategies import DPFedAvg, HEDPFedAvg, HEFedAvg, PrivacyBudgetExhausted

from lepton_flwr import protocol
from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.dp import ClientLevelAccountant, LeptonAccountant, poisson_config
from lepton_flwr.he import (
    CKKSParams,
    decrypt_arrays,
    load_encrypted_arrays,
    save_encrypted_arrays,
    write_keys,
)
from lepton_flwr.mods import (
    dp_clip_mod,
    dp_share_mod,
    he_dp_mod,
    he_mod,
    make_he_dp_mod,
    make_he_mod,
)

NODES, SIZE = 3, 50
# HE tests use weight_scale=1 (weights = example counts) and compare to 1e-4: every
# decryption is flooded with noise of std 6.5e-5 / total weight (lepton_flwr.he.publish).


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("keys"))


def _start():
    return ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})


def _app(mods=(), train_mods=(), shift=0.01, array_key="arrays"):
    """A user's ClientApp: moves every weight by ``shift``; reports its own metrics."""
    app = ClientApp(mods=list(mods))

    @app.train(mods=list(train_mods))
    def train(msg, context):
        new = {k: Array(v.numpy() + shift) for k, v in msg.content[array_key].items()}
        metrics = MetricRecord({"my-loss": 0.25, "num-examples": 10})
        return Message(RecordDict({array_key: ArrayRecord(new), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg, context):
        mean = float(np.mean(msg.content[array_key]["w"].numpy()))
        metrics = MetricRecord({"mean-w": mean, "num-examples": 1})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def _he_dp(keys, **kwargs):
    settings = dict(
        noise_multiplier=0.5,
        clip_norm=1.0,
        delta=1e-3,
        sample_rate=1.0,
        sampling="fixed",
        seed=0,
        min_available_nodes=NODES,
        workers=1,
    )
    return HEDPFedAvg(keys[1], **(settings | kwargs))


def _dp(**kwargs):
    settings = dict(
        noise_multiplier=0.5,
        delta=1e-3,
        sample_rate=1.0,
        sampling="fixed",
        seed=0,
        min_available_nodes=NODES,
    )
    return DPFedAvg(**(settings | kwargs))


def _no_model(run):
    """Run a start() that trains nothing: it raises NoModelTrainedError; return its Result."""
    from lepton_flwr.strategies import NoModelTrainedError

    with pytest.raises(NoModelTrainedError) as stop:
        run()
    return stop.value.result


# ---- guard rails ------------------------------------------------------------------------


def test_he_mod_without_dp_share_mod_sends_nothing_under_he_dp(keys, caplog):
    """Issue 10, item 1: he_mod alone with HEDPFedAvg used to pass as DP; now nothing is sent."""
    caplog.set_level(logging.WARNING, logger="flwr")
    grid = InProcessGrid(_app([make_he_mod(keys[0], workers=1)]), NODES)
    strategy = _he_dp(keys)
    result = _no_model(lambda: strategy.start(grid, _start(), num_rounds=1))
    errors = [r.error.reason for r in grid.received if r.has_error()]
    assert len(errors) == NODES
    assert all("no dp_share_mod ran" in e and "he_dp_mod" in e for e in errors)
    assert strategy.server_counts[1]["reported"] == 0
    # Withheld for its count, and accounted as a release: how many shares were valid
    # must not show in ε (issue 19 item 2).
    assert result.train_metrics_clientapp[1]["epsilon"] > 0
    assert "nothing released" in caplog.text


def test_he_dp_server_refuses_an_encrypted_reply_that_is_not_a_dp_share(keys, caplog):
    """Even if a client's he_mod does not see the noise request, the server refuses."""
    caplog.set_level(logging.WARNING, logger="flwr")

    def hide_noise_request(msg, context, call_next):  # and make it look like HEFedAvg's
        config = ConfigRecord(
            {k: v for k, v in msg.content["config"].items() if k != protocol.NOISE_SHARE_STD}
            | {protocol.VALUE_BOUND: 100.0}
        )
        msg.content = RecordDict({**msg.content, "config": config})
        return call_next(msg, context)

    grid = InProcessGrid(_app([hide_noise_request, make_he_mod(keys[0], workers=1)]), NODES)
    strategy = _he_dp(keys)
    _no_model(lambda: strategy.start(grid, _start(), num_rounds=1))
    assert caplog.text.count("not a DP share") == NODES
    assert "rejected the reply of node 100" in caplog.text
    assert strategy.server_counts[1]["reported"] == 0


def test_mods_in_the_wrong_order_say_where_they_belong(keys):
    grid = InProcessGrid(_app([dp_share_mod, make_he_mod(keys[0], workers=1)]), NODES)
    strategy = _he_dp(keys)
    grid.send_and_receive(strategy.configure_train(1, _start(), ConfigRecord(), grid))
    # Round 1 sends the plaintext initial model; round 2 an encrypted one.
    replies = grid.send_and_receive(
        strategy.configure_train(2, _encrypted_model(keys), ConfigRecord(), grid)
    )
    reasons = [r.error.reason for r in replies]
    assert all("dp_share_mod" in r and "must run inside he_mod" in r for r in reasons), reasons


def _encrypted_model(keys):
    from lepton_flwr.he import EncryptedModel, fingerprint, flatten, load_context
    from lepton_flwr.he.codec import CkksAdder

    public = load_context(keys[1], expect_secret=False)
    vector, manifest = flatten({"w": np.zeros(SIZE, dtype=np.float32)})
    chunks = CkksAdder(public).encrypt_public(vector)
    return EncryptedModel(manifest, chunks, 1.0, fingerprint(public), 0.0).to_record()


def test_fraction_train_is_refused_with_what_to_pass_instead(keys):
    for make in (lambda **kw: DPFedAvg(**kw), lambda **kw: HEDPFedAvg(keys[1], **kw)):
        with pytest.raises(ValueError, match="sample_rate") as err:
            make(fraction_train=1.0)
        assert "sampling='fixed', sample_rate=1.0" in str(err.value)


def test_min_train_nodes_is_honoured_not_a_type_error(keys, caplog):
    """``HEDPFedAvg(min_train_nodes=2)`` used to raise 'got multiple values'."""
    caplog.set_level(logging.WARNING, logger="flwr")

    def fail_two(msg, context, call_next):
        if context.node_id != 100:
            raise RuntimeError("offline")
        return call_next(msg, context)

    grid = InProcessGrid(_app([fail_two, he_dp_mod_for(keys)]), NODES)
    strategy = _he_dp(keys, min_train_nodes=2)
    result = _no_model(lambda: strategy.start(grid, _start(), 1))
    assert strategy.server_counts[1]["reported"] == 1
    assert "nothing released" in caplog.text and result.train_metrics_clientapp[1]["epsilon"] > 0


def he_dp_mod_for(keys):
    return make_he_dp_mod(keys[0], workers=1)


def test_dp_fedavg_clips_client_updates_again_and_flowers_mod_works_in_place_of_ours(caplog):
    caplog.set_level(logging.WARNING, logger="flwr")
    strategy = _dp(clipping_side="client", clip_norm=0.01)
    strategy.start(InProcessGrid(_app(shift=1.0), NODES), _start(), num_rounds=1)
    # Clipped again on the server, never rejected (issue 19): whether an update was above
    # C must not change the count of accepted updates, nor show in the log.
    assert strategy.server_counts[1]["accepted"] == NODES
    assert "rejected" not in caplog.text
    for mod in (dp_clip_mod, fixedclipping_mod):  # ours and Flower's read the same key
        grid = InProcessGrid(_app(train_mods=[mod], shift=1.0), NODES)
        strategy = _dp(clipping_side="client", clip_norm=0.01)
        strategy.start(grid, _start(), num_rounds=1)
        assert strategy.server_counts[1]["accepted"] == NODES


def test_dp_fedavg_refuses_encrypted_replies_with_a_hint(keys, caplog):
    caplog.set_level(logging.WARNING, logger="flwr")
    grid = InProcessGrid(_app([make_he_mod(keys[0], workers=1)]), NODES)
    strategy = _dp()
    # No update counted: nothing released, and the run ends as one that trained nothing.
    _no_model(lambda: strategy.start(grid, _start(), num_rounds=1))
    assert strategy.server_counts[1]["accepted"] == 0
    # The clients' he_mod refuses first: no public bound, so the update is never encrypted
    # with its real largest value in the header (issue 18).
    assert "does not come from HEFedAvg" in caplog.text and "HEDPFedAvg" in caplog.text


# ---- Flower's own round loop --------------------------------------------------------------


def test_encrypted_models_skip_the_servers_evaluate_fn_with_one_log_line(keys, caplog):
    """Issue 10, item 2: an evaluate_fn that reads tensors no longer crashes under HE."""
    caplog.set_level(logging.INFO, logger="flwr")
    calls = []

    def evaluate_fn(server_round, arrays):
        calls.append(server_round)
        return MetricRecord({"mean": float(np.mean(arrays.to_numpy_ndarrays()[0]))})

    grid = InProcessGrid(_app([make_he_mod(keys[0], workers=1, allow_evaluation=True)]), NODES)
    strategy = HEFedAvg(keys[1], min_available_nodes=NODES, workers=1, weight_scale=1.0)
    result = strategy.start(grid, _start(), num_rounds=2, evaluate_fn=evaluate_fn)
    assert calls == [0]  # the initial plaintext model only
    assert caplog.text.count("server-side evaluate_fn skipped") == 1
    final = decrypt_arrays(result.arrays, keys[0])["w"].numpy()
    assert np.allclose(final, 0.02, atol=flooding_atol(result.arrays, 2))
    assert result.evaluate_metrics_clientapp[2]["mean-w"] == pytest.approx(
        0.02, abs=flooding_atol(result.arrays, 2)
    )
    # A training loss is computed from the decrypted model: it stays on the client (issue 18).
    assert "my-loss" not in result.train_metrics_clientapp[2]


@pytest.mark.parametrize("variant", ["dp", "dp_with_client_metrics", "he_dp"])
def test_result_carries_epsilon_and_only_the_metrics_epsilon_covers(keys, variant, recwarn):
    if variant == "he_dp":
        strategy, mods = _he_dp(keys), [he_dp_mod_for(keys)]
    else:
        strategy, mods = _dp(release_client_metrics=variant != "dp"), []
    result = strategy.start(InProcessGrid(_app(mods), NODES), _start(), num_rounds=3)
    epsilons = [result.train_metrics_clientapp[r]["epsilon"] for r in (1, 2, 3)]
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2] == pytest.approx(strategy.epsilon())
    last = result.train_metrics_clientapp[3]
    assert last["delta"] == 1e-3
    # No count of clients is released (issue 19 item 2): it stays with the server.
    assert not {"clients-sampled", "clients-accepted", "clients-reported"} & set(last)
    # The clients' own metrics are un-noised: released only when the user asks (issue 10,
    # item 7: kept, no NaN; issue 11, bug 4: outside ε, so not by default).
    assert ("my-loss" in last) == (variant == "dp_with_client_metrics")
    assert not [w for w in recwarn if "Mean of empty slice" in str(w.message)]


def test_budget_stop_returns_a_result_and_is_flowers_exception(keys):
    assert issubclass(PrivacyBudgetExhausted, FlowerBudgetExhausted)
    strategy = _he_dp(keys, noise_multiplier=0.8, max_epsilon=12)
    acc, allowed = ClientLevelAccountant("rdp", "fixed", NODES), 0
    while acc.epsilon_after(0.8, 1.0, 1e-3) <= 12:
        acc.compose(0.8, 1.0)
        allowed += 1
    grid = InProcessGrid(_app([he_dp_mod_for(keys)]), NODES)
    result = strategy.start(grid, _start(), num_rounds=10)
    assert sorted(result.train_metrics_clientapp) == list(range(1, allowed + 1))
    assert result.train_metrics_clientapp[allowed]["epsilon"] <= 12
    assert decrypt_arrays(result.arrays, keys[0])["w"].numpy().shape == (SIZE,)


def test_record_keys_of_fedavg_are_honoured(keys):
    """arrayrecord_key: the strategy sends and reads the model under the user's key."""
    grid = InProcessGrid(_app(array_key="weights"), NODES)
    strategy = _dp(arrayrecord_key="weights")
    strategy.start(grid, _start(), num_rounds=1)
    assert strategy.server_counts[1]["accepted"] == NODES
    grid = InProcessGrid(_app([he_dp_mod_for(keys)], array_key="weights"), NODES)
    strategy = _he_dp(keys, arrayrecord_key="weights")
    strategy.start(grid, _start(), num_rounds=1)
    assert strategy.server_counts[1]["reported"] == NODES


# ---- keys reach the clients ---------------------------------------------------------------


def _one_train_reply(mod, node_config=None, run_config=None):
    app = _app([mod])
    context = Context(
        run_id=1,
        node_id=1,
        node_config=node_config or {},
        state=RecordDict(),
        run_config=run_config or {},
    )
    config = ConfigRecord({protocol.VALUE_BOUND: 100.0})  # what HEFedAvg sends
    msg = Message(RecordDict({"arrays": _start(), "config": config}), 1, "train")
    msg.metadata.__dict__["_message_id"] = "m1"
    return app(msg, context)


def test_missing_key_is_an_error_reply_naming_all_three_places():
    reply = _one_train_reply(he_mod)
    reason = reply.error.reason
    assert reply.has_error() and reason.startswith("he_mod:")
    for place in ("--node-config", "[tool.flwr.app.config]", "make_he_mod("):
        assert place in reason


def test_key_from_node_config_or_run_config_and_relative_paths_explained(keys, tmp_path):
    for where in ("node_config", "run_config"):
        reply = _one_train_reply(he_mod, **{where: {protocol.SECRET_CONTEXT: str(keys[0])}})
        assert not reply.has_error(), reply.error.reason
        assert "ckks-meta" in reply.content["arrays"]
    reply = _one_train_reply(make_he_mod("keys/secret.ctx"))
    assert "give an absolute path" in reply.error.reason


def test_decrypt_and_save_helpers_round_trip(keys, tmp_path):
    import torch  # noqa: F401 - Flower converts to torch only when torch is imported

    grid = InProcessGrid(_app([make_he_mod(keys[0], workers=1)]), NODES)
    result = HEFedAvg(keys[1], min_available_nodes=NODES, workers=1, weight_scale=1.0).start(
        grid, _start(), num_rounds=1
    )
    path = save_encrypted_arrays(result.arrays, tmp_path / "model.ckks.zip")
    from_file = decrypt_arrays(path, keys[0])["w"].numpy()
    again = decrypt_arrays(load_encrypted_arrays(path), keys[0])["w"].numpy()
    assert np.allclose(
        from_file, again, atol=flooding_atol(result.arrays, 2)
    ) and not np.array_equal(from_file, again)
    assert np.allclose(from_file, 0.01, atol=flooding_atol(result.arrays))
    state = decrypt_arrays(result.arrays, keys[0]).to_torch_state_dict()
    assert tuple(state["w"].shape) == (SIZE,)


def test_one_mod_for_he_dp_fixes_the_order(keys):
    assert he_dp_mod is not None
    grid = InProcessGrid(_app([he_dp_mod_for(keys)]), NODES)
    strategy = _he_dp(keys)
    strategy.start(grid, _start(), num_rounds=2)
    assert strategy.server_counts[2]["reported"] == NODES


# ---- Flower's privacy API -----------------------------------------------------------------


def test_our_accountant_speaks_flowers_protocol_and_matches_flowers_rdp():
    """Poisson, add/remove: the same ε as Flower's RdpAccountant (dp-accounting), independently."""
    event = GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=10, population_size=100)
    ours = LeptonAccountant(poisson_config(1e-5, 100, max_epsilon=6.0))
    flowers = FlowerRdpAccountant(
        PrivacyConfig(1e-5, 100, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.POISSON)
    )
    ours.compose(event, 50)
    flowers.compose(event, 50)
    assert ours.get_epsilon(1e-5) == pytest.approx(flowers.get_epsilon(1e-5), rel=0.01)
    spent = ours.get_privacy_spent()
    assert spent.num_releases == 50 and spent.delta == 1e-5
    assert ours.get_delta(spent.epsilon) == pytest.approx(1e-5, rel=0.01)
    assert not ours.would_exceed(event) and ours.would_exceed(event, count=20)
    restored = LeptonAccountant(poisson_config(1e-5, 100))
    restored.load_state_dict(ours.state_dict())
    assert restored.get_epsilon(1e-5) == ours.get_epsilon(1e-5)


def test_no_doubled_log_lines_once_opacus_is_imported(capfd):
    import subprocess
    import sys

    code = (
        "from lepton_flwr.dp import ClientLevelAccountant\n"
        "from lepton_flwr.dp.dpsgd import dpsgd_noise_multiplier\n"
        "a = ClientLevelAccountant(); a.compose(1.0, 0.1); a.epsilon(1e-5)\n"
        "dpsgd_noise_multiplier({'noise_multiplier': None, 'target_epsilon': 3, "
        "'delta': 1e-5, 'accountant': 'rdp'}, 600, 60, 2)\n"
        "from flwr.common.logger import log\n"
        "log(20, 'hello-once')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout + proc.stderr).count("hello-once") == 1


def test_he_mod_on_train_only_is_explained_by_the_server(keys, caplog):
    caplog.set_level(logging.WARNING, logger="flwr")
    grid = InProcessGrid(_app(train_mods=[make_he_mod(keys[0], workers=1)]), NODES)
    HEFedAvg(keys[1], min_available_nodes=NODES, workers=1, weight_scale=1.0).start(
        grid, _start(), num_rounds=2
    )
    assert "failed to evaluate the encrypted global model" in caplog.text
    assert "ClientApp(mods=[he_mod])" in caplog.text and "KeyError: 'w'" in caplog.text


def test_protocol_metrics_stay_out_of_the_rounds_metrics(keys):
    grid = InProcessGrid(_app([make_he_mod(keys[0], workers=1)], train_mods=[dp_clip_mod]), NODES)
    strategy = HEFedAvg(keys[1], min_available_nodes=NODES, workers=1, weight_scale=1.0)
    strategy.configure_train = _with_clipping_norm(strategy.configure_train)
    metrics = strategy.start(grid, _start(), num_rounds=1).train_metrics_clientapp[1]
    assert "my-loss" not in metrics  # under HE the clients' own metrics stay with them
    assert protocol.NORM_BIT not in metrics  # and so do the bits our mods add for the server


def _with_clipping_norm(configure_train):
    def configure(server_round, arrays, config, grid):
        config[protocol.CLIPPING_NORM] = 1.0
        return configure_train(server_round, arrays, config, grid)

    return configure


def test_he_fedavg_weights_by_the_users_weighted_by_key(keys):
    """weighted_by_key reaches the clients' he_mod, which encrypts with that weight (the
    client names the same key: the weight leaves in the clear)."""
    app = ClientApp(mods=[make_he_mod(keys[0], workers=1, weighted_by="my-weight")])

    @app.train()
    def train(msg, context):
        pid = context.node_config["partition-id"]
        new = {k: Array(v.numpy() + pid + 1.0) for k, v in msg.content["arrays"].items()}
        metrics = MetricRecord({"num-examples": 1, "my-weight": 10 * (pid + 1)})
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

    strategy = HEFedAvg(
        keys[1], weighted_by_key="my-weight", min_available_nodes=NODES, workers=1, weight_scale=1.0
    )
    strategy.min_evaluate_nodes = 0
    strategy.fraction_evaluate = 0.0
    result = strategy.start(InProcessGrid(app, NODES), _start(), num_rounds=1)
    # (1*10 + 2*20 + 3*30) / 60 = 14/6, not the unweighted 2.
    assert np.allclose(
        decrypt_arrays(result.arrays, keys[0])["w"].numpy(),
        14 / 6,
        atol=flooding_atol(result.arrays),
    )


def test_a_run_where_no_round_produced_a_model_fails_and_says_why(keys):
    """Issue 10, item 3: a run whose clients all lack their key no longer ends quietly.

    Issue 21: it stops after round 1 (it used to run both rounds first), still with
    Flower's ``AggregationError``.
    """
    from flwr.serverapp.exception import AggregationError

    grid = InProcessGrid(_app([he_mod]), NODES)
    with pytest.raises(AggregationError, match="stopped after round 1.*no CKKS secret context"):
        HEFedAvg(keys[1], min_available_nodes=NODES).start(grid, _start(), num_rounds=2)


def test_a_key_holders_evaluate_fn_sees_every_decrypted_model(keys):
    from lepton_flwr.he import keyholder_evaluate_fn

    def evaluate_fn(server_round, arrays):
        return MetricRecord({"mean": float(np.mean(arrays["w"].numpy()))})

    grid = InProcessGrid(_app([make_he_mod(keys[0], workers=1)]), NODES)
    strategy = HEFedAvg(keys[1], min_available_nodes=NODES, workers=1, weight_scale=1.0)
    result = strategy.start(
        grid, _start(), num_rounds=2, evaluate_fn=keyholder_evaluate_fn(evaluate_fn, keys[0])
    )
    means = [result.evaluate_metrics_serverapp[r]["mean"] for r in (0, 1, 2)]
    assert means == pytest.approx([0.0, 0.01, 0.02], abs=1e-4)


def _tampered_reply(field, value):
    """A mod outside he_mod that rewrites one thing in node 101's encrypted reply."""
    from lepton_flwr.he import EncryptedModel

    def tamper(msg, context, call_next):
        reply = call_next(msg, context)
        if context.node_id != 101 or msg.metadata.message_type != "train":
            return reply
        if field in ("weight", "max_abs"):
            model = EncryptedModel.from_record(reply.content["arrays"])
            setattr(model, field, value)
            reply.content = RecordDict({**reply.content, "arrays": model.to_record()})
        else:
            metrics = MetricRecord({**reply.content["metrics"], field: value})
            reply.content = RecordDict({**reply.content, "metrics": metrics})
        return reply

    return tamper


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("weight", 1e300, "disagrees with num-examples"),
        ("weight", 1e-300, "disagrees with num-examples"),
        ("num-examples", -5, "is not in [1,"),
        ("num-examples", 10**12, "is not in [1,"),
        ("num-examples", [1, 2], "whole number"),
        ("num-examples", 2.5, "whole number"),
    ],
)
def test_the_server_derives_each_weight_and_refuses_a_header_that_disagrees(
    keys, caplog, field, value, reason
):
    """Issue 12: a weight of 1e300 used to zero the model; now only that reply is refused."""
    caplog.set_level(logging.WARNING, logger="flwr")
    mods = [_tampered_reply(field, value), make_he_mod(keys[0], workers=1)]
    grid = InProcessGrid(_app(mods), NODES)
    strategy = HEFedAvg(keys[1], min_available_nodes=NODES, workers=1, weight_scale=1.0)
    result = strategy.start(grid, _start(), num_rounds=1)
    assert "rejected the reply of node 101" in caplog.text and reason in caplog.text
    # The two honest clients carried the round: each moved every weight by 0.01.
    assert np.allclose(
        decrypt_arrays(result.arrays, keys[0])["w"].numpy(), 0.01, atol=flooding_atol(result.arrays)
    )


def test_he_dp_server_refuses_a_share_whose_header_declares_another_bound(keys, caplog):
    """The header's bound must be the public one the server announced, not the client's."""
    caplog.set_level(logging.WARNING, logger="flwr")
    mods = [_tampered_reply("max_abs", 1e-3), he_dp_mod_for(keys)]
    strategy = _he_dp(keys)
    strategy.start(InProcessGrid(_app(mods), NODES), _start(), num_rounds=1)
    assert "rejected the reply of node 101" in caplog.text
    assert "not the public bound" in caplog.text
    assert strategy.server_counts[1]["reported"] == NODES - 1


def test_dp_share_mod_clamps_every_value_to_the_announced_bound():
    bound = 0.05
    config = ConfigRecord(
        {
            protocol.CLIPPING_NORM: 1.0,
            protocol.NOISE_SHARE_STD: 10.0,  # noise far beyond the bound
            protocol.UPDATE_SCALE: 1.0,
            protocol.SHARE_BOUND: bound,
        }
    )
    msg = Message(RecordDict({"arrays": _start(), "config": config}), 1, "train")
    msg.metadata.__dict__["_message_id"] = "m1"
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = _app([dp_share_mod])(msg, context)
    values = reply.content["arrays"]["w"].numpy()
    assert np.abs(values).max() <= bound and (np.abs(values) == bound).any()
    assert dict(reply.content["metrics"])[protocol.HE_BOUND] == bound


def test_turning_federated_evaluation_on_in_a_dp_strategy_says_it_is_outside_epsilon(keys, caplog):
    caplog.set_level(logging.WARNING, logger="flwr")
    _dp()
    _he_dp(keys)
    assert "federated evaluation is on" not in caplog.text
    _dp(fraction_evaluate=0.5)
    _he_dp(keys, fraction_evaluate=1.0)
    assert caplog.text.count("does not cover them") == 2
