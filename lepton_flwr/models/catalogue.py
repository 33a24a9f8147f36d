"""The model zoo's catalogue: its names and which data each model fits, without torch.

Checking a config (:func:`lepton_flwr.config.validate_config`) needs the models' names
and rules, not the models: a ClientApp answering a message that trains nothing (a
secure-aggregation stage) checks its config without importing torch. The classes live in
:mod:`lepton_flwr.models.nets`, which :data:`MODELS` imports at the first lookup.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# Config name -> class name in lepton_flwr.models.nets.
_CLASS_NAMES = {
    "linreg": "LinearRegression",
    "logreg": "LogisticRegression",
    "mlp": "MLP",
    "cnn": "CNN",
    "scatnet": "ScatterNet",
}


class ModelZoo(Mapping):
    """The models by config name (``MODELS["cnn"]`` is the class).

    Its names (iterating, ``in``, ``len``) need no import; looking a class up imports
    :mod:`lepton_flwr.models.nets`, and so torch.
    """

    def __getitem__(self, name: str) -> type[nn.Module]:
        class_name = _CLASS_NAMES[name]  # KeyError for an unknown name, as a dict
        return getattr(import_module("lepton_flwr.models.nets"), class_name)

    def __contains__(self, name: object) -> bool:
        return name in _CLASS_NAMES

    def __iter__(self) -> Iterator[str]:
        return iter(_CLASS_NAMES)

    def __len__(self) -> int:
        return len(_CLASS_NAMES)

    def __repr__(self) -> str:
        return f"ModelZoo({list(_CLASS_NAMES)})"


MODELS = ModelZoo()
ACTIVATION_NAMES = ("relu", "tanh")  # the cnn's model.activation choices (nets.ACTIVATIONS)


def model_supports(name: str, task: str, is_image: bool) -> str | None:
    """Return why model ``name`` cannot train on a dataset, or None if it can."""
    if name == "linreg" and task != "regression":
        return "linreg is for regression targets; use logreg, mlp or cnn"
    if name == "logreg" and task != "classification":
        return "logreg is for class labels; use linreg or mlp"
    if name in ("cnn", "scatnet") and not (is_image and task == "classification"):
        return f"{name} needs image classification data (fashion_mnist, digits)"
    return None


def scattering_channels(J: int, L: int) -> int:  # noqa: N803
    """Scattering coefficients per image channel: order 0, 1 and 2."""
    return 1 + J * L + L * L * J * (J - 1) // 2


def scatnet_shape_error(input_shape: tuple[int, ...], J: int, L: int, groups: int) -> str | None:  # noqa: N803
    """Why a ScatterNet cannot be built for these images and options, or None."""
    if len(input_shape) != 3:
        return f"scatnet needs images (channels, height, width), got shape {input_shape}"
    if J < 1 or L < 1:
        return f"model.J and model.L must be >= 1, got J={J}, L={L}"
    _, height, width = input_shape
    if height % 2**J or width % 2**J or min(height, width) < 2 ** (J + 1):
        return (
            f"model.J={J}: image sides must be multiples of 2**J={2**J} and at least "
            f"{2 ** (J + 1)}, got {height}x{width}"
        )
    channels = input_shape[0] * scattering_channels(J, L)
    if groups < 1 or channels % groups:
        return f"model.groups={groups} must divide the {channels} scattering channels"
    return None
