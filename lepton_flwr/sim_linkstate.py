"""A link state for Flower's simulation engine that finds a node's messages without a scan.

Flower's simulation engine asks its link state for each node's next message, for every
node, every 0.1 s (``vce_api.add_messages_to_queue``). Flower's ``InMemoryLinkState``
answers each question by checking every stored message (delivered ones too, until their
replies are pulled), so one sweep costs nodes x messages: with 1,000 nodes and 100
messages in flight, a core spent on bookkeeping while the ClientApps wait, and ten times
more at 10,000 nodes.

:class:`IndexedInMemoryLinkState` is Flower's class with its message store indexed by
destination node: a node's question reads that node's messages only. What it returns, and
in which order, is Flower's: the node's undelivered messages in the order they were stored,
each checked by Flower's own ``_check_stored_messages`` (expired and out-of-federation
messages are deleted, not returned), marked delivered with Flower's timestamp. Flower's scan
also deleted expired messages of *other* nodes as a side effect; a heap ordered by expiry
does the same here at every question, so the store holds what Flower's would after a sweep.
One difference remains, stated for completeness: a message invalid because its nodes left
the federation is dropped when its own node is asked (or its reply pulled), not at any
node's question. The simulation's federation is Flower's no-op one, where every node
always belongs, so the two cannot differ there.

Flower's ``run_simulation`` builds its ``LinkStateFactory`` inside, with no way to pass a
state in, so :func:`population_flat_engine` swaps the factory class that
``flwr.simulation.run_simulation`` looks up for one that builds this state, for the length
of a ``with`` block. The swap is made only on Flower versions this module was checked
against (:data:`CHECKED_FLOWER_VERSIONS`, the versions whose ``InMemoryLinkState`` and
simulation entry point were read and tested against; see ``tests/test_sim_linkstate.py``);
on any other version the block runs Flower's own class and logs a warning. Setting the
environment variable ``LEPTON_FLOWER_LINK_STATE=flower`` does the same on purpose (the
population benchmark uses it for its baseline).
"""

from __future__ import annotations

import heapq
import importlib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import flwr
from flwr.app import Message
from flwr.server.superlink.linkstate import in_memory_linkstate as flower_in_memory
from flwr.server.superlink.linkstate import linkstate_factory as flower_factory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

LOGGER = logging.getLogger(__name__)

#: Flower versions whose ``InMemoryLinkState`` and ``run_simulation`` this module was read
#: and tested against. Any other version runs Flower's own link state (with a warning).
CHECKED_FLOWER_VERSIONS: frozenset[str] = frozenset({"1.42.0"})

#: Set to ``flower`` to run Flower's own link state in the simulation (a baseline).
LINK_STATE_ENV = "LEPTON_FLOWER_LINK_STATE"


