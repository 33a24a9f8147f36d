"""``dp_clip_mod``: clip the training update on the client to the norm the server sends.

For ``DPFedAvg(clipping_side="client")``. Attach it to training
(``@app.train(mods=[dp_clip_mod])``) or to the whole app: it acts only on training
messages whose config carries Flower's ``clipping_norm`` key, so Flower's own
``fixedclipping_mod`` and ``adaptiveclipping_mod`` work in its place. It reports Flower's
``norm_bit`` (1 when the update was clipped), which adaptive clipping counts. An update
that holds NaN or Inf is sent as no change (θ itself) with ``norm_bit`` 1, as the server
would count it, so that nothing the server sees depends on whether training diverged.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from lepton_flwr import protocol
from lepton_flwr.dp.clipping import clip
from lepton_flwr.mods.common import (
    is_train,
    replies_with_errors,
    set_reply,
    train_and_diff,
    train_config,
)


@replies_with_errors("dp_clip_mod")
def dp_clip_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Replace the trained weights θ' by θ + clip(θ' − θ, C), C from the train config.

    Messages that are not training, or carry no clipping norm, pass through untouched. An
    update with NaN or Inf becomes a zero update, reported as clipped.
    With a noise share in the config (HE + DP), ``dp_share_mod`` clips instead.
    """
    config = train_config(msg)
    if (
        not is_train(msg)
        or protocol.CLIPPING_NORM not in config
        or protocol.NOISE_SHARE_STD in config
    ):
        return call_next(msg, context)
    clip_norm = float(config[protocol.CLIPPING_NORM])
    reply, received, update = train_and_diff(msg, context, call_next)
    if update is None:
        return reply
    if all(np.isfinite(u).all() for u in update):
        clipped, norm = clip(update, clip_norm)
        norm_bit = int(norm > clip_norm)
    else:
        clipped, norm_bit = [np.zeros_like(u) for u in update], 1
    arrays = {
        k: Array((theta.astype(np.float64) + c).astype(theta.dtype))
        for (k, theta), c in zip(received.items(), clipped, strict=True)
    }
    return set_reply(reply, arrays, **{protocol.NORM_BIT: norm_bit})
