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


def train_and_diff(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> tuple[Message, dict[str, np.ndarray], list[np.ndarray] | None]:
    """Run the handler; return its reply, the received weights θ and the update θ' − θ.

    The update is None when the reply is an error.
    """
    received = {k: v.numpy().astype(np.float64) for k, v in msg.content["arrays"].items()}
    reply = call_next(msg, context)
    if reply.has_error():
        return reply, received, None
    trained = reply.content["arrays"]
    return reply, received, [trained[k].numpy().astype(np.float64) - received[k] for k in received]


def set_reply(reply: Message, arrays: dict[str, Array], **metrics: float) -> Message:
    """Give a reply new arrays and extra metrics (a new RecordDict: never edit a shared one)."""
    merged = reply.content["metrics"]
    for key, value in metrics.items():
        merged[key] = value
    reply.content = RecordDict({**reply.content, "arrays": ArrayRecord(arrays), "metrics": merged})
    return reply


def dp_clip_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Replace the trained weights θ' by θ + clip(θ' − θ, C)."""
    config = msg.content.config_records.get("config", {})
    is_train = msg.metadata.message_type.startswith("train")
    # With a noise share in the config, dp_share_mod clips (and noises) instead.
    if not is_train or CLIP_NORM_KEY not in config or "dp-noise-share-std" in config:
        return call_next(msg, context)
    clip_norm = float(config[CLIP_NORM_KEY])
    reply, received, update = train_and_diff(msg, context, call_next)
    if update is None:
        return reply
    clipped, norm = clip(update, clip_norm)
    trained = reply.content["arrays"]
    arrays = {
        k: Array((received[k] + c).astype(trained[k].numpy().dtype))
        for k, c in zip(received, clipped, strict=True)
    }
    return set_reply(reply, arrays, **{UNCLIPPED_KEY: float(norm <= clip_norm)})
