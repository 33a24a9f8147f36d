"""What reaches the server, per client per round, read from the real reply messages.

The attack surface next to the attacks: for each kind of record in a training reply,
what the server can read (plaintext tensors, ciphertexts and their public header,
metric names and values in the clear).
"""

from __future__ import annotations

import math
from collections import Counter

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from lepton_flwr.he.records import EncryptedModel, is_encrypted
from lepton_flwr.mods.common import is_train


def describe_reply(msg: Message) -> list[str]:
    """One line per thing the server can read in this reply."""
    if msg.has_error():
        return [f"an error reason (text): {msg.error.reason[:60]}"]
    seen = []
    for record in msg.content.values():
        if isinstance(record, ArrayRecord):
            if is_encrypted(record):
                model = EncryptedModel.from_record(record)
                seen.append(f"ciphertexts of {model.num_values} values")
                seen.append(
                    "in the clear: key fingerprint, weight, bound, tensor names/shapes/dtypes"
                )
            else:
                count = sum(math.prod(a.shape) for a in record.values())
                seen.append(f"plaintext tensors: {count} values (the client's model or update)")
        elif isinstance(record, MetricRecord):
            seen += [f"metric in the clear: {key}" for key in record]
        elif isinstance(record, ConfigRecord):
            seen += [f"config in the clear: {key}" for key in record]
    return seen


class SurfaceTally:
    """Counts what the server reads in training replies, reply by reply, keeping none.

    Give it to :class:`lepton_flwr.apps.inprocess.InProcessGrid` as ``observe`` to count
    a whole federation's rounds.
    """

    def __init__(self):
        self.counts: Counter = Counter()
        self.replies = 0

    def __call__(self, msg: Message) -> None:
        """Count one reply (training replies only)."""
        if is_train(msg):
            self.replies += 1
            self.counts.update(describe_reply(msg))

    def rows(self) -> list[dict]:
        """Each thing seen, with the number of replies it came in and the replies counted."""
        return [{"what": line, "replies": n, "of": self.replies} for line, n in self.counts.items()]
