"""``privacy_floor_mod``: a node's HE + DP privacy floor, whatever mods the app runs.

A node that sets ``dp-max-clip-norm`` or ``dp-min-share-noise-multiplier`` in its node
config (:mod:`lepton_flwr.dp.floor`) means: no update leaves this node without its own
noise share. ``dp_share_mod``, ``he_mod`` and ``he_dp_mod`` enforce that themselves; this
mod enforces it for an app that runs none of them, or runs them only on some handlers.
It refuses, before the handler runs, every training request without a noise share, and
refuses to send a training reply that is not a noise share (no ``dp_share_mod`` ran
inside it). It also refuses federated evaluation on a node with any privacy floor unless
the node sets ``allow-evaluation=true`` (and on any node that sets it false). A node
without such settings is not affected. Attach it first (outermost):
``ClientApp(mods=[privacy_floor_mod, he_dp_mod])``; our own ClientApp always does.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from lepton_flwr import protocol
from lepton_flwr.dp.floor import (
    SHARE_FLOOR,
    BelowPrivacyFloorError,
    floor_keys,
    require_evaluation,
    require_noise_share,
)
from lepton_flwr.mods.common import ModError, is_train, replies_with_errors, train_config


@replies_with_errors("privacy_floor_mod")
def privacy_floor_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Refuse training that does not meet the node's HE + DP floor (see the module)."""
    if not is_train(msg):
        try:
            require_evaluation(context.node_config)
        except BelowPrivacyFloorError as err:
            raise ModError(str(err)) from err
        return call_next(msg, context)
    if protocol.SECAGG_STAGE in train_config(msg):  # no model, no training: he_mod answers
        return _stage_answered_by_he_mod(call_next(msg, context))
    try:
        require_noise_share(context.node_config, train_config(msg))
        floor_set = bool(floor_keys(context.node_config, SHARE_FLOOR))
    except BelowPrivacyFloorError as err:
        raise ModError(str(err)) from err
    reply = call_next(msg, context)
    if not floor_set or reply.has_error():
        return reply
    metrics = [r for r in reply.content.values() if isinstance(r, MetricRecord)]
    if len(metrics) != 1 or protocol.DP_SHARE_STD not in metrics[0]:
        raise ModError(
            "this node's privacy floor lets only noise shares leave it, and no dp_share_mod "
            "made this reply one: attach he_dp_mod (or dp_share_mod) inside "
            "privacy_floor_mod; nothing was sent"
        )
    return reply


def _stage_answered_by_he_mod(reply: Message) -> Message:
    """A secure-aggregation stage's reply holds configs only (he_mod's answer), or an error.

    An app without he_mod would hand the stage to its training handler: whatever that
    returned (a model in the clear) does not leave the node.
    """
    if reply.has_error() or not (reply.content.array_records or reply.content.metric_records):
        return reply
    raise ModError(
        "a secure-aggregation stage reached the training handler: attach he_mod (or "
        "he_dp_mod) to the whole app, inside privacy_floor_mod; nothing was sent"
    )
