import numpy as np
import pytest
import torch

from lepton_flwr.models import MODELS, build_model, evaluate, resolve_device, train, training


@pytest.mark.parametrize(
    ("name", "shape", "outputs", "out_shape"),
    [
        ("linreg", (11,), 1, (4,)),
        ("logreg", (64,), 10, (4, 10)),
        ("mlp", (30,), 2, (4, 2)),
        ("mlp", (10,), 1, (4,)),
        ("cnn", (1, 28, 28), 10, (4, 10)),
        ("cnn", (1, 8, 8), 10, (4, 10)),
        ("scatnet", (1, 28, 28), 10, (4, 10)),
        ("scatnet", (1, 8, 8), 10, (4, 10)),
    ],
)
def test_forward_shapes(name, shape, outputs, out_shape):
    model = build_model({"name": name}, shape, outputs)
    assert model(torch.zeros(4, *shape)).shape == out_shape


def test_unknown_model_lists_choices():
    with pytest.raises(KeyError, match="cnn"):
        build_model({"name": "resnet"}, (4,), 2)


def test_cnn_has_no_buffers_so_every_tensor_is_a_weight():
    model = build_model({"name": "cnn"}, (1, 28, 28), 10)
    assert list(model.buffers()) == []
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}


def test_cnn_width_and_activation_come_from_the_config():
    small = build_model(
        {"name": "cnn", "channels": [16, 32], "hidden": 32, "activation": "tanh"}, (1, 28, 28), 10
    )
    default = build_model({"name": "cnn"}, (1, 28, 28), 10)
    assert sum(p.numel() for p in small.parameters()) == 55_434
    assert sum(p.numel() for p in default.parameters()) == 421_834
    assert any(isinstance(m, torch.nn.Tanh) for m in small.modules())
    assert not any(isinstance(m, torch.nn.ReLU) for m in small.modules())
    assert small(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def _blobs(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centers = np.array([[2, 0], [-2, 0], [0, 2]], dtype=np.float32)
    x = (centers[y] + rng.normal(0, 0.5, (n, 2))).astype(np.float32)
    return x, y.astype(np.int64)


def test_training_lowers_the_loss_and_raises_accuracy():
    x, y = _blobs()
    torch.manual_seed(0)
    model = build_model({"name": "logreg"}, (2,), 3)
    before = evaluate(model, x, y, num_outputs=3)
    train(model, x, y, num_outputs=3, epochs=3, batch_size=32, lr=0.1)
    after = evaluate(model, x, y, num_outputs=3)
    assert after["loss"] < before["loss"] / 2
    assert after["accuracy"] > 0.9


def test_training_is_reproducible_with_a_seed():
    x, y = _blobs()
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model({"name": "mlp", "hidden": [8]}, (2,), 3)
        train(model, x, y, num_outputs=3, epochs=1, batch_size=16, lr=0.1, seed=7)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_linear_regression_recovers_a_linear_target():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3)).astype(np.float32)
    y = (x @ np.array([1.5, -2.0, 0.5]) + 3.0).astype(np.float32)
    model = build_model({"name": "linreg"}, (3,), 1)
    train(model, x, y, num_outputs=1, epochs=20, batch_size=32, lr=0.05)
    metrics = evaluate(model, x, y, num_outputs=1)
    assert metrics["r2"] > 0.999 and metrics["loss"] < 1e-2


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device=cuda"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_matches_the_cpu_shape_of_results():
    x, y = _blobs()
    model = build_model({"name": "cnn"}, (1, 8, 8), 3)
    xi = np.repeat(x[:, :1, None, None], 64, axis=2).reshape(-1, 1, 8, 8)
    loss = train(model, xi, y, num_outputs=3, epochs=1, batch_size=32, lr=0.05, device="cuda")
    assert np.isfinite(loss)
    assert next(model.parameters()).device.type == "cuda"


def test_registry_holds_the_five_models():
    assert set(MODELS) == {"linreg", "logreg", "mlp", "cnn", "scatnet"}


def test_scatnet_weights_are_the_linear_layer_alone():
    model = build_model({"name": "scatnet"}, (1, 28, 28), 10)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        "head.2.weight": (10, 81 * 7 * 7),
        "head.2.bias": (10,),
    }
    assert list(model.buffers()) == []  # the wavelet filters never travel as weights


def test_scatnet_rejects_shapes_and_groups_it_cannot_use():
    with pytest.raises(ValueError, match="multiples of 2\\*\\*J=8"):
        build_model({"name": "scatnet", "J": 3}, (1, 8, 8), 10)
    with pytest.raises(ValueError, match="must divide the 81"):
        build_model({"name": "scatnet", "groups": 10}, (1, 28, 28), 10)


def test_fixed_features_are_computed_once_and_give_the_models_own_outputs(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    model = build_model({"name": "scatnet", "J": 1, "groups": 9}, (1, 8, 8), 3)
    with torch.no_grad():
        direct = model(torch.from_numpy(x))  # the transform inside the forward pass
    calls = []
    fixed = model.fixed_features
    monkeypatch.setattr(model, "fixed_features", lambda t: calls.append(len(t)) or fixed(t))
    head, features = training.learning_part(model, x)
    assert head is model.head and calls == [50]
    with torch.no_grad():
        via_features = head(torch.from_numpy(features))
    torch.testing.assert_close(direct, via_features)
    before = model.state_dict()["head.2.weight"].clone()
    train(model, x, y, num_outputs=3, epochs=2, batch_size=10, lr=0.1)
    evaluate(model, x, y, num_outputs=3)
    assert calls == [50]  # training twice over and testing reused the cached features
    assert not torch.equal(before, model.state_dict()["head.2.weight"])  # the model learnt
    other = x + 1.0
    training.learning_part(model, other)
    assert calls == [50, 50]  # other data: computed afresh
