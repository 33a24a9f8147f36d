"""A Flower user's mistakes are not met with silence (issue 21, "Silent surprises").

- A resume under other settings is refused, naming each setting with both values; a
  finished run says so loudly; more rounds need ``change_num_rounds=True``.
- DP-FedAvg releases nothing in a round with no counted update (accounted as the
  withholding analysis requires) and ends a run that released no model with
  ``NoModelTrainedError``; it warns at start about settings that leave little to learn.
- DP-FedAvg says once that the clients' own training metrics are withheld, and how to
  release them.
"""

import logging
import math
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from lepton_flwr.strategies import CheckedFedAvg, DPFedAvg, HEFedAvg, NoModelTrainedError
from lepton_flwr.strategies.checkpoint import (
    CHECKPOINT_FILE,
    KEY_ENV,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from lepton_flwr.strategies.dp_utility_warnings import utility_warnings
from lepton_flwr.strategies.resume_settings import OtherSettingsError, run_settings

from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.he import CKKSParams, write_keys

NODES, SIZE = 6, 20


@pytest.fixture(autouse=True)
def checkpoint_key(tmp_path_factory, monkeypatch):
    """Each test's own checkpoint key, outside its run folders."""
    path = tmp_path_factory.mktemp("server") / "checkpoint.key"
    monkeypatch.setenv(KEY_ENV, str(path))
    return path


def _client(shift=0.05, fail=False, wrong_shape=False, metrics=None):
    """Clients that move every weight by ``shift``, or fail, or reply with another shape."""

    def client_fn(msg, context):
        if fail:
            raise RuntimeError("this node has no key")
        arrays = msg.content["arrays"]
        new = {
            k: Array(np.zeros(SIZE + 1, np.float32) if wrong_shape else v.numpy() + shift)
            for k, v in arrays.items()
        }
        reported = MetricRecord(metrics or {"num-examples": 10, "train-loss": 0.7})
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": reported}), reply_to=msg)

    return client_fn


class CountingGrid(InProcessGrid):
    """Counts the training messages it sends."""

    def __init__(self, client_fn, num_nodes):
        super().__init__(client_fn, num_nodes)
        self.train_messages = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.train_messages += sum(m.metadata.message_type == "train" for m in messages)
        return super().send_and_receive(messages, timeout=timeout)


def _start(size=SIZE):
    return ArrayRecord({"w": Array(np.zeros(size, dtype=np.float32))})


def _dp(**changed):
    settings = dict(
        noise_multiplier=1.0,
        clip_norm=1.0,
        delta=1e-3,
        sample_rate=0.5,
        seed=7,
        min_available_nodes=NODES,
    )
    return DPFedAvg(**(settings | changed))


def _epsilons(result):
    return [
        result.train_metrics_clientapp[r]["epsilon"] for r in sorted(result.train_metrics_clientapp)
    ]


# ---- resuming under other settings ----------------------------------------------------


def test_a_resume_with_another_noise_and_more_rounds_is_refused_naming_both(tmp_path):
    """The issue's case: z 0.5 instead of 1, 5 rounds instead of 3 (before: continued at
    z = 1 and ran 5 rounds without a word)."""
    _dp().start(CountingGrid(_client(), NODES), _start(), num_rounds=3, checkpoint_dir=tmp_path)
    grid = CountingGrid(_client(), NODES)
    with pytest.raises(OtherSettingsError) as refused:
        _dp(noise_multiplier=0.5).start(grid, _start(), num_rounds=5, checkpoint_dir=tmp_path)
    message = str(refused.value)
    assert "noise_multiplier=1.0 in the checkpoint, 0.5 here" in message
    assert "num_rounds=3 in the checkpoint, 5 here" in message
    assert f"delete {tmp_path / CHECKPOINT_FILE}" in message
    assert "another checkpoint_dir" in message and "change_num_rounds=True" in message
    assert grid.train_messages == 0  # refused before any round


OTHER_SETTINGS = {  # a change a user might make between two starts, and what is named
    "clip norm": (dict(clip_norm=2.0), "clip_norm=1.0 in the checkpoint, 2.0 here"),
    "sample rate": (dict(sample_rate=0.8), "sample_rate=0.5 in the checkpoint, 0.8 here"),
    "accountant": (dict(accountant="prv"), "accountant='rdp' in the checkpoint, 'prv' here"),
    "delta": (dict(delta=1e-4), "delta=0.001 in the checkpoint, 0.0001 here"),
    "sampling": (dict(sampling="fixed"), "sampling='poisson' in the checkpoint, 'fixed' here"),
    "adaptive clipping": (dict(adaptive=True), "adaptive=False in the checkpoint, True here"),
    "client metrics": (
        dict(release_client_metrics=True),
        "release_client_metrics=False in the checkpoint, True here",
    ),
    "calibration": (
        dict(noise_multiplier=None, target_epsilon=3.0, num_rounds=5),
        "noise_multiplier=1.0 in the checkpoint, None here",
    ),
    "clipping side": (
        dict(clipping_side="client"),
        "clipping_side='server' in the checkpoint, 'client' here",
    ),
    "min_train_nodes": (dict(min_train_nodes=3), "min_train_nodes=1 in the checkpoint, 3 here"),
    "evaluation": (
        dict(fraction_evaluate=0.5),
        "fraction_evaluate=0.0 in the checkpoint, 0.5 here",
    ),
    "budget": (dict(max_epsilon=50.0), "max_epsilon=None in the checkpoint, 50.0 here"),
}


@pytest.mark.parametrize("case", list(OTHER_SETTINGS))
def test_a_resume_under_another_privacy_or_sampling_setting_is_refused(tmp_path, case):
    changed, named = OTHER_SETTINGS[case]
    _dp().start(CountingGrid(_client(), NODES), _start(), num_rounds=2, checkpoint_dir=tmp_path)
    with pytest.raises(OtherSettingsError, match="is a run started with other settings") as err:
        _dp(**changed).start(
            CountingGrid(_client(), NODES), _start(), num_rounds=2, checkpoint_dir=tmp_path
        )
    assert named in str(err.value)


def test_a_resume_calibrated_over_other_rounds_is_refused(tmp_path):
    """z calibrated for target epsilon over 5 rounds is not the z of 8: the checkpoint's
    z would go on silently."""

    def calibrated(rounds):
        return _dp(noise_multiplier=None, target_epsilon=3.0, num_rounds=rounds)

    calibrated(5).start(CountingGrid(_client(), NODES), _start(), 2, checkpoint_dir=tmp_path)
    with pytest.raises(OtherSettingsError, match="calibration_num_rounds=5 in the checkpoint"):
        calibrated(8).start(CountingGrid(_client(), NODES), _start(), 2, checkpoint_dir=tmp_path)


def test_a_resume_with_another_strategy_or_model_is_refused(tmp_path):
    _dp().start(CountingGrid(_client(), NODES), _start(), num_rounds=2, checkpoint_dir=tmp_path)
    with pytest.raises(OtherSettingsError, match="strategy='DPFedAvg' in the checkpoint, "):
        CheckedFedAvg(min_available_nodes=NODES).start(
            CountingGrid(_client(), NODES), _start(), num_rounds=2, checkpoint_dir=tmp_path
        )
    with pytest.raises(
        OtherSettingsError,
        match=r"model tensor 0: \['w', 'float32', \[20\]\] in the checkpoint, "
        r"\['w', 'float32', \[30\]\] here",
    ):
        _dp().start(CountingGrid(_client(), NODES), _start(30), 2, checkpoint_dir=tmp_path)


def test_a_resume_with_another_key_is_refused(tmp_path):
    """Under HE the key's fingerprint is a run setting: a checkpoint of ciphertexts under
    one key is never resumed under another (refused before any round)."""
    first = write_keys(CKKSParams(), tmp_path / "first")[1]
    second = write_keys(CKKSParams(), tmp_path / "second")[1]
    saved = HEFedAvg(first, min_available_nodes=NODES, workers=1)
    settings = run_settings(saved, _start(), 2, saved.resume_settings())
    save_checkpoint(tmp_path / "run", Checkpoint(1, _start(), saved.state(), settings=settings))
    grid = CountingGrid(_client(), NODES)
    other = HEFedAvg(second, min_available_nodes=NODES, workers=1)
    shown = f"key={saved.fingerprint!r} in the checkpoint, {other.fingerprint!r} here"
    with pytest.raises(OtherSettingsError, match=re.escape(shown)):
        other.start(grid, _start(), num_rounds=2, checkpoint_dir=tmp_path / "run")
    assert grid.train_messages == 0


def test_more_rounds_on_purpose_continue_the_run_as_an_uninterrupted_one(tmp_path, caplog):
    whole = _dp().start(CountingGrid(_client(), NODES), _start(), num_rounds=4)
    _dp().start(CountingGrid(_client(), NODES), _start(), num_rounds=2, checkpoint_dir=tmp_path)
    grid = CountingGrid(_client(), NODES)
    extended = _dp().start(
        grid, _start(), num_rounds=4, checkpoint_dir=tmp_path, change_num_rounds=True
    )
    assert _epsilons(extended) == pytest.approx(_epsilons(whole), abs=1e-9, rel=0)
    assert np.array_equal(extended.arrays["w"].numpy(), whole.arrays["w"].numpy())
    assert load_checkpoint(tmp_path).settings["num_rounds"] == 4  # the run's new length
    # The next start with 4 rounds needs no flag: the run is finished, and says so.
    caplog.set_level(logging.WARNING, logger="flwr")
    again = _dp().start(CountingGrid(_client(), NODES), _start(), 4, checkpoint_dir=tmp_path)
    assert _epsilons(again) == _epsilons(extended)
    assert "already finished (4 rounds)" in caplog.text


def test_a_finished_run_says_loudly_that_it_trains_nothing(tmp_path, caplog):
    first = _dp().start(CountingGrid(_client(), NODES), _start(), 3, checkpoint_dir=tmp_path)
    caplog.set_level(logging.INFO, logger="flwr")
    grid = CountingGrid(_client(), NODES)
    again = _dp().start(grid, _start(), 3, checkpoint_dir=tmp_path)
    assert grid.train_messages == 0 and _epsilons(again) == _epsilons(first)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    finished = [w for w in warnings if "already finished" in w]
    assert len(finished) == 1
    assert "nothing is trained" in finished[0] and "returns that run's Result" in finished[0]
    assert f"delete {tmp_path / CHECKPOINT_FILE}" in finished[0]


def test_a_checkpoint_that_recorded_no_settings_is_refused(tmp_path):
    """A checkpoint of an earlier version (no run settings) cannot be checked: refused."""
    _dp().start(CountingGrid(_client(), NODES), _start(), 2, checkpoint_dir=tmp_path)
    saved = load_checkpoint(tmp_path)
    saved.settings = {}
    save_checkpoint(tmp_path, saved)
    with pytest.raises(CheckpointError, match="records no run settings"):
        _dp().start(CountingGrid(_client(), NODES), _start(), 2, checkpoint_dir=tmp_path)


# ---- DP-FedAvg: a round with no counted update releases nothing ------------------------


def _round(strategy, grid, arrays, server_round=1):
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    return strategy.aggregate_train(server_round, grid.send_and_receive(messages))


@pytest.mark.parametrize("how", ["every reply failed", "every reply rejected"])
def test_a_run_whose_every_reply_is_refused_releases_nothing_and_fails(how):
    """Before: each round released θ + noise and the run ended normally."""
    client = _client(fail=how == "every reply failed", wrong_shape=how == "every reply rejected")
    strategy = _dp(sampling="fixed", sample_rate=1.0)
    with pytest.raises(NoModelTrainedError, match="none of the 3 rounds produced a model") as err:
        strategy.start(CountingGrid(client, NODES), _start(), num_rounds=3)
    result = err.value.result
    assert np.array_equal(result.arrays["w"].numpy(), np.zeros(SIZE))  # no noise released
    # Each withheld round is accounted (fixed-size sampling always samples: p = 0).
    assert _epsilons(result) == sorted(_epsilons(result)) and _epsilons(result)[0] > 0
    assert strategy.rounds.withheld_mass == 0.0


def test_a_round_that_samples_nobody_releases_nothing_and_is_accounted():
    """q = 0.1 on 3 nodes: most rounds sample nobody. Those keep the model; each is
    accounted, and its chance (1 - q)^N adds (1 + e^eps)(1 - q)^N to delta."""
    strategy = _dp(sample_rate=0.1, min_available_nodes=3, seed=1)
    grid = InProcessGrid(_client(shift=0.05), num_nodes=3)
    arrays, released, empty = _start(), 0, 0
    for server_round in range(1, 9):
        before = arrays["w"].numpy().copy()
        new, metrics = _round(strategy, grid, arrays, server_round)
        sampled = strategy.server_counts[server_round]["sampled"]
        if sampled == 0:
            empty += 1
            assert new is None  # nothing released: the global model stays
            assert metrics["epsilon"] == pytest.approx(strategy.epsilon())
        else:
            released += 1
            arrays = new
            assert not np.array_equal(arrays["w"].numpy(), before)
    assert empty and released  # the seed gives both kinds of round
    assert sum(entry[2] for entry in strategy.accountant.history) == 8  # all composed
    assert strategy.rounds.withheld_mass == pytest.approx(8 * 0.9**3)
    epsilon = strategy.epsilon()
    assert metrics["delta"] == pytest.approx(1e-3 + 8 * 0.9**3 * (1 + math.exp(epsilon)))


def test_a_run_that_never_samples_anyone_ends_with_no_model_trained(caplog):
    caplog.set_level(logging.WARNING, logger="flwr")
    strategy = _dp(sample_rate=0.01, min_available_nodes=2, seed=0)
    grid = CountingGrid(_client(), 2)
    with pytest.raises(NoModelTrainedError, match="no reply reached the server"):
        strategy.start(grid, _start(), num_rounds=2)
    assert grid.train_messages == 0


# ---- DP-FedAvg: warnings at start ----------------------------------------------------


def test_the_start_warns_when_rounds_count_few_clients_or_noise_dwarfs_the_update(caplog):
    """The issue's setting: the default q = 0.1 on 3 nodes (d = 0.3)."""
    caplog.set_level(logging.WARNING, logger="flwr")
    strategy = _dp(sample_rate=0.1, min_available_nodes=3)
    grid = InProcessGrid(_client(), num_nodes=3)
    _round(strategy, grid, _start())
    _round(strategy, grid, _start(), 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    few = [w for w in warnings if "expected to count 0.3 clients" in w]
    assert len(few) == 1 and "samples nobody with probability 0.729" in few[0]
    # z sqrt(P) / d = 1 x sqrt(20) / 0.3 = 14.9 > 10
    noisy = [w for w in warnings if "largest mean update" in w]
    assert len(noisy) == 1 and "about 14.9 times" in noisy[0]


def test_settings_that_can_learn_raise_no_start_warning():
    assert (
        utility_warnings(
            "S", expected_clients=100, nobody_sampled=0.0, noise_multiplier=1.3, num_weights=39_700
        )
        == []
    )  # main job: 2.6
    assert (
        len(
            utility_warnings(
                "S", expected_clients=4.9, nobody_sampled=0.1, noise_multiplier=0.1, num_weights=1
            )
        )
        == 1
    )
    assert (
        len(
            utility_warnings(
                "S",
                expected_clients=10,
                nobody_sampled=0.0,
                noise_multiplier=1.0,
                num_weights=10_201,
            )
        )
        == 1
    )  # 10.1


# ---- DP-FedAvg: the clients' own metrics ---------------------------------------------


@pytest.mark.parametrize("release", [False, True])
def test_withheld_client_metrics_are_said_once_with_how_to_release_them(caplog, release):
    caplog.set_level(logging.INFO, logger="flwr")
    strategy = _dp(sampling="fixed", sample_rate=1.0, release_client_metrics=release)
    result = strategy.start(CountingGrid(_client(), NODES), _start(), num_rounds=2)
    told = [r.getMessage() for r in caplog.records if "own training metrics" in r.getMessage()]
    if release:
        assert told == [] and "train-loss" in result.train_metrics_clientapp[2]
    else:
        assert len(told) == 1
        assert "'train-loss'" in told[0] and "release_client_metrics=True" in told[0]
        assert "'num-examples'" not in told[0]  # the weight is not the user's metric
        assert "train-loss" not in result.train_metrics_clientapp[2]
