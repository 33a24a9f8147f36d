"""Update inversion: exact on a plain one-example update, nothing under encryption or DP-SGD."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from lepton_flwr.strategies import DPFedAvg, HEDPFedAvg, HEFedAvg

from lepton_flwr.audit.inversion import invert_reply, one_client_view, psnr
from lepton_flwr.dp.dpsgd import train_dpsgd
from lepton_flwr.he import CKKSParams, write_keys
from lepton_flwr.models import build_model
from lepton_flwr.mods import dp_clip_mod, make_he_dp_mod, make_he_mod


def _example():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x[7] / 16.0).astype(np.float32).reshape(1, 8, 8), int(y[7])


def _model():
    torch.manual_seed(0)
    return build_model({"name": "mlp", "hidden": [32]}, (1, 8, 8), 10)


def _client(mods=(), dpsgd=False):
    """A client holding one example; one SGD step (or one DP-SGD step) per round."""
    image, label = _example()
    app = ClientApp(mods=list(mods))

    @app.train()
    def train(msg, context):
        model = _model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        if dpsgd:
            train_dpsgd(
                model,
                image[None],
                np.array([label]),
                num_outputs=10,
                epochs=1,
                batch_size=1,
                lr=0.1,
                momentum=0.0,
                weight_decay=0.0,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                delta=1e-5,
            )
        else:
            loss = torch.nn.functional.cross_entropy(
                model(torch.tensor(image[None])), torch.tensor([label])
            )
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
        metrics = MetricRecord({"num-examples": 1})
        state = ArrayRecord(model.state_dict())
        return Message(RecordDict({"arrays": state, "metrics": metrics}), reply_to=msg)

    return app


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("keys"))


def _attack(strategy, app):
    arrays = ArrayRecord(_model().state_dict())
    return invert_reply(one_client_view(strategy, app, arrays), arrays)


def test_a_plain_one_example_update_gives_the_image_back_exactly():
    image, _ = _example()
    reconstruction = _attack(FedAvg(min_available_nodes=1, min_train_nodes=1), _client())
    assert psnr(reconstruction, image) > 60


def test_client_side_clipping_alone_does_not_hide_the_image_from_the_server():
    """Scaling ΔW and Δb together keeps their ratio: clipping is no defence on its own."""
    image, _ = _example()
    strategy = DPFedAvg(
        noise_multiplier=1.0,
        delta=1e-5,
        sample_rate=1.0,
        sampling="fixed",
        clipping_side="client",
        clip_norm=0.01,
        min_available_nodes=1,
    )
    reconstruction = _attack(strategy, _client([dp_clip_mod]))
    assert psnr(reconstruction, image) > 60


def test_dpsgd_noise_leaves_nothing_recognisable():
    image, _ = _example()
    reconstruction = _attack(FedAvg(min_available_nodes=1, min_train_nodes=1), _client(dpsgd=True))
    assert psnr(reconstruction, image) < 15


@pytest.mark.parametrize("variant", ["he", "he_dp"])
def test_under_encryption_the_attack_has_nothing_to_run_on(keys, variant):
    if variant == "he":
        strategy, mods = (
            HEFedAvg(keys[1], min_available_nodes=1, min_train_nodes=1),
            [make_he_mod(keys[0])],
        )
    else:
        strategy = HEDPFedAvg(
            keys[1],
            noise_multiplier=1.0,
            delta=1e-3,
            sample_rate=1.0,
            sampling="fixed",
            tolerated_colluders=0,
            min_available_nodes=1,
        )
        mods = [make_he_dp_mod(keys[0])]
    outcome = _attack(strategy, _client(mods))
    assert isinstance(outcome, str) and "only ciphertexts" in outcome
