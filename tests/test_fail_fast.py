"""A configuration mistake stops the run at once, with the reason (issue 21, "Fail fast").

Each mistake a new user makes (no key, no example count, no ``he_mod``, ``he_mod``
without ``dp_share_mod``, the mods in the wrong order, a mod of another strategy) used
to run every round before ``NoModelTrainedError``; without ``he_mod`` the clients sent
their updates in the clear every round. Now the run stops after the round that shows it
(:mod:`lepton_flwr.strategies.config_stop`), and a hostile node cannot stop a run by
sending the same words. Key paths must be absolute and set, on both sides.
"""

import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from lepton_flwr.strategies import (
    CheckedFedAvg,
    DPFedAvg,
    HEDPFedAvg,
    HEFedAvg,
    MisconfiguredRunError,
    NoModelTrainedError,
)
from lepton_flwr.strategies.config_stop import ConfigurationStop, reply_failure

from lepton_flwr import mistakes, protocol
from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.he import CKKSParams, write_keys
from lepton_flwr.mods import dp_share_mod, make_he_dp_mod, make_he_mod

NODES, SIZE, ROUNDS = 3, 20, 3


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("keys"))


def _app(mods=(), train_mods=(), metrics=None):
    """A user's ClientApp: moves every weight by 0.01 and reports ``metrics``."""
    app = ClientApp(mods=list(mods))

    @app.train(mods=list(train_mods))
    def train(msg, context):
        new = {k: Array(v.numpy() + 0.01) for k, v in msg.content["arrays"].items()}
        reported = MetricRecord({"num-examples": 10} if metrics is None else metrics)
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": reported}), reply_to=msg)

    return app


class CountingGrid(InProcessGrid):
    """Counts the training messages sent, and what the server received in the clear."""

    def __init__(self, client_fn, num_nodes=NODES, silent=()):
        super().__init__(client_fn, num_nodes)
        self.train_messages, self.plaintext_replies, self.silent = 0, 0, set(silent)

    def send_and_receive(self, messages, *, timeout=None):
        messages = [m for m in messages if m.metadata.dst_node_id not in self.silent]
        self.train_messages += sum(m.metadata.message_type == "train" for m in messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for reply in replies:
            arrays = [] if reply.has_error() else list(reply.content.array_records.values())
            if arrays and "w" in arrays[0]:
                self.plaintext_replies += 1
        return replies


def _start():
    return ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})


def _he(keys, **changed):
    return HEFedAvg(keys[1], **(dict(min_available_nodes=NODES, workers=1) | changed))


def _he_dp(keys, **changed):
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
    return HEDPFedAvg(keys[1], **(settings | changed))


def _dp(**changed):
    settings = dict(
        noise_multiplier=0.5,
        clip_norm=1.0,
        delta=1e-3,
        sample_rate=1.0,
        sampling="fixed",
        seed=0,
        min_available_nodes=NODES,
    )
    return DPFedAvg(**(settings | changed))


def _stopped(strategy, grid, rounds=ROUNDS):
    with pytest.raises(MisconfiguredRunError) as stop:
        strategy.start(grid, _start(), num_rounds=rounds)
    return stop.value


# ---- each mistake stops the run after its first round --------------------------------

