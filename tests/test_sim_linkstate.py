"""The indexed link state answers as Flower's InMemoryLinkState does, without its scan.

One scripted workload (messages to many nodes, TTLs running out on a fake clock, nodes
polled the way the simulation engine polls them, replies stored and pulled, nodes going
offline, messages deleted) runs through Flower's class and through ours; every answer and
the store after every sweep must be the same.
"""

from __future__ import annotations

import datetime
import importlib
import itertools
import logging
import random
import sys

import pytest
from flwr.app import Message, Metadata, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.linkstate import in_memory_linkstate as flower_in_memory
from flwr.server.superlink.linkstate import linkstate_factory as flower_factory
from flwr.supercore import date as flower_date
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.superlink.federation import NoOpFederationManager

from lepton_flwr import sim_linkstate
from lepton_flwr.sim_linkstate import (
    LINK_STATE_ENV,
    IndexedInMemoryLinkState,
    IndexedLinkStateFactory,
    population_flat_engine,
)

RUN_ID = 4242
OTHER_RUN_ID = 4343
NODES = 12


class FakeClock:
    """Flower's ``now()``, started at the real time and moved only by the test."""

    def __init__(self) -> None:
        self.seconds = flower_date.now().timestamp()

    def now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.seconds, tz=datetime.UTC)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Every Flower module that reads ``flwr.supercore.date.now`` reads the fake clock."""
    fake = FakeClock()
    real_now = flower_date.now
    patched = [
        module
        for name, module in list(sys.modules.items())
        if name.startswith("flwr.") and getattr(module, "now", None) is real_now
    ]
    for module in patched:
        monkeypatch.setattr(module, "now", fake.now)
    monkeypatch.setattr(sim_linkstate, "seconds_now", lambda: fake.seconds)
    assert flower_in_memory.now == fake.now
    return fake


def new_state(state_class: type, monkeypatch: pytest.MonkeyPatch) -> object:
    """A state with two runs and ``NODES`` online nodes whose ids are 1..NODES."""
    state = state_class(NoOpFederationManager(), ObjectStoreFactory().store())
    for run_id, task_id in ((RUN_ID, 7), (OTHER_RUN_ID, 8)):  # as run_simulation does
        run = Run.create_empty(run_id=run_id)
        run.primary_task_id = task_id
        run.federation_id = NOOP_FEDERATION_ID
        state.run_ids[run_id] = flower_in_memory.RunRecord(run=run)
        state.task_store[task_id] = Task(task_id=task_id, run_id=run_id)
    ids = itertools.count(1)
    monkeypatch.setattr(flower_in_memory, "generate_rand_int_from_bytes", lambda *a, **k: next(ids))
    for i in range(NODES):
        node_id = state.create_node("owner", "name", i.to_bytes(32, "big"), heartbeat_interval=1e6)
        state.acknowledge_node_heartbeat(node_id, heartbeat_interval=1e6)
    return state


def instruction(message_id: str, node_id: int, run_id: int, ttl: float, at: float) -> Message:
    """An instruction from the SuperLink, as ``Grid.push_messages`` would store it."""
    metadata = Metadata(
        run_id=run_id,
        message_id=message_id,
        src_node_id=SUPERLINK_NODE_ID,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id="",
        created_at=at,
        ttl=ttl,
        message_type="train",
    )
    return Message(RecordDict(), metadata=metadata)


def reply_to(message: Message, reply_id: str) -> Message:
    """The node's reply to ``message``, with its id set as the engine sets it."""
    reply = Message(RecordDict(), reply_to=message)
    reply.metadata.__dict__["_message_id"] = reply_id
    return reply


def summary(messages: list[Message]) -> list[tuple]:
    """What a caller can see of returned messages: ids, replies' targets, errors, marks."""
    return [
        (
            m.metadata.message_id if not m.has_error() else "(generated)",
            m.metadata.reply_to_message_id,
            m.metadata.dst_node_id,
            m.error.code if m.has_error() else None,
            m.metadata.delivered_at != "",
        )
        for m in messages
    ]


