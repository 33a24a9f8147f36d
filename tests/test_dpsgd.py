"""Sample-level DP-SGD on clients: cumulative accounting, Opacus modes."""

import logging
import math

import numpy as np
import pytest
import torch
from conftest import client_message
from flwr.app import ArrayRecord, Context, RecordDict
from opacus.accountants import RDPAccountant

from lepton_flwr.apps.client import make_client_app
from lepton_flwr.apps.common import model_for
from lepton_flwr.config import ConfigError, load_config
from lepton_flwr.dp.dpsgd import (
    MODES,
    dpsgd_noise_multiplier,
    epsilon_after_round,
    train_dpsgd,
)
from lepton_flwr.models import build_model


def _train_message(arrays, server_round):
    return client_message(arrays, {"server-round": server_round}, server_round)


def test_client_epsilon_is_cumulative_and_matches_opacus():
    cfg = load_config(
        "+experiment=digits_smoke privacy=dpsgd privacy.delta=1e-3 num_rounds=3 train.batch_size=64"
    )
    app = make_client_app(cfg)
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )
    arrays = ArrayRecord(model_for(cfg).state_dict())
    reported, z = [], None
    for rnd in (1, 2, 3):
        reply = app(_train_message(arrays, rnd), context)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        reported.append(reply.content["metrics"]["client-epsilon"])
        assert "train-loss" not in reply.content["metrics"]  # outside ε: stays on the client
        z = reply.content["metrics"]["dpsgd-noise-multiplier"]
        arrays = reply.content["arrays"]
    n = reply.content["metrics"]["num-examples"]
    steps_per_round = math.ceil(n / 64)
    for rnd, eps in enumerate(reported, start=1):
        reference = RDPAccountant()
        reference.history = [(z, 1 / steps_per_round, rnd * steps_per_round)]
        assert eps == pytest.approx(reference.get_epsilon(1e-3), rel=1e-6)
    assert reported[0] < reported[1] < reported[2] <= 3.0  # calibrated for 3 rounds, target 3
    assert reported[2] > 2.9


def _dpsgd_on_random_images(model_name: str, **options):
    """DP-SGD on 128 random 8x8 images, batch 32; returns the model, its weights before, and
    what ``train_dpsgd`` returned."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 128)
    model = build_model({"name": model_name}, (1, 8, 8), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = dict(num_outputs=10, epochs=1, batch_size=32, lr=0.1, momentum=0.0)
    settings.update(weight_decay=0.0, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3)
    return model, before, *train_dpsgd(model, x, y, **{**settings, **options})


@pytest.mark.parametrize("mode", MODES)
def test_every_opacus_mode_trains_the_cnn(mode):
    model, _, loss, eps, history = _dpsgd_on_random_images("cnn", mode=mode)
    assert np.isfinite(loss) and eps > 0 and history == [[1.0, 0.25, 4]]
    assert all(not n.startswith("_module") for n in model.state_dict())  # plain weights remain


def test_dpsgd_trains_the_scatnet_linear_layer_and_accounts_its_steps():
    model, before, loss, eps, history = _dpsgd_on_random_images(
        "scatnet", epochs=2, lr=0.5, max_grad_norm=0.1
    )
    assert np.isfinite(loss) and history == [[1.0, 0.25, 8]]
    reference = RDPAccountant()
    reference.history = [(1.0, 0.25, 8)]
    assert eps == pytest.approx(reference.get_epsilon(1e-3))
    after = model.state_dict()
    assert set(after) == set(before) == {"head.2.weight", "head.2.bias"}
    assert not torch.equal(after["head.2.weight"], before["head.2.weight"])


def test_dpsgd_config_errors():
    with pytest.raises(ConfigError, match="privacy.mode"):
        load_config("privacy=dpsgd privacy.mode=fast")
    with pytest.raises(ConfigError, match="max_grad_norm"):
        load_config("privacy=dpsgd privacy.max_grad_norm=0")
    with pytest.raises(ConfigError, match="target_epsilon"):
        load_config("privacy=dpsgd privacy.noise_multiplier=null privacy.target_epsilon=null")


def test_dpsgd_preset_trains_the_scatnet_to_good_accuracy_within_the_budget(tmp_path):
    """The README's sample-level preset, shortened to 3 rounds: 10 clients in-process."""
    import json

    from lepton_flwr.apps.inprocess import InProcessGrid
    from lepton_flwr.apps.server import run_server

    cfg = load_config(f"+experiment=fmnist_dpsgd num_rounds=3 output_dir={tmp_path}")
    folder = run_server(InProcessGrid(make_client_app(cfg), 10, keep_replies=False), cfg)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    epsilons = [r["client_epsilon"] for r in rows]
    assert epsilons == sorted(epsilons) and 2.9 < epsilons[-1] <= 3.0
    assert rows[-1]["central_accuracy"] > 0.8, rows[-1]  # chance is 0.1
    weights = torch.load(folder / "model.pt")
    assert set(weights) == {"head.2.weight", "head.2.bias"}  # only the linear layer travels


