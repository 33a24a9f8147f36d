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
from lepton_flwr.dp.dpsgd import MODES, train_dpsgd
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
