"""Checkpoints and resume: a run stopped after round k continues as if never stopped (issue 13)."""

import json
import stat
import zipfile

import numpy as np
import pytest
from conftest import client_message
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from lepton_flwr.strategies import DPFedAvg, HEDPFedAvg
from lepton_flwr.strategies.checkpoint import (
    CHECKPOINT_FILE,
    CheckpointError,
    load_checkpoint,
)
from lepton_flwr.strategies.last_good import Verdict

from lepton_flwr import protocol
from lepton_flwr.apps.inprocess import InProcessGrid
from lepton_flwr.apps.server import run_server
from lepton_flwr.dp.accounting import ClientLevelAccountant
from lepton_flwr.he import CKKSParams, write_keys
from lepton_flwr.mods import make_he_dp_mod

NODES, SIZE, ROUNDS = 6, 20, 5


class ServerCrashError(RuntimeError):
    """The ServerApp dies."""


class CrashingGrid(InProcessGrid):
    """Dies when the ``crash_at``-th round's training messages are sent."""

    def __init__(self, app, num_nodes, crash_at=None):
        super().__init__(app, num_nodes)
        self.crash_at, self.train_rounds = crash_at, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type == "train" for m in messages):
            self.train_rounds += 1
            if self.train_rounds == self.crash_at:
                raise ServerCrashError(f"killed before round {self.crash_at}")
        return super().send_and_receive(messages, timeout=timeout)


def _app(mods=()):
    """Each client moves every weight by an amount of its own (so clipping matters)."""
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg, context):
        shift = 0.2 * (context.node_id % 7)
        new = {k: Array(v.numpy() + shift) for k, v in msg.content["arrays"].items()}
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg, context):
        metrics = MetricRecord({"num-examples": 10, "eval-loss": 1.0})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def _start():
    return ArrayRecord({"w": Array(np.zeros(SIZE, dtype=np.float32))})


def _dp():
    return DPFedAvg(
        noise_multiplier=0.8,
        clip_norm=1.0,
        adaptive=True,  # the clip norm changes every round: it must survive the restart
        delta=1e-3,
        sample_rate=0.5,
        seed=7,  # sampling and noise reproducible, so the models can be compared exactly
        min_available_nodes=NODES,
    )


def _rows(folder):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _epsilons(result):
    return [result.train_metrics_clientapp[r]["epsilon"] for r in range(1, ROUNDS + 1)]


def test_a_dp_run_resumed_after_a_crash_continues_exactly(tmp_path):
    whole = _dp().start(CrashingGrid(_app(), NODES), _start(), num_rounds=ROUNDS)
    folder = tmp_path / "run"
    with pytest.raises(ServerCrashError):
        _dp().start(
            CrashingGrid(_app(), NODES, crash_at=3), _start(), ROUNDS, checkpoint_dir=folder
        )
    assert load_checkpoint(folder).server_round == 2
    resumed = _dp().start(CrashingGrid(_app(), NODES), _start(), ROUNDS, checkpoint_dir=folder)
    assert _epsilons(resumed) == pytest.approx(_epsilons(whole), abs=1e-9, rel=0)
    for r in range(1, ROUNDS + 1):
        assert resumed.train_metrics_clientapp[r]["clip-norm"] == pytest.approx(
            whole.train_metrics_clientapp[r]["clip-norm"], abs=1e-12
        )
    assert np.array_equal(resumed.arrays["w"].numpy(), whole.arrays["w"].numpy())
    assert load_checkpoint(folder).server_round == ROUNDS


def test_a_finished_run_resumes_to_its_result(tmp_path):
    first = _dp().start(CrashingGrid(_app(), NODES), _start(), ROUNDS, checkpoint_dir=tmp_path)
    again = _dp().start(CrashingGrid(_app(), NODES), _start(), ROUNDS, checkpoint_dir=tmp_path)
    assert _epsilons(again) == _epsilons(first)