def _weights_after_dpsgd(**options):
    import torch

    torch.manual_seed(0)  # the same initial model every time
    model, _, *_ = _dpsgd_on_random_images("cnn", seed=7, **options)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_dpsgd_noise_and_sampling_do_not_follow_the_public_seed(caplog):
    """Same data, same config seed: the weights differ, as DP-SGD's noise must be secret.

    With the seed driving Opacus' noise, a server knowing the config could recompute the
    outputs for neighbouring datasets and tell which one happened.
    """
    import torch

    first, second = _weights_after_dpsgd(), _weights_after_dpsgd()
    assert not torch.equal(first, second)
    # The explicit opt-in is reproducible, and says it is not private.
    caplog.set_level(logging.WARNING, logger="flwr")
    again = [_weights_after_dpsgd(reproducible=True) for _ in range(2)]
    assert torch.equal(again[0], again[1])
    assert "NOT differentially private" in caplog.text


def _dpsgd_batch_one(n: int, **options):
    """DP-SGD of a linear model on ``n`` random examples with Poisson batches of expected
    size 1 (about one in e empty); returns the model, its weights before, and what
    ``train_dpsgd`` returned."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = rng.integers(0, 2, n)
    model = torch.nn.Linear(4, 2)
    before = [p.detach().clone() for p in model.parameters()]
    settings = dict(num_outputs=2, epochs=1, batch_size=1, lr=0.1, momentum=0.0)
    settings.update(weight_decay=0.0, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3)
    return model, before, *train_dpsgd(model, x, y, **{**settings, **options})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [49, 93])
def test_dpsgd_accounts_every_poisson_step_as_predicted(n, mode):
    """Batch 1: every one of the ceil(N / B) steps per epoch is taken and recorded, empty
    batches included, and the ε reported is the one the node's floor check predicted.

    93: Opacus' sampler alone takes int(1 / (1 / 93)) = 92 steps. 49: Opacus' mean alone
    divides by int(49 * (1 / 49)) = 0 examples, and the weights become infinite.
    """
    history = []
    for steps in (n, 2 * n):  # two rounds: the second continues the first's history
        predicted = epsilon_after_round(history, 1.0, n, 1, 1, 1e-3)
        model, _, _, eps, history = _dpsgd_batch_one(n, mode=mode, history=history)
        assert history == [[1.0, 1 / n, steps]]
        assert eps == pytest.approx(predicted, rel=0, abs=1e-9)
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_dpsgd_step_on_an_empty_batch_adds_noise(mode):
    """Seed 30 draws three empty Poisson batches of three examples: the weights still move
    (the noise of three steps), and the three steps are accounted."""
    model, before, loss, _, history = _dpsgd_batch_one(3, mode=mode, seed=30, reproducible=True)
    assert loss == 0.0  # the mean loss over no examples: every batch was empty
    assert history == [[1.0, 1 / 3, 3]]
    for old, new in zip(before, model.parameters(), strict=True):
        assert not torch.equal(old, new.detach())


def test_dpsgd_noise_is_calibrated_on_the_steps_it_is_accounted_on():
    """N = 10, batch 6: Opacus samples at rate 1/2 (two batches), not 6/10; the noise for a
    target ε of 2 over 3 epochs spends 2 (within get_noise_multiplier's 0.01) on that."""
    privacy = {"noise_multiplier": None, "target_epsilon": 2.0, "delta": 1e-3}
    z = dpsgd_noise_multiplier({**privacy, "accountant": "rdp"}, 10, 6, 3)
    assert 1.99 <= epsilon_after_round([], z, 10, 6, 3, 1e-3) <= 2.0


def test_dpsgd_without_training_examples_says_so():
    with pytest.raises(ValueError, match="at least one training example, this node has 0"):
        epsilon_after_round([], 1.0, 0, 8, 1, 1e-5)
