"""Torch models and their local train / evaluate loops."""

from lepton_flwr.models.nets import MODELS, build_model, model_supports
from lepton_flwr.models.training import evaluate, resolve_device, train

__all__ = ["MODELS", "build_model", "evaluate", "model_supports", "resolve_device", "train"]
