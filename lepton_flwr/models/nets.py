"""The model zoo: linear and logistic regression, an MLP, a small CNN."""

from __future__ import annotations

import math

import torch
from torch import nn


class LinearRegression(nn.Module):
    """One linear layer with a scalar output, trained with mean squared error."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int = 1, **_: object):
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.linear(x.flatten(1)).squeeze(-1)


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer producing class logits."""

    def __init__(self, input_shape: tuple[int, ...], num_outputs: int, **_: object):
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """Fully connected network with ReLU hidden layers on flattened inputs."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_outputs: int,
        hidden: tuple[int, ...] | list[int] = (128, 64),
        **_: object,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)
        self.regression = num_outputs == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = self.net(x.flatten(1))
        return out.squeeze(-1) if self.regression else out


class CNN(nn.Module):
    """Two 3x3 conv blocks (each conv, GroupNorm, activation, 2x2 max-pool), two dense layers.

    Works on any single-channel image of at least 4x4 pixels (28x28 Fashion-MNIST,
    8x8 digits). GroupNorm rather than BatchNorm, so that the model holds no running
    statistics: every tensor is a trained weight, which averaging and DP-SGD need.

    Parameters
    ----------
    channels : sequence of two ints
        Output channels of the two conv blocks (default 32, 64: 421,834 weights on
        Fashion-MNIST; 16, 32 with ``hidden=32``: 55,434).
    hidden : int
        Width of the first dense layer.
    activation : {"relu", "tanh"}
        Tanh keeps activations bounded, which suits DP training (Papernot et al., 2021).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_outputs: int,
        channels: tuple[int, int] | list[int] = (32, 64),
        hidden: int = 128,
        activation: str = "relu",
        **_: object,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"model.activation='{activation}': allowed choices are "
                f"{', '.join(sorted(ACTIVATIONS))}."
            )
        act = ACTIVATIONS[activation]
        in_channels, height, width = input_shape
        first, second = channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, first, 3, padding=1),
            nn.GroupNorm(min(8, first), first),
            act(),
            nn.MaxPool2d(2),
            nn.Conv2d(first, second, 3, padding=1),
            nn.GroupNorm(min(8, second), second),
            act(),
            nn.MaxPool2d(2),
        )
        flat = second * (height // 4) * (width // 4)
        self.classifier = nn.Sequential(
            nn.Linear(flat, hidden), act(), nn.Linear(hidden, num_outputs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.classifier(self.features(x).flatten(1))


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


MODELS: dict[str, type[nn.Module]] = {
    "linreg": LinearRegression,
    "logreg": LogisticRegression,
    "mlp": MLP,
    "cnn": CNN,
}


def model_supports(name: str, task: str, is_image: bool) -> str | None:
    """Return why model ``name`` cannot train on a dataset, or None if it can."""
    if name == "linreg" and task != "regression":
        return "linreg is for regression targets; use logreg, mlp or cnn"
    if name == "logreg" and task != "classification":
        return "logreg is for class labels; use linreg or mlp"
    if name == "cnn" and not (is_image and task == "classification"):
        return "cnn needs image classification data (fashion_mnist, digits)"
    return None


def build_model(model_cfg: dict, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Instantiate the model a config names.

    Parameters
    ----------
    model_cfg : dict
        The ``model`` config group: ``name`` plus constructor options.
    input_shape : tuple[int, ...]
        Shape of one example.
    num_outputs : int
        Number of classes, or 1 for regression.
    """
    name = model_cfg["name"]
    if name not in MODELS:
        raise KeyError(f"Unknown model '{name}'. Allowed choices: {', '.join(sorted(MODELS))}.")
    options = {k: v for k, v in model_cfg.items() if k != "name"}
    return MODELS[name](tuple(input_shape), num_outputs, **options)