def test_resuming_with_other_privacy_settings_is_refused(tmp_path):
    _dp().start(CrashingGrid(_app(), NODES), _start(), 2, checkpoint_dir=tmp_path)
    other = DPFedAvg(noise_multiplier=0.8, delta=1e-4, sample_rate=0.5, seed=7)
    with pytest.raises(ValueError, match="resume with the same privacy settings"):
        other.start(CrashingGrid(_app(), NODES), _start(), 4, checkpoint_dir=tmp_path)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("keys"))


def _he_dp(keys):
    return HEDPFedAvg(
        keys[1],
        noise_multiplier=0.8,
        clip_norm=1.0,
        delta=1e-3,
        sample_rate=0.5,
        seed=3,
        min_available_nodes=NODES,
        workers=1,
    )


def test_an_he_dp_run_resumes_with_the_same_epsilon_and_a_ciphertext_only_checkpoint(
    tmp_path, keys
):
    mods = [make_he_dp_mod(keys[0], workers=1)]
    whole = _he_dp(keys).start(CrashingGrid(_app(mods), NODES), _start(), num_rounds=ROUNDS)
    folder = tmp_path / "run"
    with pytest.raises(ServerCrashError):
        _he_dp(keys).start(
            CrashingGrid(_app(mods), NODES, crash_at=4), _start(), ROUNDS, checkpoint_dir=folder
        )
    # What the checkpoint holds: ciphertexts and public state only, readable by the owner.
    path = folder / CHECKPOINT_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    saved = load_checkpoint(folder)
    assert saved.server_round == 3
    assert {a.stype for a in saved.arrays.values()} <= {"lepton.ckks", "lepton.ckks-meta"}
    secret = keys[0].read_bytes()
    with zipfile.ZipFile(path) as archive:
        assert all(secret[-4096:] not in archive.read(n) for n in archive.namelist())
        state = json.loads(archive.read("state.json"))["strategy_state"]
    assert set(state["rounds"]) == {"settings", "noise_multiplier", "population", "rng", "history"}
    # The fallback model (the last one clients accepted, sent in round 3) is kept, encrypted,
    # so that a refusal in the first resumed round still has a model to go back to.
    fallback = saved.state["last_good_model"]
    assert saved.state["last_good_round"] == 3
    assert {a.stype for a in fallback.values()} <= {"lepton.ckks", "lepton.ckks-meta"}
    again = _he_dp(keys)
    again.load_state(saved.state)
    assert again.last_good.model_round == 3
    # Every client refuses the first resumed round's model: the resumed strategy goes back.
    refusal = Message(
        Error(code=0, reason=f"he_dp_mod: {protocol.MODEL_REFUSED}: a value reaches 9e9"),
        reply_to=client_message(saved.arrays),
    )
    assert again.last_good.judge(4, [refusal] * NODES) is Verdict.REFUSED
    assert [a.data for a in again.last_good.model.values()] == [a.data for a in fallback.values()]
    resumed = _he_dp(keys).start(
        CrashingGrid(_app(mods), NODES), _start(), ROUNDS, checkpoint_dir=folder
    )
    assert _epsilons(resumed) == pytest.approx(_epsilons(whole), abs=1e-9, rel=0)
    reported = [resumed.train_metrics_clientapp[r]["clients-reported"] for r in range(1, 6)]
    assert reported == [whole.train_metrics_clientapp[r]["clients-reported"] for r in range(1, 6)]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not a zip", "not a readable checkpoint"),
        (None, "not a version-1 checkpoint"),
    ],
)
def test_a_damaged_checkpoint_is_refused_with_the_reason(tmp_path, content, reason):
    path = tmp_path / CHECKPOINT_FILE
    if content is None:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("state.json", json.dumps({"version": 99}))
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason):
        load_checkpoint(tmp_path)


