"""The small, fixed attack settings the audit and its tests share.

One 8x8 digit on one client that takes one (DP-)SGD step; a small MLP; 400 digits for
shadow-model training. Small on purpose: the attacks run in seconds on two cores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lepton_flwr.audit.lira import TrainFn
from lepton_flwr.dp.dpsgd import train_dpsgd
from lepton_flwr.models import build_model, train

IMAGE_SHAPE = (1, 8, 8)


def digits(count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scikit-learn's digits as 1x8x8 images in [0, 1], the first ``count`` of them."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, *IMAGE_SHAPE)
    return x[:count], y[:count].astype(np.int64)


def small_mlp(hidden: int = 32, seed: int = 0) -> torch.nn.Module:
    """A one-hidden-layer MLP for 8x8 digits (its first layer is what inversion reads)."""
    torch.manual_seed(seed)
    return build_model({"name": "mlp", "hidden": [hidden]}, IMAGE_SHAPE, 10)


def one_example_client(
    mods: Sequence = (),
    dpsgd_noise: float | None = None,
    max_grad_norm: float = 1.0,
    index: int = 7,
) -> tuple[ClientApp, np.ndarray]:
    """A client holding one digit that takes one SGD step (DP-SGD with ``dpsgd_noise``).

    Returns
    -------
    tuple[ClientApp, np.ndarray]
        The app (with ``mods``), and the image it holds (what an attacker wants).
    """
    x, y = digits(index + 1)
    image, label = x[index], y[index]
    app = ClientApp(mods=list(mods))

    @app.train()
    def train_one(msg: Message, context) -> Message:
        model = small_mlp()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        if dpsgd_noise is not None:
            train_dpsgd(
                model, image[None], label[None], num_outputs=10, epochs=1, batch_size=1,
                lr=0.1, momentum=0.0, weight_decay=0.0, noise_multiplier=dpsgd_noise,
                max_grad_norm=max_grad_norm, delta=1e-5,
            )  # fmt: skip
        else:
            out = model(torch.tensor(image[None]))
            torch.nn.functional.cross_entropy(out, torch.tensor(label[None])).backward()
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter -= 0.1 * parameter.grad
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": 1}),
            }
        )
        return Message(content, reply_to=msg)

    return app, image


def shadow_training(
    dpsgd_noise: float | None = None, max_grad_norm: float = 1.0, reproducible: bool = False
) -> TrainFn:
    """How LiRA's target and shadow models train: an overfitting MLP, or DP-SGD."""

    def fit(xs: np.ndarray, ys: np.ndarray, seed: int) -> torch.nn.Module:
        model = small_mlp(hidden=256, seed=seed)
        if dpsgd_noise is None:
            train(model, xs, ys, num_outputs=10, epochs=100, batch_size=32, lr=0.1,
                  momentum=0.9, seed=seed)  # fmt: skip
        else:
            train_dpsgd(
                model, xs, ys, num_outputs=10, epochs=15, batch_size=32, lr=0.5, momentum=0.0,
                weight_decay=0.0, noise_multiplier=dpsgd_noise, max_grad_norm=max_grad_norm,
                delta=1e-5, seed=seed, reproducible=reproducible,
            )  # fmt: skip
        return model

    return fit


def canary_examples(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Record-level canaries: random images with random labels, each in with probability 1/2.

    Returns
    -------
    tuple[np.ndarray, np.ndarray, np.ndarray]
        The canary images, their labels, and which ones go into the training data.
    """
    rng = np.random.default_rng(seed)
    images = rng.random((count, *IMAGE_SHAPE)).astype(np.float32)
    labels = rng.integers(0, 10, count).astype(np.int64)
    return images, labels, rng.random(count) < 0.5
