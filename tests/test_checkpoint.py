"""Checkpoints and resume: a run stopped after round k continues as if never stopped (issue 13)."""

import hashlib
import io
import json
import re
import stat
import tracemalloc
import zipfile

import numpy as np
import pytest
from conftest import client_message
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from lepton_flwr.strategies import DPFedAvg, HEDPFedAvg
from lepton_flwr.strategies.checkpoint import (
    CHECKPOINT_FILE,
    KEY_ENV,
    MAC_MEMBER,
    STATE_MEMBER,
    CheckpointError,
    _mac,
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


@pytest.fixture(autouse=True)
def checkpoint_key(tmp_path_factory, monkeypatch):
    """Each test's own checkpoint key (made on first use), outside its run folders."""
    path = tmp_path_factory.mktemp("server") / "checkpoint.key"
    monkeypatch.setenv(KEY_ENV, str(path))
    return path


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
    with pytest.raises(ValueError, match="delta=0.001 in the checkpoint, 0.0001 here"):
        other.start(CrashingGrid(_app(), NODES), _start(), 2, checkpoint_dir=tmp_path)


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
    uninterrupted = _he_dp(keys)
    whole = uninterrupted.start(CrashingGrid(_app(mods), NODES), _start(), num_rounds=ROUNDS)
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
    rounds_keys = {"settings", "noise_multiplier", "population", "rng", "history", "withheld_mass"}
    assert set(state["rounds"]) == rounds_keys
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
    restarted = _he_dp(keys)
    resumed = restarted.start(
        CrashingGrid(_app(mods), NODES), _start(), ROUNDS, checkpoint_dir=folder
    )
    assert _epsilons(resumed) == pytest.approx(_epsilons(whole), abs=1e-9, rel=0)
    # The same clients sampled and reporting (server-side counts: never in the metrics).
    assert all(restarted.server_counts[r] == uninterrupted.server_counts[r] for r in (4, 5))
    assert restarted.withholding_probability == pytest.approx(
        uninterrupted.withholding_probability, rel=1e-12
    )


# ---- checkpoints are not trusted as found (issue 18, item 5) -----------------------------


def rewrite_checkpoint(path, change=None, key=None, members=None, compress=False):
    """Rewrite a checkpoint: ``change(state)`` edits state.json in place, ``members``
    replaces members; signed with ``key`` (what whoever holds the key could write), or
    keeping the old MAC (what whoever holds only the folder can write)."""
    with zipfile.ZipFile(path) as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    contents.update(members or {})
    if change is not None:
        state = json.loads(contents[STATE_MEMBER])
        change(state)
        contents[STATE_MEMBER] = json.dumps(state).encode()
    if key is not None:
        contents[MAC_MEMBER] = _mac(key, contents[STATE_MEMBER]).encode()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in contents.items():
            archive.writestr(name, data)


def _two_rounds(folder):
    _dp().start(CrashingGrid(_app(), NODES), _start(), 2, checkpoint_dir=folder)
    return folder / CHECKPOINT_FILE


def _rounds_state(state):
    return state["strategy_state"]["rounds"]


def _set(path, value):
    """A change setting ``state[path[0]][path[1]]... = value``."""

    def change(state):
        for step in path[:-1]:
            state = state[step]
        state[path[-1]] = value

    return change


def test_a_checkpoint_changed_by_whoever_holds_the_folder_is_refused(tmp_path):
    """An emptied accountant history lowered the reported ε; now the MAC does not match."""
    path = _two_rounds(tmp_path / "run")
    rewrite_checkpoint(path, _set(["strategy_state", "rounds", "history"], []))
    with pytest.raises(CheckpointError, match="MAC does not match"):
        _dp().start(CrashingGrid(_app(), NODES), _start(), 4, checkpoint_dir=tmp_path / "run")


def test_a_checkpoint_made_with_another_noise_multiplier_is_refused_naming_both(tmp_path):
    _two_rounds(tmp_path / "run")
    other = DPFedAvg(
        noise_multiplier=1.0,
        adaptive=True,
        delta=1e-3,
        sample_rate=0.5,
        seed=7,
        min_available_nodes=NODES,
    )
    with pytest.raises(CheckpointError, match="noise_multiplier=0.8 in the checkpoint, 1.0 here"):
        other.start(CrashingGrid(_app(), NODES), _start(), 4, checkpoint_dir=tmp_path / "run")


NAN = float("nan")
MALFORMED = {  # state.json changed, signed with the key: the loader still names the field
    "round a string": (_set(["server_round"], "2"), "'server_round' is not an integer"),
    "no result": (lambda s: s.pop("result"), "no field 'result'"),
    "metrics of text": (
        _set(["result", "train_metrics_clientapp"], {"1": {"epsilon": "high"}}),
        r"train_metrics_clientapp\[1\] is not a MetricRecord",
    ),
    "array spec without dtype": (lambda s: s["arrays"][0].pop("dtype"), "no field 'dtype'"),
    "array of another shape": (
        _set(["arrays", 0, "shape"], [2**28]),
        r"header declares float32\[20\], the spec float32\[268435456\]",
    ),
    "NaN noise in the history": (
        _set(["strategy_state", "rounds", "history"], [[NAN, 0.5, 2]]),
        "history entry 0: noise multiplier nan",
    ),
    "a history of text": (
        _set(["strategy_state", "rounds", "history"], "none"),
        "history is not a list",
    ),
    "a sampling generator of another kind": (
        _set(["strategy_state", "rounds", "rng"], {"bit_generator": "MT19937"}),
        "rng: not a state of this sampling generator",
    ),
    "rounds state a number": (_set(["strategy_state", "rounds"], 5), "not an object"),
    "negative clip norm": (_set(["strategy_state", "clip_norm"], -1.0), "clip_norm -1.0"),
    "no strategy state": (_set(["strategy_state"], {}), "the DP rounds' state is not an object"),
    "a run id of another form": (_set(["run_id"], "../x"), "run id or round is malformed"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_checkpoint_raises_checkpoint_error_naming_the_field(
    tmp_path, checkpoint_key, case
):
    """Even signed with the key (a bug, or whoever holds the key), no TypeError/KeyError."""
    change, reason = MALFORMED[case]
    path = _two_rounds(tmp_path / "run")
    rewrite_checkpoint(path, change, key=checkpoint_key.read_bytes())
    with pytest.raises(CheckpointError, match=reason) as refused:
        _dp().start(
            CrashingGrid(_app(), NODES),
            _start(),
            4,
            checkpoint_dir=tmp_path / "run",
            change_num_rounds=True,
        )
    assert str(path) in str(refused.value)


def test_a_small_checkpoint_never_expands_to_a_large_array(tmp_path, checkpoint_key):
    """A 1 MB checkpoint expanded to a 1 GiB array: a compressed member, or an ``.npy``
    header declaring more than its data holds (numpy allocates what the header says)."""
    path = _two_rounds(tmp_path / "run")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    rewrite_checkpoint(path, members={names[0]: bytes(1 << 20)}, compress=True)
    with pytest.raises(CheckpointError, match="is compressed"):
        load_checkpoint(tmp_path / "run")
    _two_rounds(tmp_path / "other")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (2**28,)}
    )
    bomb = header.getvalue() + bytes(1 << 20)

    def declare(state):
        state["arrays"][0].update(shape=[2**28], sha256=hashlib.sha256(bomb).hexdigest())

    rewrite_checkpoint(
        tmp_path / "other" / CHECKPOINT_FILE,
        declare,
        key=checkpoint_key.read_bytes(),
        members={"array-00000": bomb},
    )
    tracemalloc.start()
    with pytest.raises(CheckpointError, match="array-00000: .* takes 1073741824 bytes"):
        load_checkpoint(tmp_path / "other")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20


def test_an_older_or_another_runs_checkpoint_put_back_is_refused(tmp_path):
    """A rollback would run rounds again that the accountant no longer holds."""
    old = _two_rounds(tmp_path / "run").read_bytes()
    _dp().start(
        CrashingGrid(_app(), NODES),
        _start(),
        4,
        checkpoint_dir=tmp_path / "run",
        change_num_rounds=True,
    )
    (tmp_path / "run" / CHECKPOINT_FILE).write_bytes(old)
    with pytest.raises(CheckpointError, match="round 2, but this folder's last .* round 4"):
        load_checkpoint(tmp_path / "run")
    other = _two_rounds(tmp_path / "other").read_bytes()
    (tmp_path / "run" / CHECKPOINT_FILE).write_bytes(other)
    with pytest.raises(CheckpointError, match="belongs to run"):
        load_checkpoint(tmp_path / "run")


def test_an_older_checkpoint_in_a_folder_the_ledger_never_saw_is_refused(tmp_path):
    """Second review: an authentic old checkpoint copied to (or linked as) another folder
    passed the ledger, which was keyed by the folder's path; it is now also keyed by run."""
    old = _two_rounds(tmp_path / "run").read_bytes()
    _dp().start(
        CrashingGrid(_app(), NODES),
        _start(),
        4,
        checkpoint_dir=tmp_path / "run",
        change_num_rounds=True,
    )
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / CHECKPOINT_FILE).write_bytes(old)
    with pytest.raises(CheckpointError, match="round 2, but this run's last .* round 4"):
        load_checkpoint(tmp_path / "moved")


