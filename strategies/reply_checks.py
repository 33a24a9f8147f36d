"""Checks of one plaintext or encrypted reply, shared by the strategies.

Each raises :class:`ReplyError` saying what is wrong, so that the strategy rejects that
reply alone (one log line naming the node) and the round goes on with the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord, MetricRecord


class ReplyError(ValueError):
    """A reply that a strategy rejects; the message says why."""


def example_count(metrics: MetricRecord, key: str, max_examples: int, minimum: int = 1) -> int:
    """The reply's example count (``key``): a whole number in [minimum, max_examples].

    Raises
    ------
    ReplyError
        If it is missing, not a whole number (a list, 2.5, NaN) or out of range.
    """
    count = metrics.get(key)
    if count is None:
        raise ReplyError(f"no '{key}' in the reply's metrics")
    if isinstance(count, bool) or not (
        isinstance(count, int | float) and np.isfinite(count) and float(count).is_integer()
    ):
        raise ReplyError(f"'{key}' must be a whole number, got {str(count)[:40]}")
    if not minimum <= count <= max_examples:
        raise ReplyError(f"'{key}' = {count:.0f} is not in [{minimum}, {max_examples}]")
    return int(count)


def plaintext_tensors(record: ArrayRecord, reference: Sequence[tuple[str, tuple]]) -> list:
    """The reply's tensors as float64 arrays, if they match the global model's.

    Parameters
    ----------
    record : ArrayRecord
        The reply's (plaintext) tensors.
    reference : Sequence[tuple[str, tuple]]
        The global model's tensor names and shapes, in order.

    Raises
    ------
    ReplyError
        If the names, order or shapes differ, a tensor cannot be read, or a value is
        NaN or Inf.
    """
    if list(record.keys()) != [name for name, _ in reference]:
        raise ReplyError("its tensors differ from the global model's")
    tensors = []
    for name, shape in reference:
        try:
            values = np.asarray(record[name].numpy(), dtype=np.float64)
        except Exception as err:  # noqa: BLE001 - an unreadable or unknown Array type
            raise ReplyError(f"tensor '{name}' cannot be read as numbers ({err})") from err
        if values.shape != tuple(shape):
            raise ReplyError(f"tensor '{name}' has shape {values.shape}, expected {shape}")
        if not np.isfinite(values).all():
            raise ReplyError(f"tensor '{name}' holds NaN or Inf")
        tensors.append(values)
    return tensors
