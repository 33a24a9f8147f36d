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

from lepton_flwr import protocol
from lepton_flwr.apps.inprocess import InProcessGrid
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
    assert again.last_good.fall_back(4, [refusal] * NODES)
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
    from lepton_flwr.apps.server import run_server
    from lepton_flwr.config import ConfigError, load_config

    setup = (
        "+experiment=digits_smoke model=logreg strategy=dp_fedavg num_rounds=4 "
        "privacy.seed=1 privacy.sample_rate=0.7 privacy.delta=1e-3 "
        "strategy.min_available_nodes=3"
    )

    def rows(folder):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    whole = load_config(f"{setup} output_dir={tmp_path / 'whole'}")
    run_server(CrashingGrid(make_client_app(whole), 3), whole)
    crashed = load_config(f"{setup} output_dir={tmp_path / 'crashed'}")
    with pytest.raises(ServerCrashError):
        run_server(CrashingGrid(make_client_app(crashed), 3, crash_at=3), crashed)
    assert [r["round"] for r in rows(tmp_path / "crashed")] == [1, 2]
    other = load_config(f"{setup} privacy.delta=1e-4 resume={tmp_path / 'crashed'}")
    with pytest.raises(ConfigError, match="other settings for \\['privacy'\\]"):
        run_server(CrashingGrid(make_client_app(other), 3), other)
    resumed = load_config(f"{setup} resume={tmp_path / 'crashed'}")
    run_server(CrashingGrid(make_client_app(resumed), 3), resumed)
    done, expected = rows(tmp_path / "crashed"), rows(tmp_path / "whole")
    assert [r["round"] for r in done] == [1, 2, 3, 4]
    assert [r["epsilon"] for r in done] == pytest.approx(
        [r["epsilon"] for r in expected], abs=1e-9, rel=0
    )
    assert (tmp_path / "crashed" / "summary.json").is_file()
