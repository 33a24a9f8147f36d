"""The training loop's shortcuts change nothing: the same batches, seeds and weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lepton_flwr.models import build_model, training


def data(n, seed=0, shape=(1, 8, 8), classes=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *shape)).astype(np.float32)
    return x, rng.integers(0, classes, n).astype(np.int64)


@pytest.mark.parametrize("n, batch_size, shuffle", [(54, 16, True), (7, 16, True), (32, 16, False)])
def test_batched_fetch_gives_the_same_batches_in_the_same_order(n, batch_size, shuffle):
    x, y = data(n)
    plain = training.make_loader(x, y, batch_size, shuffle, seed=5)
    batched = training.make_loader(x, y, batch_size, shuffle, seed=5, fetch_batches=True)
    for _ in range(3):  # each epoch draws its order from the loader's generator
        pairs = list(zip(plain, batched, strict=True))
        assert pairs
        for (xa, ya), (xb, yb) in pairs:
            assert xa.dtype == xb.dtype and ya.dtype == yb.dtype
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def reference_train(model, x, y, *, epochs, batch_size, lr, momentum, weight_decay, seed):
    """The loop as it was: torch.manual_seed, a loader stacking examples one by one."""
    head, features = training.learning_part(model, x)
    torch.manual_seed(seed)
    head.train()
    loader = training.make_loader(features, y, batch_size, shuffle=True, seed=seed)
    optimizer = torch.optim.SGD(
        head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    return training.run_epochs(head, loader, optimizer, training.loss_fn(3), epochs, "cpu")


@pytest.mark.parametrize(
    "model_cfg", [{"name": "scatnet", "J": 1, "groups": 9}, {"name": "cnn"}, {"name": "logreg"}]
)
def test_training_gives_the_weights_of_the_loop_it_replaced_bit_for_bit(model_cfg):
    x, y = data(54, seed=1)
    options = dict(epochs=3, batch_size=16, lr=0.1, momentum=0.9, weight_decay=1e-4, seed=11)
    torch.manual_seed(0)
    model = build_model(model_cfg, (1, 8, 8), 3)
    twin = build_model(model_cfg, (1, 8, 8), 3)
    twin.load_state_dict(model.state_dict())
    loss = training.train(model, x, y, num_outputs=3, **options)
    expected = reference_train(twin, x, y, **options)
    assert loss == expected
    for name, tensor in twin.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert training.evaluate(model, x, y, num_outputs=3) == training.evaluate(
        twin, x, y, num_outputs=3
    )


def test_seed_torch_on_the_cpu_seeds_what_manual_seed_seeds_and_records_no_stack(monkeypatch):
    import traceback

    stacks = []
    format_stack = traceback.format_stack
    monkeypatch.setattr(traceback, "format_stack", lambda *a: stacks.append(1) or format_stack(*a))
    torch.manual_seed(123)
    expected = torch.rand(5), torch.randn(3), torch.randperm(20)
    assert stacks  # the control: manual_seed queues accelerator seeding with the caller's stack
    stacks.clear()
    training.seed_torch(123, "cpu")
    drawn = torch.rand(5), torch.randn(3), torch.randperm(20)
    assert all(torch.equal(a, b) for a, b in zip(expected, drawn, strict=True))
    assert stacks == []