def test_the_runner_resumes_a_crashed_run_in_its_folder(tmp_path):
    """``resume=<run folder>``: the metrics file continues, ε as in an uninterrupted run."""
    from lepton_flwr.apps.client import make_client_app
    from lepton_flwr.config import ConfigError, load_config

    setup = (
        "+experiment=digits_smoke model=logreg strategy=dp_fedavg num_rounds=4 "
        "privacy.seed=1 privacy.sample_rate=0.7 privacy.delta=1e-3 "
        "strategy.min_available_nodes=3"
    )

    whole = load_config(f"{setup} output_dir={tmp_path / 'whole'}")
    run_server(CrashingGrid(make_client_app(whole), 3), whole)
    crashed = load_config(f"{setup} output_dir={tmp_path / 'crashed'}")
    with pytest.raises(ServerCrashError):
        run_server(CrashingGrid(make_client_app(crashed), 3, crash_at=3), crashed)
    assert [r["round"] for r in _rows(tmp_path / "crashed")] == [1, 2]
    other = load_config(f"{setup} privacy.delta=1e-4 resume={tmp_path / 'crashed'}")
    with pytest.raises(ConfigError, match="other settings for \\['privacy'\\]"):
        run_server(CrashingGrid(make_client_app(other), 3), other)
    resumed = load_config(f"{setup} resume={tmp_path / 'crashed'}")
    run_server(CrashingGrid(make_client_app(resumed), 3), resumed)
    done, expected = _rows(tmp_path / "crashed"), _rows(tmp_path / "whole")
    assert [r["round"] for r in done] == [1, 2, 3, 4]
    assert [r["epsilon"] for r in done] == pytest.approx(
        [r["epsilon"] for r in expected], abs=1e-9, rel=0
    )
    assert (tmp_path / "crashed" / "summary.json").is_file()


# ---- a crash after a round's model left the server (issue 18, item 5) -------------------

KILL_ROUND = 2
KILL_POINTS = {  # where the server dies in round KILL_ROUND, once the model has left
    "aggregate": "aggregate_train composed the round, nothing released yet",
    "evaluate-send": "the round's model sent to clients for evaluation",
    "evaluate-fn": "the round's model handed to the server-side evaluate_fn",
    "train-send": "the round's model sent to clients for the next round's training",
}


def _digest(arrays):
    return b"".join(a.data for a in arrays.values())


class Releases:
    """Every model that left the server, and the noise of the aggregate that made each."""

    def __init__(self, kill_point=None):
        self.kill_point, self.killed = kill_point, False
        self.left: set[bytes] = set()  # models sent to clients or evaluated
        self.noise: dict[bytes, float] = {}  # model -> z of its release

    def kill(self, point, server_round):
        if point == self.kill_point and server_round == KILL_ROUND and not self.killed:
            self.killed = True
            raise ServerCrashError(f"killed at {point}: {KILL_POINTS[point]}")

    def observe(self, strategy):
        """Log each aggregate's noise; die after KILL_ROUND's aggregate_train if asked."""
        aggregate_train = strategy.aggregate_train

        def logged(server_round, replies):
            arrays, metrics = aggregate_train(server_round, replies)
            if arrays is not None:
                self.noise[_digest(arrays)] = metrics["noise-multiplier"]
            self.kill("aggregate", server_round)
            return arrays, metrics

        strategy.aggregate_train = logged
        return strategy

    def evaluate_fn(self, server_round, arrays):
        self.left.add(_digest(arrays))
        self.kill("evaluate-fn", server_round)
        return MetricRecord({"loss": 0.0})

    def epsilon(self, delta, sample_rate):
        """ε of every distinct noisy model that left the server, each one release."""
        accountant = ClientLevelAccountant()
        for model in self.left & set(self.noise):
            accountant.compose(self.noise[model], sample_rate)
        return accountant.epsilon(delta), len(self.left & set(self.noise))


class ReleasingGrid(InProcessGrid):
    """Logs every model it sends; dies where ``releases`` says, after sending."""

    def __init__(self, app, num_nodes, releases):
        super().__init__(app, num_nodes)
        self.releases, self.train_rounds = releases, 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)  # they left
        for msg in messages:
            if "arrays" in msg.content:
                self.releases.left.add(_digest(msg.content["arrays"]))
        kinds = {m.metadata.message_type for m in messages}
        if "train" in kinds:
            self.train_rounds += 1
            self.releases.kill("train-send", self.train_rounds - 1)  # round r+1 sends r's model
        if "evaluate" in kinds:
            self.releases.kill("evaluate-send", self.train_rounds)
        return replies


