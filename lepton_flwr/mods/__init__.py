"""Client mods: thin adapters between Flower messages and lepton_flwr's he/ and dp/.

Which mod for which strategy:

=================  ============================================================
``HEFedAvg``       ``ClientApp(mods=[he_mod])`` (or ``make_he_mod(path)``)
``DPFedAvg``       none (server-side clipping); ``@app.train(mods=[dp_clip_mod])``
                   with ``clipping_side="client"``
``HEDPFedAvg``     ``ClientApp(mods=[he_dp_mod])`` (or ``make_he_dp_mod(path)``)
=================  ============================================================

``privacy_floor_mod`` (attach first) holds a node to its own HE + DP privacy floor
whatever mods the rest of the app runs.
"""

from lepton_flwr.mods.clip_mod import dp_clip_mod
from lepton_flwr.mods.dp_share_mod import dp_share_mod
from lepton_flwr.mods.floor_mod import privacy_floor_mod
from lepton_flwr.mods.he_mod import (
    SECRET_CONTEXT_NODE_KEY,
    apply_he,
    find_secret_context,
    he_dp_mod,
    he_mod,
    make_he_dp_mod,
    make_he_mod,
)

__all__ = [
    "SECRET_CONTEXT_NODE_KEY",
    "apply_he",
    "dp_clip_mod",
    "dp_share_mod",
    "find_secret_context",
    "he_dp_mod",
    "he_mod",
    "make_he_dp_mod",
    "make_he_mod",
    "privacy_floor_mod",
]
