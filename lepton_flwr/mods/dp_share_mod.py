"""``dp_share_mod``: a client's part of distributed DP, applied before encryption.

For HE + DP (``HEDPFedAvg``): the client clips its update Δ = θ' − θ to norm C, adds its
share of the Gaussian noise, N(0, σ_share²), scales by the server's ``1/d`` and replies
with that scaled noisy update (weight 1) instead of its weights. Put it inside
``he_mod``, which then encrypts it: no place ever holds a noise-free update.
"""

from __future__ import annotations

import secrets

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from lepton_flwr.dp.clipping import clip
from lepton_flwr.mods.clip_mod import CLIP_NORM_KEY, UNCLIPPED_KEY, set_reply, train_and_diff

NOISE_SHARE_KEY = "dp-noise-share-std"  # config: std of this client's noise share
UPDATE_SCALE_KEY = "dp-update-scale"  # config: 1/d, the fixed denominator of the mean
HE_WEIGHT_KEY = "he-weight"  # metrics: the weight he_mod encrypts with (1: an update)


def dp_share_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Replace the trained weights by ``(clip(θ' − θ, C) + N(0, σ²)) / d``."""
    config = msg.content.config_records.get("config", {})
    if not msg.metadata.message_type.startswith("train") or NOISE_SHARE_KEY not in config:
        return call_next(msg, context)
    clip_norm, share_std = float(config[CLIP_NORM_KEY]), float(config[NOISE_SHARE_KEY])
    scale = float(config[UPDATE_SCALE_KEY])
    reply, received, update = train_and_diff(msg, context, call_next)
    if update is None:
        return reply
    if not all(np.isfinite(u).all() for u in update):
        raise ValueError("the local update has NaN or Inf values; nothing was sent")
    clipped, norm = clip(update, clip_norm)
    rng = np.random.default_rng(secrets.randbits(128))
    shares = {
        k: Array(((c + rng.normal(0.0, share_std, c.shape)) * scale).astype(np.float32))
        for k, c in zip(received, clipped, strict=True)
    }
    return set_reply(reply, shares, **{UNCLIPPED_KEY: float(norm <= clip_norm), HE_WEIGHT_KEY: 1.0})
