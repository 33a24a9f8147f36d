"""EagerSGD gives torch.optim.SGD's parameters bit for bit, without importing torch._dynamo."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

from lepton_flwr.models import build_model, training
from lepton_flwr.models.sgd import EagerSGD

SETTINGS = [
    {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
    {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
    {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    {"lr": 0.3, "momentum": 0.0, "weight_decay": 1e-2},
]
MODELS = [
    ("logreg", (1, 8, 8), 10),
    ("mlp", (30,), 2),
    ("linreg", (11,), 1),
    ("cnn", (1, 8, 8), 10),
]


def _data(shape, outputs, n=96, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    if outputs == 1:
        return x, rng.normal(size=n).astype(np.float32)
    return x, rng.integers(0, outputs, n).astype(np.int64)


def _trained(optimizer_class, name, shape, outputs, settings, device="cpu"):
    """The model's parameters after 3 epochs of the training loop with ``optimizer_class``."""
    torch.manual_seed(0)
    model = build_model({"name": name}, shape, outputs).to(device).train()
    x, y = _data(shape, outputs)
    loader = training.make_loader(x, y, batch_size=16, shuffle=True, seed=3)
    optimizer = optimizer_class(model.parameters(), **settings)
    loss = training.run_epochs(
        model, loader, optimizer, training.loss_fn(outputs), epochs=3, device=device
    )
    return loss, [p.detach().cpu().clone() for p in model.parameters()]


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize(("name", "shape", "outputs"), MODELS)
def test_eager_sgd_trains_to_torch_sgd_parameters_bit_for_bit(name, shape, outputs, settings):
    loss_torch, torch_params = _trained(torch.optim.SGD, name, shape, outputs, settings)
    loss_eager, eager_params = _trained(EagerSGD, name, shape, outputs, settings)
    assert loss_eager == loss_torch
    for ours, theirs in zip(eager_params, torch_params, strict=True):
        assert torch.equal(ours, theirs)
    # The run moved the parameters: equal because the steps are, not because none ran.
    torch.manual_seed(0)
    initial = list(build_model({"name": name}, shape, outputs).parameters())
    assert any(not torch.equal(p.detach(), q) for p, q in zip(initial, eager_params, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("settings", SETTINGS[1:3])
def test_eager_sgd_matches_torch_sgd_on_cuda_foreach_kernels(settings):
    loss_torch, torch_params = _trained(torch.optim.SGD, "cnn", (1, 8, 8), 10, settings, "cuda")
    loss_eager, eager_params = _trained(EagerSGD, "cnn", (1, 8, 8), 10, settings, "cuda")
    assert loss_eager == loss_torch
    assert all(torch.equal(a, b) for a, b in zip(eager_params, torch_params, strict=True))


def test_a_parameter_without_a_gradient_keeps_its_value_and_momentum_as_in_torch():
    # Step 1 updates both tensors; step 2 only the first (the second has no gradient);
    # step 3 both again: the second's momentum must be the one from step 1, as in torch.
    def run(optimizer_class):
        torch.manual_seed(1)
        a, b = torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)
        optimizer = optimizer_class([a, b], lr=0.1, momentum=0.9, weight_decay=1e-3)
        for uses_b in (True, False, True):
            optimizer.zero_grad()
            loss = (a**2).sum() + ((b**3).sum() if uses_b else 0.0)
            loss.backward()
            assert (b.grad is None) != uses_b
            optimizer.step()
        return a.detach().clone(), b.detach().clone()

    for ours, theirs in zip(run(EagerSGD), run(torch.optim.SGD), strict=True):
        assert torch.equal(ours, theirs)


def test_zero_grad_drops_the_gradients_as_torch_does_by_default():
    weight = torch.ones(2, requires_grad=True)
    optimizer = EagerSGD([weight], lr=0.1)
    (weight * 3).sum().backward()
    assert weight.grad is not None
    optimizer.zero_grad()
    assert weight.grad is None


@pytest.mark.parametrize(
    "settings", [{"lr": -0.1}, {"lr": 0.1, "momentum": -0.5}, {"lr": 0.1, "weight_decay": -1.0}]
)
def test_negative_settings_are_refused_as_torch_refuses_them(settings):
    with pytest.raises(ValueError):
        torch.optim.SGD([torch.ones(1, requires_grad=True)], **settings)
    with pytest.raises(ValueError, match="must be >= 0"):
        EagerSGD([torch.ones(1, requires_grad=True)], **settings)


def test_an_empty_parameter_list_is_refused():
    with pytest.raises(ValueError, match="empty"):
        EagerSGD([], lr=0.1)


def test_sparse_gradients_are_refused():
    embedding = torch.nn.Embedding(4, 2, sparse=True)
    optimizer = EagerSGD(embedding.parameters(), lr=0.1)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        optimizer.step()


def test_train_gives_the_parameters_of_a_torch_sgd_loop():
    # models.train (whatever optimizer it uses) against torch.optim.SGD written out.
    settings = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    x, y = _data((1, 8, 8), 10)
    torch.manual_seed(0)
    model = build_model({"name": "logreg"}, (1, 8, 8), 10)
    loss = training.train(model, x, y, num_outputs=10, epochs=2, batch_size=16, seed=7, **settings)
    torch.manual_seed(0)
    reference = build_model({"name": "logreg"}, (1, 8, 8), 10)
    torch.manual_seed(7)
    reference.train()
    loader = training.make_loader(x, y, batch_size=16, shuffle=True, seed=7)
    optimizer = torch.optim.SGD(reference.parameters(), **settings)
    expected = training.run_epochs(
        reference, loader, optimizer, training.loss_fn(10), epochs=2, device="cpu"
    )
    assert loss == expected
    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs)


def test_eager_sgd_training_never_imports_torch_dynamo():
    code = (
        "import sys, torch\n"
        "from lepton_flwr.models.sgd import EagerSGD\n"
        "model = torch.nn.Linear(4, 2)\n"
        "optimizer = EagerSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)\n"
        "for _ in range(2):\n"
        "    optimizer.zero_grad()\n"
        "    model(torch.ones(3, 4)).sum().backward()\n"
        "    optimizer.step()\n"
        "print(json.dumps('torch._dynamo' in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", "import json\n" + code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) is False
