"""DP-SGD's neighbouring relation, the node's history across runs, and its noise source.

Issue 19, item 1: DP-SGD's ε was stated for adding or removing an example, yet every reply
carries ``num-examples`` in the clear. The relation is zero-out (one example replaced by
a null one, the count public): every value a client releases besides its noisy weights
must then be the same on neighbouring datasets. Item 6: the node's ε was kept per run (a
new run started its reported ε at zero), and its noise came from seeded torch generators.
"""

import fcntl
import json
import logging
import os
import random

import numpy as np
import pytest
import torch
from conftest import client_message
from flwr.app import ArrayRecord, Context, RecordDict

from lepton_flwr import protocol
from lepton_flwr.apps import client as client_module
from lepton_flwr.apps.client import make_client_app
from lepton_flwr.apps.common import model_for
from lepton_flwr.apps.server import guarantee
from lepton_flwr.config import load_config
from lepton_flwr.data import load_client_data
from lepton_flwr.data.partition import ClientData
from lepton_flwr.dp.dpsgd import DPSGD_NEIGHBOURING, MODES, epsilon_after_round, train_dpsgd
from lepton_flwr.models import build_model
from lepton_flwr.mods.he_mod import _reply_weight

DPSGD = "+experiment=digits_smoke privacy=dpsgd privacy.delta=1e-3 num_rounds=3 train.batch_size=64"
RUN_A, RUN_B = "a" * 32, "b" * 32


def _context(node_config=None, run_id=1):
    config = {"partition-id": 0, "num-partitions": 3, **(node_config or {})}
    return Context(run_id=run_id, node_id=1, node_config=config, state=RecordDict(), run_config={})


def _message(arrays, server_round, **config):
    return client_message(arrays, {"server-round": server_round, **config}, server_round)


def _reply_values(reply) -> dict:
    """Every value of a training reply but its weights, and the HE header's weight."""
    assert not reply.has_error(), reply.error.reason
    metrics = reply.content["metrics"]
    arrays = reply.content["arrays"]
    return {
        "metrics": dict(metrics),
        "he-weight": _reply_weight(reply, metrics, 1000.0, protocol.NUM_EXAMPLES),
        "array names and shapes": [(name, tuple(a.shape)) for name, a in arrays.items()],
    }


def test_every_release_but_the_weights_is_the_same_on_zero_out_neighbours():
    """D and D' differ in one example's content (the null example of the relation: any
    content, the count unchanged): ``num-examples``, the HE header's weight,
    ``client-epsilon`` and ``dpsgd-noise-multiplier`` are identical over three rounds.
    Removing the example instead changes ``num-examples``: add/remove neighbours are
    told apart in the clear, so they are not the relation stated."""
    cfg = load_config(DPSGD)
    own = load_client_data(cfg, 0, 3)

    def neighbour(cfg_, partition, partitions):
        x, y = own.x_train.copy(), own.y_train.copy()
        x[5], y[5] = 0.0, (y[5] + 1) % 10  # one example nulled: blank image, another label
        return ClientData(x, y, own.x_test, own.y_test)

    def removed(cfg_, partition, partitions):
        keep = np.arange(len(own.y_train)) != 5
        return ClientData(own.x_train[keep], own.y_train[keep], own.x_test, own.y_test)

    arrays = ArrayRecord(model_for(cfg).state_dict())
    apps = {
        "D": make_client_app(cfg),
        "D'": make_client_app(cfg, client_data=neighbour),
        "D minus one": make_client_app(cfg, client_data=removed),
    }
    contexts = {name: _context() for name in apps}
    released = {name: [] for name in apps}
    for server_round in (1, 2, 3):
        for name, app in apps.items():
            reply = app(_message(arrays, server_round), contexts[name])
            released[name].append(_reply_values(reply))
    assert released["D"] == released["D'"]
    assert released["D"][0]["metrics"][protocol.NUM_EXAMPLES] == len(own.y_train)
    assert released["D minus one"][0]["metrics"][protocol.NUM_EXAMPLES] == len(own.y_train) - 1
    assert guarantee(cfg)["epsilon_neighbouring"] == DPSGD_NEIGHBOURING
    assert DPSGD_NEIGHBOURING.startswith("zero-out one example")