MISTAKES = {  # name: (strategy, client mods, train handler's metrics, mistake, words shown)
    "no secret context": (
        _he,
        lambda keys: [make_he_mod(workers=1)],
        None,
        mistakes.NO_SECRET_CONTEXT,
        "--node-config",
    ),
    "no num-examples under HE": (
        _he,
        lambda keys: [make_he_mod(keys[0], workers=1)],
        {"loss": 0.5},
        mistakes.NO_WEIGHT,
        "'num-examples'",
    ),
    "no he_mod": (_he, lambda keys: [], None, mistakes.NO_HE_MOD, "ClientApp(mods=[he_mod])"),
    "no mod at all under HE + DP": (
        _he_dp,
        lambda keys: [],
        None,
        mistakes.NO_HE_MOD,
        "ClientApp(mods=[he_dp_mod])",
    ),
    "he_mod without dp_share_mod": (
        _he_dp,
        lambda keys: [make_he_mod(keys[0], workers=1)],
        None,
        mistakes.NO_DP_SHARE_MOD,
        "ClientApp(mods=[he_dp_mod])",
    ),
    "mods in the wrong order": (
        _he_dp,
        lambda keys: [dp_share_mod, make_he_mod(keys[0], workers=1)],
        None,
        mistakes.MODS_IN_WRONG_ORDER,
        "mods=[dp_share_mod, he_mod]",
    ),
    "he_mod under DPFedAvg": (
        lambda keys: _dp(),
        lambda keys: [make_he_mod(keys[0], workers=1)],
        None,
        mistakes.MOD_OF_ANOTHER_STRATEGY,
        "DPFedAvg needs no HE mod",
    ),
    "he_dp_mod under HEFedAvg": (
        _he,
        lambda keys: [make_he_dp_mod(keys[0], workers=1)],
        None,
        mistakes.MOD_OF_ANOTHER_STRATEGY,
        "he_dp_mod pairs with HEDPFedAvg",
    ),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_configuration_mistake_stops_the_run_after_its_first_round(keys, name):
    """Before: every round ran (60-75 s for 3 under flwr run), then NoModelTrainedError."""
    make_strategy, mods, metrics, mistake, shown = MISTAKES[name]
    grid = CountingGrid(_app(mods(keys), metrics=metrics))
    stop = _stopped(make_strategy(keys), grid)
    assert stop.mistake == mistake
    assert grid.train_messages == NODES  # round 1 only: nothing sent again
    assert "stopped after round 1: every reply failed for the same configuration mistake " in (
        str(stop)
    )
    assert mistake.name in str(stop) and shown in str(stop)
    assert isinstance(stop, NoModelTrainedError)  # what callers already catch
    assert sorted(stop.result.train_metrics_clientapp) in ([], [1])


def test_without_he_mod_the_plaintext_updates_are_refused_and_sent_once(keys, caplog):
    """Before: the clients' updates reached the server in the clear in every round."""
    caplog.set_level(logging.WARNING, logger="flwr")
    grid = CountingGrid(_app())
    strategy = _he(keys)
    stop = _stopped(strategy, grid, rounds=5)
    assert grid.plaintext_replies == NODES  # round 1's, and no other round's
    assert "none was kept or added" in str(stop)
    # Nothing of them is in what the run returns: the initial model, no metrics.
    assert np.array_equal(stop.result.arrays["w"].numpy(), _start()["w"].numpy())
    assert stop.result.train_metrics_clientapp == {}
    rejections = [line for line in caplog.text.splitlines() if "rejected the reply" in line]
    assert len(rejections) == NODES
    assert all(
        "plaintext reply where a ciphertext is expected: no he_mod on the client?" in line
        for line in rejections
    )


def test_no_num_examples_under_checked_fedavg_stops_after_round_one():
    grid = CountingGrid(_app(metrics={"loss": 0.5}))
    stop = _stopped(CheckedFedAvg(min_available_nodes=NODES), grid)
    assert stop.mistake == mistakes.NO_WEIGHT
    assert "no 'num-examples' in the reply's metrics" in str(stop)
    assert grid.train_messages == NODES


def test_the_wrong_mod_order_names_the_order_not_a_missing_mod(keys):
    """Before: "no dp_share_mod ran" while dp_share_mod was in the list."""
    grid = CountingGrid(_app([dp_share_mod, make_he_mod(keys[0], workers=1)]))
    _stopped(_he_dp(keys), grid)
    reasons = [r.error.reason for r in grid.received]
    assert len(reasons) == NODES
    for reason in reasons:
        assert "the mods are in the wrong order" in reason
        assert "no dp_share_mod ran" not in reason and "he_dp_mod" in reason


def test_the_right_order_by_hand_still_trains(keys):
    """[he_mod, dp_share_mod] is he_dp_mod by hand: the order check must not refuse it."""
    grid = CountingGrid(_app([make_he_mod(keys[0], workers=1), dp_share_mod]))
    result = _he_dp(keys).start(grid, _start(), num_rounds=2)
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert not any(r.has_error() for r in grid.received)


def test_a_stopped_he_dp_round_is_accounted_and_in_the_result(keys):
    """HE + DP: the stopped round was accounted as withheld; its epsilon is in the Result."""
    grid = CountingGrid(_app([make_he_mod(keys[0], workers=1)]))
    stop = _stopped(_he_dp(keys), grid)
    assert stop.result.train_metrics_clientapp[1]["epsilon"] > 0


# ---- what a hostile or unlucky node cannot do ------------------------------------------


def _one_node_claims(mistake_reason, node=100):
    """A ClientApp whose node ``node`` replies with a configuration mistake's words."""
    honest = _app()

    def client_fn(msg, context):
        if context.node_id == node:
            error = Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=mistake_reason)
            return Message(error, reply_to=msg)
        return honest(msg, context)

    return client_fn


