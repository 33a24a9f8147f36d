"""Update inversion: exact on a plain one-example update, nothing under encryption or DP-SGD.

The server's attack on the config's own ClientApp and mods (one example, one step).
"""

import pytest
from conftest import needs_fashion_mnist

from lepton_flwr.audit.inversion import attack_one_client, psnr
from lepton_flwr.config import load_config
from lepton_flwr.data import load_dataset
from lepton_flwr.he import CKKSParams, write_keys

MLP = ["dataset=digits", "model=mlp", "model.hidden=[32]"]  # first layer linear: closed form


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return write_keys(CKKSParams(), tmp_path_factory.mktemp("keys"))


def _attack(overrides, keys=None, steps=400):
    """(the server's reconstruction or why there is none, the client's example)."""
    cfg = {**load_config(overrides), "num_rounds": 1}
    if keys is not None:
        paths = {"secret_context_path": str(keys[0]), "public_context_path": str(keys[1])}
        cfg["he"] = {**cfg["he"], **paths}
    outcome, example, _ = attack_one_client(cfg, steps)
    return outcome, example


def test_a_plain_one_example_update_gives_the_image_back_exactly():
    reconstruction, image = _attack(MLP)
    assert psnr(reconstruction, image) > 60


def test_client_side_clipping_alone_does_not_hide_the_image_from_the_server():
    """Scaling ΔW and Δb together keeps their ratio: clipping is no defence on its own."""
    reconstruction, image = _attack(
        [*MLP, "strategy=dp_fedavg", "privacy.clipping_side=client", "privacy.clip_norm=0.01"]
    )
    assert psnr(reconstruction, image) > 60


def test_dpsgd_noise_leaves_nothing_recognisable():
    reconstruction, image = _attack([*MLP, "privacy=dpsgd", "privacy.noise_multiplier=1.0"])
    assert psnr(reconstruction, image) < 15


@needs_fashion_mnist
def test_gradient_matching_recovers_an_image_through_the_cnn_and_not_under_dpsgd():
    """No closed form through convolutions: the optimisation attack (Geiping et al.).

    Measured: 20 dB plain, 5.7 dB under DP-SGD (z = 1), where the dataset's mean image
    scores 7 dB: the plain reconstruction is recognisable, the private one is noise.
    """
    reconstruction, image = _attack(["model=cnn"])
    private, _ = _attack(["model=cnn", "privacy=dpsgd", "privacy.noise_multiplier=1.0"])
    data = load_dataset(load_config([])["dataset"])
    baseline = psnr(data.x_train[:1000].mean(axis=0), image)  # a guess that knows no client
    assert psnr(reconstruction, image) > baseline + 8
    assert psnr(private, image) < baseline + 2


@pytest.mark.parametrize(
    "strategy", [["strategy=he_fedavg"], ["strategy=he_dp_fedavg", "privacy.noise_multiplier=1.0"]]
)
def test_under_encryption_the_attack_has_nothing_to_run_on(keys, strategy):
    outcome, _ = _attack([*MLP, *strategy], keys)
    assert isinstance(outcome, str) and "only ciphertexts" in outcome