def test_the_checkpoint_key_must_be_private_outside_the_folder_and_present(
    tmp_path, checkpoint_key, monkeypatch
):
    path = _two_rounds(tmp_path / "run")
    assert stat.S_IMODE(checkpoint_key.stat().st_mode) == 0o600
    checkpoint_key.chmod(0o644)
    with pytest.raises(CheckpointError, match="mode 644: others may read or change it"):
        load_checkpoint(tmp_path / "run")
    checkpoint_key.chmod(0o600)
    link = tmp_path / "link.key"
    link.symlink_to(checkpoint_key)
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_checkpoint(tmp_path / "run", key_file=link)
    with pytest.raises(CheckpointError, match="lies in the checkpoint folder"):
        load_checkpoint(tmp_path / "run", key_file=tmp_path / "run" / "checkpoint.key")
    with pytest.raises(CheckpointError, match="no checkpoint key at"):
        load_checkpoint(tmp_path / "run", key_file=tmp_path / "elsewhere.key")
    other_key = tmp_path / "other.key"
    other_key.write_bytes(bytes(32))
    other_key.chmod(0o600)
    with pytest.raises(CheckpointError, match="written with another checkpoint key"):
        load_checkpoint(tmp_path / "run", key_file=other_key)
    # A checkpoint file that is a link (to a real checkpoint) is not read through.
    path.rename(tmp_path / "real.zip")
    path.symlink_to(tmp_path / "real.zip")
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_checkpoint(tmp_path / "run")
    monkeypatch.delenv(KEY_ENV)


