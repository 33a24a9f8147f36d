"""Torch models and their local train / evaluate loops.

The catalogue (``MODELS``' names, ``model_supports``) needs no torch; the rest is imported
from :mod:`~lepton_flwr.models.nets` and :mod:`~lepton_flwr.models.training` at first
use, so that a ClientApp answering a message that trains nothing never imports torch.
"""

from importlib import import_module

from lepton_flwr.models.catalogue import MODELS, model_supports

_LAZY = {
    "build_model": "lepton_flwr.models.nets",
    "evaluate": "lepton_flwr.models.training",
    "resolve_device": "lepton_flwr.models.training",
    "train": "lepton_flwr.models.training",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MODELS", "build_model", "evaluate", "model_supports", "resolve_device", "train"]