class MessagesByDestination(dict):
    """Flower's message store (message id -> Message) that also indexes by destination.

    Every way of changing a dict goes through the index, so whoever writes the store
    (Flower's own methods included) keeps it consistent. Within one destination, ids stay
    in the order the dict itself holds them: the order of first insertion.
    """

    def __init__(self) -> None:
        super().__init__()
        self._by_destination: dict[int, dict[str, None]] = {}
        self._destination_of: dict[str, int] = {}
        self._position: dict[str, int] = {}
        self._next_position = 0
        # (expires at, message id): min-heap of when each stored message runs out.
        self.expiry_heap: list[tuple[float, str]] = []

    def for_destination(self, node_id: int) -> list[str]:
        """Ids of the messages stored for ``node_id``, in store order (a copy)."""
        ids = self._by_destination.get(node_id)
        return list(ids) if ids else []

    def has_destination(self, node_id: int) -> bool:
        """Whether any message is stored for ``node_id``."""
        return node_id in self._by_destination

    def __setitem__(self, message_id: str, message: Message) -> None:
        destination = message.metadata.dst_node_id
        previous = self._destination_of.get(message_id)
        super().__setitem__(message_id, message)
        if previous is None:
            self._position[message_id] = self._next_position
            self._next_position += 1
            self._by_destination.setdefault(destination, {})[message_id] = None
        elif previous != destination:
            # An overwrite keeps the dict position; keep it in the new node's order too.
            self._forget_destination(message_id, previous)
            ids = self._by_destination.setdefault(destination, {})
            ids[message_id] = None
            ordered = sorted(ids, key=self._position.__getitem__)
            self._by_destination[destination] = dict.fromkeys(ordered)
        self._destination_of[message_id] = destination
        expires = message.metadata.created_at + message.metadata.ttl
        heapq.heappush(self.expiry_heap, (expires, message_id))

    def __delitem__(self, message_id: str) -> None:
        super().__delitem__(message_id)
        self._forget(message_id)

    def pop(self, message_id: str, *default: object) -> object:  # noqa: D102
        if message_id not in self:
            if default:
                return default[0]
            raise KeyError(message_id)
        message = super().pop(message_id)
        self._forget(message_id)
        return message

    def popitem(self) -> tuple[str, Message]:  # noqa: D102
        message_id, message = super().popitem()
        self._forget(message_id)
        return message_id, message

    def clear(self) -> None:  # noqa: D102
        super().clear()
        self._by_destination.clear()
        self._destination_of.clear()
        self._position.clear()
        self.expiry_heap.clear()

    def setdefault(self, message_id: str, message: Message) -> Message:  # noqa: D102
        if message_id not in self:
            self[message_id] = message
        return self[message_id]

    def update(self, *others: object, **kwargs: Message) -> None:  # noqa: D102
        for message_id, message in dict(*others, **kwargs).items():
            self[message_id] = message

    def __ior__(self, other: object) -> MessagesByDestination:
        self.update(other)
        return self

    def _forget(self, message_id: str) -> None:
        self._position.pop(message_id, None)
        destination = self._destination_of.pop(message_id, None)
        if destination is not None:
            self._forget_destination(message_id, destination)
        # Entries of deleted ids are skipped when they come up; rebuilt from the live ones
        # when they outnumber them, so a long run's heap stays the size of its store.
        if len(self.expiry_heap) > 2 * len(self) + 1024:
            self.expiry_heap = [
                (message.metadata.created_at + message.metadata.ttl, message_id)
                for message_id, message in self.items()
            ]
            heapq.heapify(self.expiry_heap)

    def _forget_destination(self, message_id: str, destination: int) -> None:
        ids = self._by_destination[destination]
        del ids[message_id]
        if not ids:
            del self._by_destination[destination]


def seconds_now() -> float:
    """Seconds since the epoch: Flower's ``now().timestamp()``, without the datetime.

    Flower's ``now()`` is ``datetime.now(tz=UTC)``, built from ``time.time()``; building
    the datetime costs twenty times as much, and the engine asks once per node per sweep.
    """
    return time.time()