@pytest.mark.parametrize("mode", MODES)
def test_a_null_example_moves_nothing_and_a_real_one_at_most_lr_c_over_n(mode):
    """One full-batch step (q = 1) with the same noise (reproducible seed): the weights
    trained on D and on D with example k made null (x = 0, y = the initial bias: its
    gradient is zero) differ by exactly lr / (q N) times k's clipped gradient, the
    sensitivity the accountant assumes (C per example, the clipped sum divided by the
    expected batch size q N)."""
    n, lr, clip = 8, 0.5, 0.3
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = rng.normal(size=n).astype(np.float32)
    torch.manual_seed(0)
    initial = build_model({"name": "linreg"}, (3,), 1)
    bias = float(initial.linear.bias)
    null = x.copy(), y.copy()
    null[0][0], null[1][0] = 0.0, bias

    def trained(xs, ys):
        model = build_model({"name": "linreg"}, (3,), 1)
        model.load_state_dict(initial.state_dict())
        train_dpsgd(
            model, xs, ys, num_outputs=1, epochs=1, batch_size=n, lr=lr, momentum=0.0,
            weight_decay=0.0, noise_multiplier=1.0, max_grad_norm=clip, delta=1e-3,
            mode=mode, seed=11, reproducible=True,
        )  # fmt: skip
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    with torch.no_grad():
        residual = float(initial(torch.from_numpy(x[:1]))[0]) - float(y[0])
    gradient = torch.from_numpy(np.append(2 * residual * x[0], 2 * residual))
    clipped = gradient * min(1.0, clip / (float(gradient.norm()) + 1e-6))
    difference = trained(*null) - trained(x, y)
    assert torch.allclose(difference.double(), lr / n * clipped, atol=1e-6)
    assert 0 < float(difference.norm()) <= lr * clip / n * (1 + 1e-6)


def test_a_new_run_continues_the_nodes_epsilon_on_its_data(tmp_path):
    """With a state-dir, a second run (another run id, another Flower run) reports the ε
    of the node's data over both runs: the same as one run of two rounds. Before: it
    reported its own round only (the first run's ε again)."""
    cfg = load_config(DPSGD)
    app = make_client_app(cfg)
    arrays = ArrayRecord(model_for(cfg).state_dict())
    node = {protocol.STATE_DIR: str(tmp_path / "state")}
    one_run = _context({protocol.STATE_DIR: str(tmp_path / "one")})
    both_rounds = [app(_message(arrays, r, **{protocol.RUN_ID: RUN_A}), one_run) for r in (1, 2)]
    first = app(_message(arrays, 1, **{protocol.RUN_ID: RUN_A}), _context(node, run_id=1))
    second = app(_message(arrays, 1, **{protocol.RUN_ID: RUN_B}), _context(node, run_id=2))
    reported = [r.content["metrics"][protocol.CLIENT_EPSILON] for r in (first, second)]
    expected = [r.content["metrics"][protocol.CLIENT_EPSILON] for r in both_rounds]
    assert reported == pytest.approx(expected, rel=1e-9)


def test_two_flower_runs_sent_the_same_run_id_continue_one_history(tmp_path):
    """A server that runs two Flower runs at once under one run id: each has its own
    ``context.state``; the state file, not that cache, holds the run's history, so the
    rounds of both count (before: the first run's cache overwrote the second's round)."""
    cfg = load_config(DPSGD)
    app = make_client_app(cfg)
    arrays = ArrayRecord(model_for(cfg).state_dict())
    node = {protocol.STATE_DIR: str(tmp_path / "state")}
    first, second = _context(node, run_id=1), _context(node, run_id=2)
    for server_round, context in ((1, first), (1, second), (2, first)):
        reply = app(_message(arrays, server_round, **{protocol.RUN_ID: RUN_A}), context)
        assert not reply.has_error(), reply.error.reason
    saved = json.loads((tmp_path / "state" / f"dpsgd-{RUN_A}-partition-0.json").read_text())
    z, rate, steps = saved["history"][0]
    assert len(saved["history"]) == 1 and steps == 3 * round(1 / rate)
    assert reply.content["metrics"][protocol.CLIENT_EPSILON] == pytest.approx(
        epsilon_after_round([], z, 383, 64, 3, 1e-3), rel=1e-9
    )