def test_an_he_dp_checkpoint_of_other_colluders_is_refused(keys):
    """Under HE + DP, c and the planned dropout set the noise present, so ε."""
    made = _he_dp(keys).state()
    other = HEDPFedAvg(
        keys[1],
        noise_multiplier=0.8,
        clip_norm=1.0,
        delta=1e-3,
        sample_rate=0.5,
        seed=3,
        min_available_nodes=NODES,
        workers=1,
        tolerated_colluders=2,
    )
    with pytest.raises(ValueError, match="tolerated_colluders=1 in the checkpoint, 2 here"):
        other.load_state(made)


@pytest.mark.parametrize("content", [b"not a zip", b"PK\x05\x06" + bytes(18)])
def test_a_damaged_checkpoint_is_refused_with_the_reason(tmp_path, content):
    _two_rounds(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable checkpoint|no state.json"):
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


# Enough nodes that every round samples someone: a round with nobody sampled releases
# nothing (issue 21) yet is accounted, which this test's count of releases does not model
# (with 6 nodes, P = 1/64 a round made it fail about one run in four).
CRASH_NODES = 20


def _private_dp():
    """DP-FedAvg with secure noise (no seed): a round done again gets fresh noise."""
    return DPFedAvg(
        noise_multiplier=0.8,
        delta=1e-3,
        sample_rate=0.5,
        min_available_nodes=CRASH_NODES,
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
            ReleasingGrid(_app(), CRASH_NODES, releases),
            _start(),
            ROUNDS,
            evaluate_fn=releases.evaluate_fn,
            checkpoint_dir=folder,
        )
    resumed_strategy = releases.observe(_private_dp())
    resumed = resumed_strategy.start(
        ReleasingGrid(_app(), CRASH_NODES, releases),
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


def test_training_messages_name_the_run_by_an_id_that_survives_a_resume(tmp_path):
    """Flower numbers a resumed run as a new run; clients key their DP-SGD history by this."""
    app, seen = _app(), []

    def client(msg, context):
        if msg.metadata.message_type == "train":
            config = msg.content["config"]
            seen.append((config["lepton-run-id"], config["lepton-resumed-after"]))
        return app(msg, context)

    with pytest.raises(ServerCrashError):
        _dp().start(CrashingGrid(client, NODES, crash_at=2), _start(), 3, checkpoint_dir=tmp_path)
    _dp().start(CrashingGrid(client, NODES), _start(), 3, checkpoint_dir=tmp_path)
    (run,) = {run for run, _ in seen}
    assert re.fullmatch("[0-9a-f]{32}", run)
    assert [after for _, after in seen][:1] == [0] and {after for _, after in seen} == {0, 1}
    seen.clear()
    _dp().start(CrashingGrid(client, NODES), _start(), 1)  # another run: another id
    assert seen[0][0] != run
