"""The model zoo: linear and logistic regression, an MLP, a small CNN, a ScatterNet."""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import nn

from lepton_flwr.models.catalogue import MODELS, scatnet_shape_error, scattering_channels


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


class ScatterNet(nn.Module):
    """Scattering transform (fixed wavelets, no weights), GroupNorm, one linear layer.

    The scattering coefficients of Bruna & Mallat are hand-crafted features: they depend on
    no data, so they cost no privacy. Only the linear layer on top learns, which suits DP
    training: Tramèr & Boneh (ICLR 2021) found this model the most accurate under DP on
    Fashion-MNIST. The transform is not a submodule, so the weights (``state_dict``) are
    the linear layer's alone; the training loops apply it once per dataset
    (:func:`lepton_flwr.models.training.learning_part`).

    Parameters
    ----------
    J : int
        Scales of the wavelets; each image side must be a multiple of ``2**J``.
    L : int
        Wavelet orientations.
    groups : int
        GroupNorm groups over the scattering channels (a divisor of their number, which is
        ``1 + J*L + L*L*J*(J-1)/2`` per image channel: 81 for J=2, L=8).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_outputs: int,
        J: int = 2,  # noqa: N803 (the scattering literature's name)
        L: int = 8,  # noqa: N803
        groups: int = 27,
        **_: object,
    ):
        super().__init__()
        reason = scatnet_shape_error(input_shape, J, L, groups)
        if reason:
            raise ValueError(reason)
        in_channels, height, width = input_shape
        self.fixed_features_options = (height, width, J, L)
        channels = in_channels * scattering_channels(J, L)
        self.fixed_features_shape = (channels, height >> J, width >> J)
        self.head = nn.Sequential(
            nn.GroupNorm(groups, channels, affine=False),
            nn.Flatten(),
            nn.Linear(channels * (height >> J) * (width >> J), num_outputs),
        )

    fixed_features_libraries = ("kymatio",)
    """Libraries the fixed features depend on besides torch (keys of the disk store)."""

    def fixed_features(self, x: torch.Tensor) -> torch.Tensor:
        """Scattering coefficients of a batch of images: (N, C, H, W) -> (N, C*K, H/2^J, W/2^J)."""
        transform = _scattering(*self.fixed_features_options, str(x.device))
        return transform(x.contiguous()).flatten(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(self.fixed_features(x))


@lru_cache(maxsize=4)
def _scattering(height: int, width: int, J: int, L: int, device: str) -> nn.Module:  # noqa: N803
    """Kymatio's 2D scattering (its filters built once per shape and device)."""
    # kymatio.torch also imports the 3D transform, which needs a scipy function that
    # scipy >= 1.15 removed; the 2D frontend alone works.
    from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

    return ScatteringTorch2D(J=J, shape=(height, width), L=L).to(device)


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


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
