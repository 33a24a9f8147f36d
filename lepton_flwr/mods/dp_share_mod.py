"""``dp_share_mod``: a client's part of distributed DP, applied before encryption.

For HE + DP (``HEDPFedAvg``): the client clips its update Δ = θ' − θ to norm C (an
update with NaN or Inf counts as zero), adds its share of the Gaussian noise, N(0, σ²),
scales by the server's ``1/d``, clamps to the public bound ±B the server sends
(B = (C + 10 σ)/d: only a noise draw beyond 10 σ, probability 1.5e-23 per value, is ever
clamped) and replies with that (weight 1) instead of its weights.
The reply's metrics are replaced by public values only (weight 1, σ, B): the handler's own
metrics (loss, example count) never leave the client. It must run inside
``he_mod``, which then encrypts it, so that no place outside the client ever holds a
noise-free update: use ``he_dp_mod`` (both, in that order) rather than the two by hand.
"""

from __future__ import annotations

from contextvars import ContextVar

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from lepton_flwr import protocol
from lepton_flwr.dp.clipping import clip
from lepton_flwr.dp.floor import (
    BelowPrivacyFloorError,
    check_share_request,
    require_noise_share,
)
from lepton_flwr.dp.noise import secure_gaussian
from lepton_flwr.mods.common import (
    ModError,
    is_train,
    replies_with_errors,
    set_reply,
    train_and_diff,
    train_config,
)

# Set while dp_share_mod waits for the mods and handler inside it to return a trained
# reply: he_mod, finding it set, knows it runs inside dp_share_mod (the wrong order).
_MAKING_A_SHARE: ContextVar[bool] = ContextVar("dp_share_mod_making_a_share", default=False)


def share_mod_outside() -> bool:
    """Whether the caller runs inside ``dp_share_mod`` (which then waits for its reply).

    ``he_mod`` asks this when a request for a noise share comes back without one: the
    mods are then in the wrong order (``[dp_share_mod, he_mod]``), not missing.
    """
    return _MAKING_A_SHARE.get()


def check_share_floor(msg: Message, context: Context) -> tuple[float, float, float, float]:
    """The request's (C, σ, 1/d, B), checked against the node's privacy floor.

    Raises
    ------
    ModError
        If a value is missing or not a number, or the request is below the floor.
    """
    config = train_config(msg)
    try:
        values = tuple(
            float(config[key])
            for key in (
                protocol.CLIPPING_NORM,
                protocol.NOISE_SHARE_STD,
                protocol.UPDATE_SCALE,
                protocol.SHARE_BOUND,
            )
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ModError(f"the train config lacks a valid {err}") from err
    try:
        check_share_request(context.node_config, values[0], values[1])
    except BelowPrivacyFloorError as err:
        raise ModError(str(err)) from err
    return values


@replies_with_errors("dp_share_mod")
def dp_share_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Replace the trained weights by ``(clip(θ' − θ, C) + N(0, σ²)) / d``.

    Acts on training messages whose config carries a noise share (sent by
    ``HEDPFedAvg``); everything else passes through, except a training request on a node
    whose privacy floor is set, which is refused (default deny). The noise comes from the
    operating system's secure randomness. The reply's metrics become ``he-weight`` = 1,
    ``dp-share-std`` = σ and ``he-bound`` = B, public values that ``HEDPFedAvg`` checks: a
    reply without them is not a DP share and is refused. A request below the node's
    privacy floor (``dp-max-clip-norm``, ``dp-min-share-noise-multiplier`` in its node
    config; see :mod:`lepton_flwr.dp.floor`), or without noise, is refused before
    training. An update that holds NaN or Inf is replaced by a zero update, which gets its
    noise share like any other: an error reply would tell the server that training
    diverged, and a NaN share would make the decrypted sum unusable.
    """
    config = train_config(msg)
    if not is_train(msg):
        return call_next(msg, context)
    if protocol.NOISE_SHARE_STD not in config:
        try:
            require_noise_share(context.node_config, config)  # the node's floor: default deny
        except BelowPrivacyFloorError as err:
            raise ModError(str(err)) from err
        return call_next(msg, context)
    clip_norm, share_std, scale, bound = check_share_floor(msg, context)
    waiting = _MAKING_A_SHARE.set(True)
    try:
        reply, received, update = train_and_diff(msg, context, call_next)
    finally:
        _MAKING_A_SHARE.reset(waiting)
    if update is None:
        return reply
    if all(np.isfinite(u).all() for u in update):
        clipped, _ = clip(update, clip_norm)
    else:  # a share like any other: whether training diverged must not show
        clipped = [np.zeros_like(u) for u in update]
    shares = {
        k: Array(
            np.clip((c + secure_gaussian(c.shape, share_std)) * scale, -bound, bound).astype(
                np.float32
            )
        )
        for k, c in zip(received, clipped, strict=True)
    }
    public = {protocol.HE_WEIGHT: 1.0, protocol.DP_SHARE_STD: share_std, protocol.HE_BOUND: bound}
    return set_reply(reply, shares, keep_metrics=False, **public)