def test_the_node_holds_its_lock_while_it_reads_trains_and_saves(tmp_path, monkeypatch):
    """Two runs at once on one node cannot both pass its budget on the same past: the
    lock on the data's histories is held during training (checked without waiting)."""
    cfg = load_config(DPSGD)
    lock = tmp_path / "state" / "dpsgd-partition-0.lock"
    held = []
    real_train = client_module.train_dpsgd

    def train_and_probe(*args, **kwargs):
        with open(lock, "w") as other:  # another process's attempt, as a new open file
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(True)
            else:
                held.append(False)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(client_module, "train_dpsgd", train_and_probe)
    reply = make_client_app(cfg)(
        _message(ArrayRecord(model_for(cfg).state_dict()), 1),
        _context({protocol.STATE_DIR: str(tmp_path / "state")}),
    )
    assert not reply.has_error(), reply.error.reason
    assert held == [True]
    with open(lock, "w") as after:  # released once the round's history is saved
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.parametrize(
    ("saved", "field"),
    [
        ({"run": RUN_A, "partition": 1, "history": []}, "field 'partition' is 1"),
        ({"run": RUN_B, "partition": 0, "history": []}, f"field 'run' is {RUN_B}"),
        ({"run": RUN_A, "partition": 0, "history": [[1.0, 2.0, 3]]}, "field 'history'"),
        ([1, 2], "not a JSON object"),
    ],
)
def test_a_malformed_state_file_is_refused_naming_the_file_and_field(
    tmp_path, caplog, saved, field
):
    cfg = load_config(DPSGD)
    path = tmp_path / f"dpsgd-{RUN_A}-partition-0.json"
    path.write_text(json.dumps(saved))
    caplog.set_level(logging.ERROR, logger="flwr")
    reply = make_client_app(cfg)(
        _message(ArrayRecord(model_for(cfg).state_dict()), 1, **{protocol.RUN_ID: RUN_B}),
        _context({protocol.STATE_DIR: str(tmp_path)}),
    )
    assert reply.has_error() and "cannot be read" in reply.error.reason
    assert str(tmp_path) not in reply.error.reason  # the node's paths stay on the node
    assert str(path) in caplog.text and field in caplog.text


def test_dpsgd_noise_and_batches_come_from_os_urandom_only(monkeypatch):
    """With ``os.urandom`` replaced by one fixed byte stream, two trainings whose torch
    generators were seeded differently give the same weights, and torch's Gaussian and
    uniform draws are never called: no draw came from a torch generator (before: Opacus
    drew both from MT19937 generators seeded with 63 bits)."""

    def no_torch_draw(*args, **kwargs):
        raise AssertionError("DP-SGD drew from a torch generator")

    monkeypatch.setattr(torch, "normal", no_torch_draw)
    monkeypatch.setattr(torch, "rand", no_torch_draw)

    def weights(torch_seed):
        stream = random.Random(0)
        monkeypatch.setattr(os, "urandom", lambda k: stream.randbytes(k))
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 4)).astype(np.float32)
        y = rng.integers(0, 2, 64)
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        train_dpsgd(
            model, x, y, num_outputs=2, epochs=2, batch_size=8, lr=0.1, momentum=0.0,
            weight_decay=0.0, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3,
            seed=torch_seed,
        )  # fmt: skip
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    weights(0)  # first imports and caches (some draw from os.urandom) happen once
    assert torch.equal(weights(1), weights(2))
