"""Checks of one plaintext or encrypted reply, shared by the strategies.

Each raises :class:`ReplyError` saying what is wrong, so that the strategy rejects that
reply alone (one log line naming the node) and the round goes on with the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from lepton_flwr.arrays import check_payload
from lepton_flwr.mistakes import NO_WEIGHT
from lepton_flwr.numbers import is_count

MAX_EXAMPLES = 10_000_000  # default largest example count a reply may claim


class ReplyError(ValueError):
    """A reply that a strategy rejects; the message says why."""


def the_record(msg: Message, record_type: type) -> ArrayRecord | MetricRecord:
    """A reply's one record of a type (Flower's reply contract: one of each).

    Raises
    ------
    ReplyError
        If there is not exactly one.
    """
    records = [r for r in msg.content.values() if isinstance(r, record_type)]
    if len(records) != 1:
        raise ReplyError(f"expected one {record_type.__name__}, got {len(records)}")
    return records[0]


def example_count(metrics: MetricRecord, key: str, max_examples: int, minimum: int = 1) -> int:
    """The reply's example count (``key``): a whole number in [minimum, max_examples].

    Raises
    ------
    ReplyError
        If it is missing, not a whole number (a list, 2.5, NaN, a bool) or out of range
        (integers of any size are compared exactly).
    """
    count = metrics.get(key)
    if count is None:
        raise ReplyError(
            f"no '{key}' {NO_WEIGHT.phrase} (the handler must report it, e.g. "
            f"MetricRecord({{'{key}': len(data), ...}}))"
        )
    if not is_count(count):
        raise ReplyError(f"'{key}' must be a whole number, got {str(count)[:40]}")
    if not minimum <= count <= max_examples:
        raise ReplyError(f"'{key}' = {str(count)[:40]} is not in [{minimum}, {max_examples}]")
    return int(count)


def reply_metrics(
    msg: Message, weighted_by_key: str, max_examples: int = MAX_EXAMPLES, minimum: int = 1
) -> MetricRecord:
    """The reply's one ``MetricRecord``, whose weight (``weighted_by_key``) is checked.

    Training replies weigh at least 1 example (``minimum=1``), evaluation replies at
    least 0 (a client without test data).

    Raises
    ------
    ReplyError
        If the reply has not exactly one ``MetricRecord``, or its weight fails
        :func:`example_count`.
    """
    metrics = the_record(msg, MetricRecord)
    example_count(metrics, weighted_by_key, max_examples, minimum)
    return metrics


def plaintext_tensors(
    record: ArrayRecord, reference: Sequence[tuple[str, tuple, str]], finite: bool = True
) -> list:
    """The reply's tensors as float64 arrays, if they match the global model's.

    Parameters
    ----------
    record : ArrayRecord
        The reply's (plaintext) tensors.
    reference : Sequence[tuple[str, tuple, str]]
        The global model's tensor names, shapes and dtypes, in order.
    finite : bool
        Refuse NaN and Inf (the default); False returns them, for a caller with its own
        rule for them.

    Raises
    ------
    ReplyError
        If the names, order, shapes or dtypes differ (a complex, text or float16 tensor
        in a float32 model would break the average or lose its precision), a tensor
        cannot be read, or (``finite``) a value is NaN or Inf.
    """
    if list(record.keys()) != [name for name, _, _ in reference]:
        raise ReplyError("its tensors differ from the global model's")
    tensors = []
    for name, shape, dtype in reference:
        array = record[name]
        if str(array.dtype) != str(dtype):
            raise ReplyError(f"tensor '{name}' has dtype {array.dtype!r:.40}, expected {dtype}")
        try:  # the bytes must hold exactly the expected shape before numpy reads them
            check_payload(array.dtype, tuple(shape), array.stype, array.data)
            values = np.asarray(array.numpy(), dtype=np.float64)
        except Exception as err:  # noqa: BLE001 - an unreadable or unknown Array type
            raise ReplyError(f"tensor '{name}' cannot be read as numbers ({err})") from err
        if values.shape != tuple(shape):
            raise ReplyError(f"tensor '{name}' has shape {values.shape}, expected {shape}")
        if finite and not np.isfinite(values).all():
            raise ReplyError(f"tensor '{name}' holds NaN or Inf")
        tensors.append(values)
    return tensors
