"""Client mods: thin adapters between Flower messages and lepton_flwr's he/ and dp/."""

from lepton_flwr.mods.clip_mod import dp_clip_mod
from lepton_flwr.mods.dp_share_mod import dp_share_mod
from lepton_flwr.mods.he_mod import SECRET_CONTEXT_NODE_KEY, apply_he, he_mod, make_he_mod

__all__ = [
    "SECRET_CONTEXT_NODE_KEY",
    "apply_he",
    "dp_clip_mod",
    "dp_share_mod",
    "he_mod",
    "make_he_mod",
]