FAKED = "he_mod: no CKKS secret context given. Give its absolute path"


def test_one_node_faking_a_mistake_does_not_stop_a_run_of_honest_nodes():
    grid = CountingGrid(_one_node_claims(FAKED))
    result = CheckedFedAvg(min_available_nodes=NODES).start(grid, _start(), num_rounds=ROUNDS)
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]


def test_one_node_alone_in_a_round_cannot_stop_a_run_of_several_nodes():
    """The only reply of round 1 (the others are silent) says "no key": no stop."""
    grid = CountingGrid(_one_node_claims(FAKED), silent={101, 102})
    with pytest.raises(NoModelTrainedError) as end:
        CheckedFedAvg(min_available_nodes=NODES, min_train_nodes=1).start(
            grid, _start(), num_rounds=ROUNDS
        )
    assert not isinstance(end.value, MisconfiguredRunError)
    assert grid.train_messages == ROUNDS  # every round ran


def test_a_silent_node_keeps_a_round_from_deciding():
    """Two nodes say "no key", the third sent nothing: it may have worked; no stop."""
    client_fn = _one_node_claims(FAKED)
    other = _one_node_claims(FAKED, node=101)

    def both(msg, context):
        return (client_fn if context.node_id == 100 else other)(msg, context)

    grid = CountingGrid(both, silent={102})
    with pytest.raises(NoModelTrainedError) as end:
        CheckedFedAvg(min_available_nodes=NODES, min_train_nodes=1).start(grid, _start(), 2)
    assert not isinstance(end.value, MisconfiguredRunError)


def test_a_mistake_after_a_round_that_worked_never_stops_the_run():
    """Once a reply passed the checks the configuration works: later failures are nodes'."""
    honest, rounds = _app(), []

    def client_fn(msg, context):
        rounds.append(msg.content["config"][protocol.SERVER_ROUND])
        if rounds[-1] >= 2:
            return Message(Error(code=6, reason=FAKED), reply_to=msg)
        return honest(msg, context)

    grid = CountingGrid(client_fn)
    result = CheckedFedAvg(min_available_nodes=NODES).start(grid, _start(), num_rounds=ROUNDS)
    assert grid.train_messages == NODES * ROUNDS
    assert sorted(result.train_metrics_clientapp) == [1]