class IndexedInMemoryLinkState(flower_in_memory.InMemoryLinkState):
    """Flower's ``InMemoryLinkState`` whose ``get_message_ins`` reads one node's messages.

    Everything but the message lookup is Flower's. See the module docstring for what is
    kept (results, order, delivery marks, TTL expiry, deletions) and the one difference.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.message_ins_store: MessagesByDestination = MessagesByDestination()

    def get_message_ins(
        self,
        node_id: int,
        limit: int | None,
        *,
        run_id: int | None = None,
    ) -> list[Message]:
        """Get the node's Messages that have not been delivered yet (Flower's contract)."""
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")

        store = self.message_ins_store
        if self._expiry_due():
            with self.lock:
                self._drop_expired()
        if not store.has_destination(node_id):
            # Most polls: nothing stored for this node, so Flower's answer is []. One dict
            # lookup, atomic under the GIL, stands for the scan under the lock.
            return []
        found: list[Message] = []
        with self.lock:
            for message_id in store.for_destination(node_id):
                self._check_stored_messages({message_id})
                message = store.get(message_id)
                if (
                    message is not None
                    and (run_id is None or message.metadata.run_id == run_id)
                    and message.metadata.delivered_at == ""
                ):
                    found.append(message)
                if limit and len(found) == limit:
                    break

        if found:
            delivered_at = flower_in_memory.now().isoformat()
            for message in found:
                message.metadata.delivered_at = delivered_at
        return found

    def _expiry_due(self) -> bool:
        """Whether the earliest stored expiry has passed (read without the lock)."""
        try:
            return self.message_ins_store.expiry_heap[0][0] <= seconds_now()
        except IndexError:  # empty, or emptied by another thread meanwhile
            return False

    def _drop_expired(self) -> None:
        """Check, with Flower's check, every stored message whose TTL has run out."""
        heap = self.message_ins_store.expiry_heap
        if not heap:
            return
        current = seconds_now()
        due: set[str] = set()
        while heap and heap[0][0] <= current:
            _, message_id = heapq.heappop(heap)
            if message_id in self.message_ins_store:
                due.add(message_id)
        if due:
            self._check_stored_messages(due)


class IndexedLinkStateFactory(flower_factory.LinkStateFactory):
    """Flower's ``LinkStateFactory`` that builds :class:`IndexedInMemoryLinkState` in memory."""

    def state(self) -> flower_factory.LinkState:  # noqa: D102
        if self.state_instance is not None:
            return self.state_instance
        if self.database != FLWR_IN_MEMORY_DB_NAME:
            return super().state()
        with self._state_lock:
            if self.state_instance is None:
                self.state_instance = IndexedInMemoryLinkState(
                    self.federation_manager, self.objectstore_factory.store()
                )
            return self.state_instance


def indexed_state_supported(version: str | None = None) -> bool:
    """Whether the indexed link state was checked against this Flower version.

    Parameters
    ----------
    version
        A Flower version string; the installed one when None.
    """
    return (flwr.__version__ if version is None else version) in CHECKED_FLOWER_VERSIONS


def _swappable(simulation_module: object) -> bool:
    """Whether ``run_simulation``'s module builds its state from Flower's factory class."""
    return getattr(simulation_module, "LinkStateFactory", None) in (
        flower_factory.LinkStateFactory,
        IndexedLinkStateFactory,
    )


@contextmanager
def population_flat_engine(version: str | None = None) -> Iterator[bool]:
    """Make ``flwr.simulation.run_simulation`` use :class:`IndexedInMemoryLinkState`.

    Inside the block, Flower's ``run_simulation`` builds the indexed link state; on exit
    Flower's own factory is back. On a Flower version not in
    :data:`CHECKED_FLOWER_VERSIONS`, or with ``LEPTON_FLOWER_LINK_STATE=flower``, nothing is
    swapped and Flower's own class runs (a warning says so for the version).

    Parameters
    ----------
    version
        The Flower version to decide on; the installed one when None (tests pass others).

    Yields
    ------
    bool
        True when the indexed link state is in use.
    """
    # The package's ``run_simulation`` attribute is the function; the module holds the name.
    simulation_module = importlib.import_module("flwr.simulation.run_simulation")
    installed = flwr.__version__ if version is None else version
    if os.environ.get(LINK_STATE_ENV, "").strip().lower() == "flower":
        yield False
        return
    if not indexed_state_supported(installed) or not _swappable(simulation_module):
        LOGGER.warning(
            "Flower %s is not one the indexed link state was checked against (%s): the "
            "simulation runs Flower's own InMemoryLinkState, whose per-node polling scans "
            "every stored message (rounds slow down with the number of nodes).",
            installed,
            ", ".join(sorted(CHECKED_FLOWER_VERSIONS)),
        )
        yield False
        return
    original = simulation_module.LinkStateFactory
    simulation_module.LinkStateFactory = IndexedLinkStateFactory
    try:
        yield True
    finally:
        simulation_module.LinkStateFactory = original
