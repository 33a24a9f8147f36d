"""Update inversion: exact on a plain one-example update, nothing under encryption or DP-SGD."""

import pytest
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg
from lepton_flwr.strategies import DPFedAvg, HEDPFedAvg, HEFedAvg

from lepton_flwr.audit.inversion import invert_reply, one_client_view, psnr
from lepton_flwr.audit.scenarios import one_example_client, small_mlp
from lepton_flwr.he import CKKSParams, write_keys
from lepton_flwr.mods import dp_clip_mod, make_he_dp_mod, make_he_mod


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("keys"))


def _attack(strategy, mods=(), dpsgd_noise=None):
    """(the server's reconstruction or why there is none, the client's image)."""
    app, image = one_example_client(mods, dpsgd_noise)
    arrays = ArrayRecord(small_mlp().state_dict())
    return invert_reply(one_client_view(strategy, app, arrays), arrays), image


def _fedavg():
    return FedAvg(min_available_nodes=1, min_train_nodes=1)


def test_a_plain_one_example_update_gives_the_image_back_exactly():
    reconstruction, image = _attack(_fedavg())
    assert psnr(reconstruction, image) > 60


def test_client_side_clipping_alone_does_not_hide_the_image_from_the_server():
    """Scaling ΔW and Δb together keeps their ratio: clipping is no defence on its own."""
    strategy = DPFedAvg(
        noise_multiplier=1.0,
        delta=1e-5,
        sample_rate=1.0,
        sampling="fixed",
        clipping_side="client",
        clip_norm=0.01,
        min_available_nodes=1,
    )
    reconstruction, image = _attack(strategy, [dp_clip_mod])
    assert psnr(reconstruction, image) > 60


def test_dpsgd_noise_leaves_nothing_recognisable():
    reconstruction, image = _attack(_fedavg(), dpsgd_noise=1.0)
    assert psnr(reconstruction, image) < 15


@pytest.mark.parametrize("variant", ["he", "he_dp"])
def test_under_encryption_the_attack_has_nothing_to_run_on(keys, variant):
    if variant == "he":
        strategy = HEFedAvg(keys[1], min_available_nodes=1, min_train_nodes=1)
        mods = [make_he_mod(keys[0])]
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
    outcome, _ = _attack(strategy, mods)
    assert isinstance(outcome, str) and "only ciphertexts" in outcome