def test_two_different_mistakes_in_a_round_decide_nothing(keys):
    other = _app([make_he_mod(workers=1)])  # no key on node 101 and 102
    plain = _app()  # no he_mod on node 100

    def client_fn(msg, context):
        return (plain if context.node_id == 100 else other)(msg, context)

    grid = CountingGrid(client_fn)
    with pytest.raises(NoModelTrainedError) as end:
        _he(keys).start(grid, _start(), num_rounds=2)
    assert not isinstance(end.value, MisconfiguredRunError)
    assert grid.train_messages == 2 * NODES


def test_one_node_a_round_stops_once_a_second_node_shows_the_same_mistake(keys):
    """Sampling one node a round: round 1's node alone decides nothing; round 2's does."""
    grid = CountingGrid(_app([make_he_mod(workers=1)]))
    strategy = _he(keys, fraction_train=0.34, min_train_nodes=1)
    stop = _stopped(strategy, grid, rounds=10)
    assert "stopped after round " in str(stop) and "2 nodes" in str(stop)
    assert grid.train_messages <= 10 and grid.train_messages >= 2
    assert stop.mistake == mistakes.NO_SECRET_CONTEXT


def test_a_federation_of_one_node_stops_after_round_one(keys):
    grid = CountingGrid(_app([make_he_mod(workers=1)]), num_nodes=1)
    stop = _stopped(_he(keys, min_available_nodes=1, min_train_nodes=1), grid)
    assert grid.train_messages == 1 and "1 nodes" in str(stop)


def test_a_resumed_run_is_never_stopped_for_its_configuration():
    stop = ConfigurationStop(worked=True)
    failure = ("he_mod: " + mistakes.NO_SECRET_CONTEXT.phrase, mistakes.NO_SECRET_CONTEXT)
    assert stop.after_round({1, 2}, {1: failure, 2: failure}, lambda: 2) is None


def test_other_failures_are_not_configuration_mistakes():
    """A ClientApp's own exception, a refusal by a node's floor, a lost node: no mistake."""
    replies = [
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="<class 'KeyError'>:<'x'>"),
        Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"he_mod: {protocol.FLOOR_REFUSAL}"),
        Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node lost"),
    ]
    for error in replies:
        msg = Message(error, reply_to=_sent())
        assert reply_failure(msg, {})[1] is None
    loading = Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason="x"), reply_to=_sent())
    assert reply_failure(loading, {})[1].name == "the ClientApp cannot be loaded"


def _sent():
    from conftest import client_message

    return client_message(_start())


# ---- key paths: set, and absolute, on both sides --------------------------------------


def test_a_relative_secret_context_path_is_refused_naming_it(keys, caplog, tmp_path):
    """Before: read from the ClientApp's working folder, so it worked or not by chance."""
    caplog.set_level(logging.ERROR, logger="flwr")
    relative = Path("keys") / "secret.ctx"
    grid = CountingGrid(_app([make_he_mod(workers=1)]))
    for context in grid.contexts.values():
        context.node_config[protocol.SECRET_CONTEXT] = str(relative)
    stop = _stopped(_he(keys), grid)
    assert stop.mistake == mistakes.RELATIVE_KEY_PATH
    reason = grid.received[0].error.reason
    assert f"he-secret-context='{relative}' (the node config) is a relative path" in reason
    assert "absolute path" in reason and str(Path.cwd()) not in reason  # cwd: the node's log
    assert f"it would read {Path.cwd() / relative}" in caplog.text


def test_a_relative_path_in_make_he_mod_is_refused_too(keys):
    grid = CountingGrid(_app([make_he_mod("secret.ctx", workers=1)]))
    stop = _stopped(_he(keys), grid)
    assert "make_he_mod('secret.ctx') is a relative path" in str(stop)


def test_an_empty_public_context_says_it_is_empty_and_how_to_set_it():
    """Before: "CKKS context file not found: <the ServerApp's folder>"."""
    with pytest.raises(ValueError) as refused:
        HEFedAvg("")
    message = str(refused.value)
    assert "the public context path is empty" in message
    assert "he-public-context='/abs/keys/public.ctx'" in message and "keygen" in message
    assert "not found" not in message
    with pytest.raises(ValueError, match="HEDPFedAvg: the public context path is empty"):
        _he_dp(["", ""])


