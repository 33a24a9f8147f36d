"""What the audit attacks, built from a run config: its dataset, model, training and mods.

- :func:`audit_pool`: examples drawn from the config's training set (the attacks' data);
- :func:`fit_as_configured`: how LiRA's target and shadow models train (the config's
  model and SGD settings, or DP-SGD with the config's noise);
- :func:`one_example_client`: the config's own ClientApp (handlers and mods) holding one
  example and taking one step, the worst case for update inversion;
- :func:`canary_examples`: record-level canaries shaped like the config's inputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.clientapp import ClientApp

from lepton_flwr.apps.client import make_client_app
from lepton_flwr.apps.common import model_for
from lepton_flwr.data import CentralData, ClientData, load_dataset
from lepton_flwr.dp.dpsgd import dpsgd_noise_multiplier, dpsgd_settings, train_dpsgd
from lepton_flwr.models import train


def audit_pool(cfg: dict, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, CentralData]:
    """``count`` distinct training examples of the config's dataset, and the dataset."""
    data = load_dataset(cfg["dataset"], cfg["seed"])
    if count > len(data.y_train):
        raise ValueError(
            f"the audit asks for {count} examples; the dataset has {len(data.y_train)}"
        )
    rows = np.random.default_rng(seed).choice(len(data.y_train), count, replace=False)
    return data.x_train[rows], data.y_train[rows], data


def fit_as_configured(cfg: dict, epochs: int):
    """A LiRA training function: the config's model trained on given examples.

    Plain SGD with the config's ``train`` settings, or, with ``privacy=dpsgd``, DP-SGD
    with its noise (``noise_multiplier``, or the one calibrated to ``target_epsilon``
    for these ``epochs``) and clipping.

    Returns
    -------
    Callable[[np.ndarray, np.ndarray, int], tuple[torch.nn.Module, float]]
        ``(x, y, seed) -> (model, claimed ε)`` (inf without DP-SGD).
    """
    spec = load_dataset(cfg["dataset"], cfg["seed"])
    t, privacy = cfg["train"], cfg["privacy"]
    options = dict(
        num_outputs=spec.num_outputs,
        epochs=epochs,
        batch_size=t["batch_size"],
        lr=t["lr"],
        momentum=t["momentum"],
        weight_decay=t["weight_decay"],
    )

    def fit(xs: np.ndarray, ys: np.ndarray, seed: int) -> tuple[torch.nn.Module, float]:
        torch.manual_seed(seed)
        model = model_for(cfg, spec)
        if privacy["name"] != "dpsgd":
            train(model, xs, ys, seed=seed, **options)
            return model, math.inf
        z = dpsgd_noise_multiplier(privacy, len(ys), t["batch_size"], epochs)
        _, epsilon, _ = train_dpsgd(
            model, xs, ys, noise_multiplier=z, seed=seed, **dpsgd_settings(privacy), **options
        )
        return model, epsilon

    return fit


def one_example_client(cfg: dict, index: int = 7) -> tuple[ClientApp, np.ndarray]:
    """The config's ClientApp (its handlers and mods) on one training example, one step.

    Returns
    -------
    tuple[ClientApp, np.ndarray]
        The app, and the example it holds (what the attacker wants back).
    """
    data = load_dataset(cfg["dataset"], cfg["seed"])
    x, y = data.x_train[index : index + 1], data.y_train[index : index + 1]
    one_step = {**cfg, "train": {**cfg["train"], "local_epochs": 1, "batch_size": 1}}
    only = ClientData(x, y, x[:0], y[:0])
    return make_client_app(one_step, client_data=lambda *_: only), x[0]


def canary_examples(
    count: int, data: CentralData, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Record-level canaries: uniform noise images in the data's value range, random labels.

    Each goes into the training data with probability 1/2.

    Returns
    -------
    tuple[np.ndarray, np.ndarray, np.ndarray]
        The canary inputs, their labels, and which ones go into the training data.
    """
    rng = np.random.default_rng(seed)
    low, high = float(data.x_train.min()), float(data.x_train.max())
    shape = data.x_train.shape[1:]
    images = (low + (high - low) * rng.random((count, *shape))).astype(np.float32)
    labels = rng.integers(0, data.num_outputs, count).astype(np.int64)
    return images, labels, rng.random(count) < 0.5
