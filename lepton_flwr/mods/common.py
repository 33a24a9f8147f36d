"""What the client mods share: finding records as Flower's mods do, and error replies.

A mod that cannot do its job replies with an error message naming itself and the
reason (as Flower's mods do), instead of raising: the server logs it against the node,
and the round goes on with the other clients.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from logging import ERROR

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from lepton_flwr.he.records import is_encrypted
from lepton_flwr.mistakes import MODS_IN_WRONG_ORDER


class ModError(Exception):
    """A mod's precondition failed; the mod replies with this reason as an error."""


def replies_with_errors(mod_name: str) -> Callable[[Mod], Mod]:
    """Turn a mod's :class:`ModError` into an error reply, logged and named after the mod."""

    def decorate(mod: Mod) -> Mod:
        @wraps(mod)
        def wrapped(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
            try:
                return mod(msg, context, call_next)
            except ModError as err:
                reason = f"{mod_name}: {err}"
                log(ERROR, reason)
                return Message(
                    Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg
                )

        return wrapped

    return decorate


def is_train(msg: Message) -> bool:
    """Whether the message is a training instruction (``train`` or ``train.<action>``)."""
    return msg.metadata.message_type.split(".")[0] == "train"


def the_record(content, record_type: type) -> tuple[str, object]:
    """The one record of a type in a RecordDict, with its key, found as Flower's mods do.

    Raises
    ------
    ModError
        If there is not exactly one.
    """
    found = [(k, v) for k, v in content.items() if isinstance(v, record_type)]
    if len(found) != 1:
        raise ModError(f"expected exactly one {record_type.__name__}, found {len(found)}")
    return found[0]


def train_config(msg: Message) -> ConfigRecord:
    """The message's one ConfigRecord (empty if it carries none)."""
    configs = msg.content.config_records
    if not configs:
        return ConfigRecord()
    return the_record(msg.content, ConfigRecord)[1]


def train_and_diff(
    msg: Message, context: Context, call_next: ClientAppCallable
) -> tuple[Message, dict[str, np.ndarray], list[np.ndarray] | None]:
    """Run the handler; return its reply, the received weights θ and the update θ' − θ.

    The update (float64) is None when the reply is an error.

    Raises
    ------
    ModError
        If the model received or returned is encrypted (the mod sits outside ``he_mod``),
        or the reply's tensors differ from the model's.
    """
    _, sent = the_record(msg.content, ArrayRecord)
    if is_encrypted(sent):
        raise ModError(
            f"received an encrypted model: the {MODS_IN_WRONG_ORDER.phrase} (this mod "
            "must run inside he_mod): use ClientApp(mods=[he_dp_mod]), or "
            "ClientApp(mods=[he_mod, dp_share_mod]); nothing was trained or sent"
        )
    received = {k: v.numpy() for k, v in sent.items()}
    reply = call_next(msg, context)
    if reply.has_error():
        return reply, received, None
    _, trained = the_record(reply.content, ArrayRecord)
    if list(trained.keys()) != list(received):
        raise ModError("the reply's tensors differ from the model received")
    update = [
        trained[k].numpy().astype(np.float64) - received[k].astype(np.float64) for k in received
    ]
    return reply, received, update


def set_reply(
    reply: Message, arrays: dict[str, Array], *, keep_metrics: bool = True, **metrics: float
) -> Message:
    """Give a reply new arrays and extra metrics, under the keys the handler used.

    With ``keep_metrics=False`` the reply's metrics are only ``metrics``: nothing else the
    handler reported leaves the client. The reply's records are replaced, never edited in
    place: a handler may have returned records that it shares with the message received.
    """
    array_key, _ = the_record(reply.content, ArrayRecord)
    metric_key, old = the_record(reply.content, MetricRecord)
    new_metrics = MetricRecord({**old, **metrics} if keep_metrics else metrics)
    reply.content = RecordDict(
        {**reply.content, array_key: ArrayRecord(arrays), metric_key: new_metrics}
    )
    return reply
