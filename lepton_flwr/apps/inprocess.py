"""A Flower Grid that runs a ClientApp in this process: fast, inspectable FL rounds.

For tests and benchmarks with many clients, where Ray's start-up and per-message
overhead would dominate. Each message is copied before delivery (as serialization
would), every reply the server receives is kept in ``received`` for inspection, and
exceptions become Error replies as in Flower. Clients run one after the other.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from lepton_flwr import protocol

ClientFn = Callable[[Message, Context], Message]


class InProcessGrid(Grid):
    """``num_nodes`` simulated nodes, partition i on node ``100 + i``.

    Parameters
    ----------
    client_fn : Callable[[Message, Context], Message]
        The ClientApp (or any callable like it).
    num_nodes : int
        Nodes; node ``100 + i`` gets ``partition-id=i`` in its node config.
    keep_replies : bool
        Keep every reply in ``received`` (tests); off for long runs.
    observe : Callable[[Message], None] | None
        Called with every reply as the server receives it (the privacy audit counts
        what the server reads).
    """

    def __init__(
        self,
        client_fn: ClientFn,
        num_nodes: int,
        keep_replies: bool = True,
        observe: Callable[[Message], None] | None = None,
    ):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        self.client_fn = client_fn
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={protocol.PARTITION_ID: i, protocol.NUM_PARTITIONS: num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self.received: list[Message] = []
        self.keep_replies = keep_replies
        self.observe = observe
        self._count = 0

    def set_run(self, run_id: int) -> None:  # noqa: D102
        pass

    @property
    def run(self):  # noqa: D102
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102
        return list(self.contexts)

    def push_messages(self, messages):  # noqa: D102
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: D102
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> Iterable[Message]:
        """Deliver copies of the messages one by one; collect the replies."""
        replies = []
        for sent in messages:
            msg = Message(
                copy.deepcopy(sent.content),
                dst_node_id=sent.metadata.dst_node_id,
                message_type=sent.metadata.message_type,
            )
            self._count += 1
            msg.metadata.__dict__["_message_id"] = f"m{self._count}"
            try:
                reply = self.client_fn(msg, self.contexts[sent.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001 - Flower turns these into Error replies
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if self.keep_replies:
                self.received.append(reply)
            if self.observe is not None:
                self.observe(reply)
            replies.append(reply)
        return replies