def test_a_relative_public_context_is_refused_showing_the_path_tried(keys, monkeypatch):
    monkeypatch.chdir(Path(keys[1]).parent)  # where it would even work
    with pytest.raises(ValueError) as refused:
        HEFedAvg("public.ctx")
    message = str(refused.value)
    assert "'public.ctx' is a relative path" in message
    assert f"it would read {Path.cwd() / 'public.ctx'}" in message
    assert "SuperLink was first started" in message


def test_each_mistake_phrase_names_one_mistake():
    """A phrase in two mistakes, or inside another's, would name the wrong cause."""
    phrases = [m.phrase for m in mistakes.MISTAKES]
    assert len(set(phrases)) == len(phrases) and all(phrases)
    for one in phrases:
        assert [p for p in phrases if one in p] == [one]


# ---- he_mod on @app.train only: said once, first; evaluation not repeated ------------------


class EvaluationCountingGrid(CountingGrid):
    """Counts evaluation messages too."""

    def __init__(self, client_fn, num_nodes=NODES):
        super().__init__(client_fn, num_nodes)
        self.evaluate_messages = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.evaluate_messages += sum(m.metadata.message_type == "evaluate" for m in messages)
        return super().send_and_receive(messages, timeout=timeout)


def _app_evaluating(mods=(), train_mods=()):
    app = _app(mods, train_mods)

    @app.evaluate()
    def evaluate(msg, context):  # reads the tensors: raises on ciphertexts
        mean = float(np.mean(msg.content["arrays"]["w"].numpy()))
        metrics = MetricRecord({"m": mean, "num-examples": 1})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def test_he_mod_on_train_only_is_said_once_first_and_evaluation_stops(keys, caplog):
    """Before: a warning a round, its hint after a traceback, Flower's tracebacks a round."""
    caplog.set_level(logging.INFO, logger="flwr")
    grid = EvaluationCountingGrid(_app_evaluating(train_mods=[make_he_mod(keys[0], workers=1)]))
    result = _he(keys).start(grid, _start(), num_rounds=ROUNDS)
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]  # training is unaffected
    hints = [line for line in caplog.text.splitlines() if "runs on training only" in line]
    assert len(hints) == 1 and "ClientApp(mods=[he_mod])" in hints[0]
    assert hints[0].endswith(": KeyError: 'w')")  # the failure's last line, not a traceback
    first_error = caplog.text.index("Received error in reply")
    assert caplog.text.index("runs on training only") < first_error
    assert grid.evaluate_messages == NODES  # round 1's only
    assert caplog.text.count("federated evaluation is skipped for the rest of this run") == 1


def test_nodes_refusing_encrypted_evaluation_are_explained_once_and_still_asked(keys, caplog):
    """he_mod's default refusal: one line saying so and what to set; nothing turned off."""
    caplog.set_level(logging.WARNING, logger="flwr")
    grid = EvaluationCountingGrid(_app_evaluating([make_he_mod(keys[0], workers=1)]))
    _he(keys).start(grid, _start(), num_rounds=ROUNDS)
    hints = [line for line in caplog.text.splitlines() if "every node failed to evaluate" in line]
    assert len(hints) == 1 and "fraction_evaluate=0.0" in hints[0]
    assert "allow_evaluation=True" in hints[0] and "training only" not in hints[0]
    assert grid.evaluate_messages == NODES * ROUNDS
    assert "skipped for the rest of this run" not in caplog.text


