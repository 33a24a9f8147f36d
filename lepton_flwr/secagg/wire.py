"""How the protocol's dicts travel in Flower messages: config keys with a prefix.

A stage message is a training message whose one ConfigRecord holds
``lepton-secagg-stage`` and the request's fields as ``lepton-secagg.<field>``; the node's
reply holds one ConfigRecord under ``REPLY_KEY`` with the stage and the answer's fields
the same way. A training message that asks for a masked upload holds
``lepton-secagg-masked`` and the masked-input request's fields.
"""

from __future__ import annotations

FIELD_PREFIX = "lepton-secagg."
REPLY_KEY = "lepton-secagg"
STAGES = ("advertise", "share-keys", "unmask")


EMPTY_LISTS = "lepton-secagg-empty"  # the fields that are empty lists, comma-separated


def fields(config) -> dict:
    """The protocol fields a config carries, without their prefix.

    Raises
    ------
    ValueError
        If the list of empty fields is not a string, or names a field twice.
    """
    values = {k[len(FIELD_PREFIX) :]: v for k, v in config.items() if k.startswith(FIELD_PREFIX)}
    empty = config.get(EMPTY_LISTS, "")
    if not isinstance(empty, str):
        raise ValueError(f"{EMPTY_LISTS}: a comma-separated string of field names is expected")
    for name in filter(None, empty.split(",")):
        if name in values:
            raise ValueError(f"{EMPTY_LISTS}: field {name!r} is given twice")
        values[name] = []
    return values


def as_config(values: dict) -> dict:
    """Protocol fields as config entries (prefixed keys).

    An empty list travels as its name in ``EMPTY_LISTS``: Flower's own ``count_bytes``
    (``message_size_mod``, our byte counts) fails on an empty list in a ConfigRecord.
    """
    config = {FIELD_PREFIX + k: v for k, v in values.items() if not _empty_list(v)}
    empty = [k for k, v in values.items() if _empty_list(v)]
    if empty:
        config[EMPTY_LISTS] = ",".join(empty)
    return config


def _empty_list(value: object) -> bool:
    return isinstance(value, list | tuple) and not value
