"""``dp_clip_mod``: clip the training update on the client to the norm the server sends.

Attach it to training only (``@app.train(mods=[dp_clip_mod])``) or anywhere: it acts
only on training messages whose config carries ``dp-clip-norm``. It reports whether the
update needed no clipping (``dp-unclipped`` = 1.0), what adaptive clipping needs.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from lepton_flwr.dp.clipping import clip

CLIP_NORM_KEY = "dp-clip-norm"
UNCLIPPED_KEY = "dp-unclipped"


def dp_clip_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Replace the trained weights θ' by θ + clip(θ' − θ, C)."""
    config = msg.content.config_records.get("config", {})
    is_train = msg.metadata.message_type.startswith("train")
    # With a noise share in the config, dp_share_mod clips (and noises) instead.
    if not is_train or CLIP_NORM_KEY not in config or "dp-noise-share-std" in config:
        return call_next(msg, context)
    clip_norm = float(config[CLIP_NORM_KEY])
    received = {k: v.numpy().astype(np.float64) for k, v in msg.content["arrays"].items()}
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    trained = reply.content["arrays"]
    update = [trained[k].numpy().astype(np.float64) - received[k] for k in received]
    clipped, norm = clip(update, clip_norm)
    arrays = {
        k: Array((received[k] + c).astype(trained[k].numpy().dtype))
        for k, c in zip(received, clipped, strict=True)
    }
    metrics = reply.content["metrics"]
    metrics[UNCLIPPED_KEY] = float(norm <= clip_norm)
    reply.content = RecordDict({**reply.content, "arrays": ArrayRecord(arrays), "metrics": metrics})
    return reply