def run_workload(state: object, clock: FakeClock, seed: int) -> list:
    """Drive ``state`` through a seeded workload; return everything it answered."""
    rng = random.Random(seed)
    answers: list = []
    delivered: list[Message] = []
    pushed: list[str] = []
    counter = itertools.count()
    for step in range(400):
        action = rng.random()
        if action < 0.35:  # the server pushes a message, sometimes with a short TTL
            node_id = rng.choice([*range(1, NODES + 1), 999])  # 999: not a node
            ttl = rng.choice([2.0, 5.0, 3600.0])
            run_id = rng.choice([RUN_ID, RUN_ID, OTHER_RUN_ID])
            message_id = f"ins-{next(counter)}"
            stored = state.store_message_ins(
                instruction(message_id, node_id, run_id, ttl, clock.seconds)
            )
            answers.append(("store_ins", stored))
            if stored:
                pushed.append(message_id)
        elif action < 0.55:  # one sweep of the simulation engine's poller
            for node_id in range(1, NODES + 1):
                got = state.get_message_ins(node_id=node_id, limit=1)
                answers.append(("poll", node_id, summary(got)))
                delivered.extend(got)
            answers.append(("after_sweep", list(state.message_ins_store), state.num_message_res()))
        elif action < 0.6:  # a SuperNode's pull: everything for one node and one run
            node_id = rng.randint(1, NODES)
            got = state.get_message_ins(node_id=node_id, limit=None, run_id=RUN_ID)
            answers.append(("pull_all", node_id, summary(got)))
            delivered.extend(got)
        elif action < 0.75 and delivered:  # a node replies (sometimes twice)
            message = rng.choice(delivered)
            reply = reply_to(message, f"res-{next(counter)}")
            answers.append(("store_res", state.store_message_res(reply)))
        elif action < 0.85 and pushed:  # the server pulls replies for some ids
            ids = set(rng.sample(pushed, min(len(pushed), rng.randint(1, 6))))
            run_id = rng.choice([RUN_ID, OTHER_RUN_ID])
            try:
                got = state.get_message_res(message_ids=ids, run_id=run_id)
                answers.append(("get_res", sorted(summary(got))))
            except ValueError as error:  # ids of another run: Flower refuses
                answers.append(("get_res_refused", str(error)))
        elif action < 0.9 and pushed:  # the server deletes what it pulled
            ids = set(rng.sample(pushed, min(len(pushed), 3)))
            state.delete_messages(ids)
            answers.append(("delete", sorted(ids)))
        elif action < 0.93:  # a node goes offline
            node_id = rng.randint(1, NODES)
            answers.append(("deactivate", node_id, state.deactivate_node(node_id)))
        else:  # time passes: short TTLs run out
            clock.seconds += rng.choice([0.5, 1.0, 3.0])
        answers.append(("sizes", step, state.num_message_ins(), state.num_message_res()))
    return answers


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_answers_as_flower(clock: FakeClock, monkeypatch: pytest.MonkeyPatch, seed: int):
    """Every answer, and the store after every engine sweep, is Flower's."""
    start = clock.seconds
    flower = run_workload(new_state(flower_in_memory.InMemoryLinkState, monkeypatch), clock, seed)
    clock.seconds = start
    ours = run_workload(new_state(IndexedInMemoryLinkState, monkeypatch), clock, seed)
    assert len(flower) == len(ours)
    for theirs, mine in zip(flower, ours, strict=True):
        assert mine == theirs
    kinds = {answer[0] for answer in flower}
    # The workload exercised what it is meant to: deliveries, replies, expiries.
    assert {"poll", "store_res", "get_res", "delete"} <= kinds
    assert any(a[0] == "poll" and a[2] for a in flower)
    assert any(a[0] == "get_res" and any(s[3] is not None for s in a[1]) for a in flower)
    # Some messages ran out while in the store (the store shrank with no delete asked).
    assert any(
        a[0] == "sizes" and b[0] == "sizes" and b[2] < a[2]
        for a, b in itertools.pairwise(x for x in flower if x[0] in ("sizes", "delete"))
    )


def test_index_follows_every_change(clock: FakeClock, monkeypatch: pytest.MonkeyPatch):
    """After the workload the per-node index is the store grouped by node, in store order."""
    state = new_state(IndexedInMemoryLinkState, monkeypatch)
    run_workload(state, clock, seed=3)
    store = state.message_ins_store
    assert len(store) > 0
    for node_id in [*range(1, NODES + 1), 999]:
        expected = [i for i, m in store.items() if m.metadata.dst_node_id == node_id]
        assert store.for_destination(node_id) == expected
    # Writes that bypass Flower's methods keep it too.
    first = next(iter(store))
    message = store.pop(first)
    assert first not in store.for_destination(message.metadata.dst_node_id)
    store[first] = message
    assert store.for_destination(message.metadata.dst_node_id)[-1] == first
    store.clear()
    assert all(not store.has_destination(n) for n in range(1, NODES + 1))


def test_expiry_heap_stays_the_size_of_the_store(clock: FakeClock, monkeypatch):
    """Many rounds of messages stored and deleted leave no heap of dead entries behind."""
    state = new_state(IndexedInMemoryLinkState, monkeypatch)
    for i in range(5000):
        state.store_message_ins(instruction(f"m{i}", 1 + i % NODES, RUN_ID, 3600.0, clock.seconds))
        if i >= 10:
            state.delete_messages({f"m{i - 10}"})
    store = state.message_ins_store
    assert len(store) == 10
    assert len(store.expiry_heap) <= 2 * len(store) + 1024 + 1
    assert sorted(i for _, i in store.expiry_heap if i in store) == sorted(store)