def test_one_node_whose_handler_fails_does_not_stop_the_others_evaluation(keys, caplog):
    """A node evaluated once: later all-failed rounds never turn evaluation off."""
    caplog.set_level(logging.WARNING, logger="flwr")
    good = _app_evaluating([make_he_mod(keys[0], workers=1, allow_evaluation=True)])
    bad = _app_evaluating(train_mods=[make_he_mod(keys[0], workers=1)])

    def client_fn(msg, context):
        return (good if context.node_id == 100 else bad)(msg, context)

    grid = EvaluationCountingGrid(client_fn)
    _he(keys).start(grid, _start(), num_rounds=ROUNDS)
    assert grid.evaluate_messages == NODES * ROUNDS
    assert "every node failed to evaluate" not in caplog.text


# ---- check-node: floors named, misspelt settings, what Flower's parser drops ---------------


def _check_node_cli(node_config: str) -> str:
    from lepton_flwr.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["check-node", "--node-config", node_config])
    return str(stop.value)


@pytest.mark.parametrize("written", ["dp-max-clip-norm=-1", "dp-max-clip-norm='-1'"])
def test_check_node_refuses_a_negative_clip_norm_floor_naming_the_field(written):
    message = _check_node_cli(written)
    assert "dp-max-clip-norm=-1 is not in (0, inf)" in message


def test_check_node_refuses_a_misspelt_floor_and_names_the_setting_meant():
    """A floor under another name is no floor: the node would train for any request."""
    from lepton_flwr.node_check import check_node

    problems = check_node({"dp_max_clip_norm": 1.0, "dpsgd-max-epsilon ": 3, "my-app-lr": 0.1})
    assert problems[0] == (
        "dp_max_clip_norm: not a lepton-flwr setting, so it would be ignored; did you mean "
        "dp-max-clip-norm?"
    )
    assert len(problems) == 2 and "did you mean dpsgd-max-epsilon?" in problems[1]
    assert check_node({"my-app-lr": 0.1, "batch-size": 32}) == []  # another app's keys


def test_the_node_config_text_flower_ignores_is_named():
    """Flower's parser drops 'dp-max-clip-norm = -1' (spaces around '='): no floor at all."""
    from flwr.common.config import parse_config_args

    from lepton_flwr.node_check import ignored_text

    text = "partition-id=0 dp-max-clip-norm = -1 he-secret-context='/keys/a b.ctx'"
    assert protocol.MAX_CLIP_NORM not in parse_config_args([text])  # what the SuperNode gets
    assert ignored_text(text) == [
        "'dp-max-clip-norm = -1' in the node config: not key=value (no spaces around '='); "
        "Flower ignores it"
    ]
    assert ignored_text("partition-id=0 he-secret-context='/keys/a b.ctx' x=\"q r\"") == []
    assert ignored_text("/etc/lepton/node.toml") == []  # a TOML file: Flower reads it whole


def test_check_node_shows_where_a_relative_key_path_would_be_read():
    message = _check_node_cli("he-secret-context='keys/secret.ctx'")
    assert "he-secret-context=keys/secret.ctx: give an absolute path" in message
    assert str(Path.cwd() / "keys" / "secret.ctx") in message


def test_a_run_config_naming_a_relative_public_context_is_refused_before_any_round():
    """Our ServerApp's hydra-overrides: refused as the config is read, naming the key."""
    from lepton_flwr.config import ConfigError, load_run_config

    overrides = "strategy=he_fedavg he=ckks he.public_context_path=keys/public.ctx"
    with pytest.raises(ConfigError, match="he.public_context_path takes an absolute path"):
        load_run_config(overrides, on_server=True)
    absolute = overrides.replace("=keys/", "=/keys/")
    config = load_run_config(absolute, on_server=True)
    assert config["he"]["public_context_path"] == "/keys/public.ctx"


def test_check_node_names_the_text_flowers_parser_would_drop():
    """The CLI reports it: a floor written with spaces around '=' is no floor at all."""
    message = _check_node_cli("partition-id=0 num-partitions=2 dp-max-clip-norm = -1")
    assert "'dp-max-clip-norm = -1' in the node config: not key=value" in message