def _private_dp():
    """DP-FedAvg with secure noise (no seed): a round done again gets fresh noise."""
    return DPFedAvg(
        noise_multiplier=0.8,
        delta=1e-3,
        sample_rate=0.5,
        min_available_nodes=NODES,
        fraction_evaluate=1.0,
    )


@pytest.mark.parametrize("kill_point", list(KILL_POINTS))
def test_a_crash_at_any_point_of_a_round_never_releases_more_than_is_accounted(
    tmp_path, kill_point
):
    """Killed in round 2 once its model left the server (or just before), then resumed:
    the ε reported covers every distinct model that left, each counted as one release."""
    releases = Releases(kill_point)
    folder = tmp_path / "run"
    with pytest.raises(ServerCrashError, match=kill_point):
        releases.observe(_private_dp()).start(
            ReleasingGrid(_app(), NODES, releases),
            _start(),
            ROUNDS,
            evaluate_fn=releases.evaluate_fn,
            checkpoint_dir=folder,
        )
    resumed_strategy = releases.observe(_private_dp())
    resumed = resumed_strategy.start(
        ReleasingGrid(_app(), NODES, releases),
        _start(),
        ROUNDS,
        evaluate_fn=releases.evaluate_fn,
        checkpoint_dir=folder,
    )
    reported = resumed.train_metrics_clientapp[ROUNDS]["epsilon"]
    released, count = releases.epsilon(1e-3, 0.5)
    assert reported >= released - 1e-9
    # Nothing was spent twice either: one release per round, as in an uninterrupted run.
    assert count == ROUNDS
    assert resumed_strategy.epsilon() == pytest.approx(released, abs=1e-9, rel=0)
    # Every round has its training and its (server-side) evaluation metrics.
    assert sorted(resumed.train_metrics_clientapp) == list(range(1, ROUNDS + 1))
    assert sorted(resumed.evaluate_metrics_serverapp) == list(range(ROUNDS + 1))
    assert sorted(resumed.evaluate_metrics_clientapp) == list(range(1, ROUNDS + 1))


def test_the_runner_resumes_a_run_killed_while_evaluating_a_round(tmp_path, monkeypatch):
    """Killed in round 2's central evaluation, after the round's checkpoint: the resumed
    run evaluates round 2 again, writes its row, and trains rounds 3 and 4 only."""
    from lepton_flwr.apps import server
    from lepton_flwr.apps.client import make_client_app
    from lepton_flwr.config import load_config

    setup = (
        "+experiment=digits_smoke model=logreg strategy=dp_fedavg num_rounds=4 "
        "privacy.seed=1 privacy.sample_rate=0.7 privacy.delta=1e-3 "
        "strategy.min_available_nodes=3"
    )
    whole = load_config(f"{setup} output_dir={tmp_path / 'whole'}")
    run_server(CrashingGrid(make_client_app(whole), 3), whole)
    evaluate, calls = server.evaluate, []

    def dies_in_round_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the initial model, round 1, then round 2
            raise ServerCrashError("killed while evaluating round 2")
        return evaluate(*args, **kwargs)

    crashed = load_config(f"{setup} output_dir={tmp_path / 'crashed'}")
    monkeypatch.setattr(server, "evaluate", dies_in_round_2)
    with pytest.raises(ServerCrashError):
        run_server(CrashingGrid(make_client_app(crashed), 3), crashed)
    monkeypatch.setattr(server, "evaluate", evaluate)
    saved = load_checkpoint(tmp_path / "crashed")
    assert (saved.server_round, saved.evaluated) == (2, False)
    resumed = load_config(f"{setup} resume={tmp_path / 'crashed'}")
    grid = CrashingGrid(make_client_app(resumed), 3)
    run_server(grid, resumed)
    assert grid.train_rounds == 2  # rounds 3 and 4: round 2 is never trained again
    done, expected = _rows(tmp_path / "crashed"), _rows(tmp_path / "whole")
    assert [r["round"] for r in done] == [1, 2, 3, 4]
    for row, uninterrupted in zip(done, expected, strict=True):
        assert row["epsilon"] == pytest.approx(uninterrupted["epsilon"], abs=1e-9, rel=0)
        assert row["central_accuracy"] == pytest.approx(uninterrupted["central_accuracy"])