def test_a_poll_checks_only_the_nodes_own_messages(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
):
    """Flower checks every stored message at each poll; ours checks the node's own."""
    checked: list[str] = []
    original = flower_in_memory.InMemoryLinkState._check_stored_messages

    def counting(self, message_ids, run_id=None):
        checked.extend(message_ids)
        return original(self, message_ids, run_id)

    monkeypatch.setattr(flower_in_memory.InMemoryLinkState, "_check_stored_messages", counting)
    for state_class, most in (
        (flower_in_memory.InMemoryLinkState, 300),
        (IndexedInMemoryLinkState, 1),
    ):
        state = new_state(state_class, monkeypatch)
        for i in range(300):  # 300 messages for node 1, delivered or not
            state.store_message_ins(instruction(f"m{i}", 1, RUN_ID, 3600.0, clock.seconds))
        checked.clear()
        assert state.get_message_ins(node_id=2, limit=1) == []
        assert len(checked) == (most if state_class is flower_in_memory.InMemoryLinkState else 0)
        checked.clear()
        assert [m.metadata.message_id for m in state.get_message_ins(node_id=1, limit=1)] == ["m0"]
        assert len(checked) == 1  # both stop at the first undelivered message


def test_expired_messages_of_other_nodes_are_dropped_at_any_poll(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
):
    """As with Flower's scan, a poll for one node drops every node's expired messages."""
    for state_class in (flower_in_memory.InMemoryLinkState, IndexedInMemoryLinkState):
        state = new_state(state_class, monkeypatch)
        state.store_message_ins(instruction("short", 3, RUN_ID, 2.0, clock.seconds))
        state.store_message_ins(instruction("long", 4, RUN_ID, 3600.0, clock.seconds))
        clock.seconds += 2.5
        assert state.get_message_ins(node_id=5, limit=1) == []
        assert list(state.message_ins_store) == ["long"], state_class
        clock.seconds -= 2.5


def test_engine_swaps_the_factory_only_inside_the_block():
    """On a checked Flower version, run_simulation builds the indexed state in the block."""
    module = importlib.import_module("flwr.simulation.run_simulation")
    assert module.LinkStateFactory is flower_factory.LinkStateFactory
    with population_flat_engine(version="1.42.0") as indexed:
        assert indexed
        factory = module.LinkStateFactory(
            FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
        )
        assert isinstance(factory.state(), IndexedInMemoryLinkState)
        assert factory.state() is factory.state()
    assert module.LinkStateFactory is flower_factory.LinkStateFactory


def test_unchecked_flower_version_falls_back_with_a_warning(caplog: pytest.LogCaptureFixture):
    """A Flower version the adapter was not checked against runs Flower's own class."""
    module = importlib.import_module("flwr.simulation.run_simulation")
    assert "9.9.9" not in sim_linkstate.CHECKED_FLOWER_VERSIONS
    with caplog.at_level(logging.WARNING, logger=sim_linkstate.__name__):
        with population_flat_engine(version="9.9.9") as indexed:
            assert not indexed
            assert module.LinkStateFactory is flower_factory.LinkStateFactory
    assert "9.9.9" in caplog.text and "InMemoryLinkState" in caplog.text


def test_seconds_now_is_flowers_clock():
    """The adapter's clock reads what Flower's ``now().timestamp()`` reads."""
    before = flower_date.now().timestamp()
    ours = sim_linkstate.seconds_now()
    after = flower_date.now().timestamp()
    resolution = 1e-6  # a datetime rounds to the microsecond
    assert before - resolution <= ours <= after + resolution


def test_installed_flower_is_covered():
    """The Flower this project pins is one the adapter was checked against."""
    assert sim_linkstate.indexed_state_supported()


def test_environment_asks_for_flowers_class(monkeypatch: pytest.MonkeyPatch):
    """``LEPTON_FLOWER_LINK_STATE=flower`` runs Flower's own class (the benchmark baseline)."""
    module = importlib.import_module("flwr.simulation.run_simulation")
    monkeypatch.setenv(LINK_STATE_ENV, "flower")
    with population_flat_engine() as indexed:
        assert not indexed
        assert module.LinkStateFactory is flower_factory.LinkStateFactory


def test_factory_keeps_sql_databases_on_flowers_class(tmp_path):
    """Only the in-memory state is swapped; a database path still gets Flower's SQL state."""
    factory = IndexedLinkStateFactory(
        str(tmp_path / "state.db"), NoOpFederationManager(), ObjectStoreFactory()
    )
    state = factory.state()
    assert not isinstance(state, IndexedInMemoryLinkState)
    assert type(state).__name__ == "SqlLinkState"
