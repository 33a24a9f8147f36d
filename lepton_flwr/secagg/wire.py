"""How the protocol's dicts travel in Flower messages: config keys with a prefix.

A stage message is a training message whose one ConfigRecord holds
``lepton-secagg-stage`` (one stage, or several separated by commas: the server merges
round r's unmask with round r + 1's share-keys into one exchange) and each stage's
request fields as ``lepton-secagg.<stage>.<field>``. The node's reply holds one
ConfigRecord under ``REPLY_KEY`` with the same stages and each answer's fields the same
way, or ``lepton-secagg.<stage>.refused`` with the node's reason for that stage. A
training message that asks for a masked upload holds ``lepton-secagg-masked`` and the
masked-input request's fields under the stage name ``masked-input``.
"""

from __future__ import annotations

FIELD_PREFIX = "lepton-secagg."
REPLY_KEY = "lepton-secagg"
STAGES = ("advertise", "share-keys", "unmask")
MASKED_INPUT = "masked-input"
REFUSED = "refused"  # a stage's field in a reply: the node's reason for refusing it
EMPTY_LISTS = "lepton-secagg-empty"  # the fields that are empty lists, comma-separated


def stages_of(value: object) -> list[str]:
    """The stages a message names, in order.

    Raises
    ------
    ValueError
        If it is not a comma-separated string of known stages, each named once.
    """
    if not isinstance(value, str):
        raise ValueError(f"the stage must be a string, not {type(value).__name__}")
    stages = value.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown or len(set(stages)) != len(stages):
        raise ValueError(f"unknown or repeated stages in {value!r}; known: {STAGES}")
    return stages


def fields(config, stage: str) -> dict:
    """One stage's fields in a config, without their prefix.

    Raises
    ------
    ValueError
        If the list of empty fields is not a string, or names a field twice.
    """
    prefix = f"{FIELD_PREFIX}{stage}."
    values = {k[len(prefix) :]: v for k, v in config.items() if k.startswith(prefix)}
    empty = config.get(EMPTY_LISTS, "")
    if not isinstance(empty, str):
        raise ValueError(f"{EMPTY_LISTS}: a comma-separated string of field names is expected")
    for name in filter(None, empty.split(",")):
        if name.startswith(f"{stage}."):
            field = name[len(stage) + 1 :]
            if field in values:
                raise ValueError(f"{EMPTY_LISTS}: field {name!r} is given twice")
            values[field] = []
    return values


def as_config(by_stage: dict[str, dict]) -> dict:
    """Each stage's fields as config entries (``lepton-secagg.<stage>.<field>``).

    An empty list travels as its name in ``EMPTY_LISTS``: Flower's own ``count_bytes``
    (``message_size_mod``, our byte counts) fails on an empty list in a ConfigRecord.
    """
    config, empty = {}, []
    for stage, values in by_stage.items():
        for key, value in values.items():
            if isinstance(value, list | tuple) and not value:
                empty.append(f"{stage}.{key}")
            else:
                config[f"{FIELD_PREFIX}{stage}.{key}"] = value
    if empty:
        config[EMPTY_LISTS] = ",".join(empty)
    return config
