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


def fields(config) -> dict:
    """The protocol fields a config carries, without their prefix."""
    return {k[len(FIELD_PREFIX) :]: v for k, v in config.items() if k.startswith(FIELD_PREFIX)}


def as_config(values: dict) -> dict:
    """Protocol fields as config entries (prefixed keys)."""
    return {FIELD_PREFIX + k: v for k, v in values.items()}
