"""Fuzz the loaders of the files a run keeps: only their documented errors escape.

Issue 18, items 3 and 5: a malformed checkpoint escaped as ``TypeError``/``KeyError``,
and a NaN in a DP-SGD state file made the client hang in Opacus' accountant. Thousands of
seeded mutations of each file go through its loader:

- checkpoints (``FlowerLoop.resume_from``: load, authenticate, take the strategy's
  state back): bytes of the zip flipped, cut, inserted; ``state.json`` edited (a field
  set to a hostile value, removed, or added) and signed again with the key, so that
  every check behind the MAC is reached; array members replaced. Either the checkpoint
  loads or ``CheckpointError`` is raised.
- DP-SGD state files (``DPSGDHistory``): bytes and JSON fields likewise, in the node's
  ``state-dir`` and in ``context.state``. Either a history loads, and Opacus computes its
  ε at once, or ``LostHistoryError`` is raised.

Any other exception fails the test with the mutation that caused it.
"""

import copy
import json
import logging
import random
import zipfile

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from lepton_flwr.strategies import DPFedAvg
from lepton_flwr.strategies.checkpoint import (
    CHECKPOINT_FILE,
    MAC_MEMBER,
    STATE_MEMBER,
    Checkpoint,
    CheckpointError,
    _mac,
    save_checkpoint,
)

from lepton_flwr import protocol
from lepton_flwr.dp.client_state import DPSGDHistory, LostHistoryError
from lepton_flwr.dp.dpsgd import epsilon_after_round
from lepton_flwr.dp.rounds import DPRounds

SEED = 18
RUN = "0123456789abcdef0123456789abcdef"
HOSTILE = (
    None,
    True,
    -1,
    0,
    2**70,
    -(2**70),
    1e308,
    float("nan"),
    float("inf"),
    -0.0,
    "",
    "x" * 300,
    "../../etc/passwd",
    [],
    {},
    [[[[[[[[]]]]]]]],
    {"a": {"b": {}}},
    [1.0, 0.5],
    [float("nan"), 0.1, 10],
    [1.0, 0.1, 10, 5, 9],
)


@pytest.fixture(autouse=True)
def quiet_flower_log():
    """Refusals log one line each; thousands of them would only slow the test."""
    logger = logging.getLogger("flwr")
    logger.disabled = True
    yield
    logger.disabled = False


def _paths(value, path=()):
    """Every path to a node of a JSON tree (the root included)."""
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*path, index))


def mutate_json(value, rng: random.Random):
    """``value`` with one node replaced by a hostile value, removed, or given a sibling."""
    value = copy.deepcopy(value)
    path = rng.choice(list(_paths(value)))
    if not path:
        return rng.choice(HOSTILE)
    parent = value
    for step in path[:-1]:
        parent = parent[step]
    action = rng.random()
    if action < 0.7:
        parent[path[-1]] = copy.deepcopy(rng.choice(HOSTILE))
    elif action < 0.85 or not isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[f"extra-{rng.randrange(9)}"] = copy.deepcopy(rng.choice(HOSTILE))
    return value


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """``data`` with bytes flipped, cut, inserted or repeated."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(max(1, len(data)))
        action = rng.random()
        if action < 0.5 and data:
            data[at] = rng.randrange(256)
        elif action < 0.7:
            del data[at:]
        elif action < 0.85:
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        else:
            data[at:at] = data[at : at + rng.randint(1, 64)]
    return bytes(data)


# ---- checkpoints -----------------------------------------------------------------------


def _strategy():
    return DPFedAvg(noise_multiplier=0.8, delta=1e-3, sample_rate=0.5, seed=7)


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    """A real checkpoint after two rounds of DP-FedAvg's bookkeeping; the key's bytes."""
    key_file = tmp_path / "server" / "checkpoint.key"
    key_file.parent.mkdir()
    monkeypatch.setenv("LEPTON_FLWR_CHECKPOINT_KEY", str(key_file))
    rounds = DPRounds(noise_multiplier=0.8, delta=1e-3, sample_rate=0.5, seed=7)
    rounds.start_round(1, list(range(10)))
    rounds.record(0.8)
    rounds.record(0.8)
    arrays = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32)), "b": Array(np.ones(2))})
    state = {"rounds": rounds.state(), "clip_norm": 1.0}
    folder = tmp_path / "run"
    save_checkpoint(folder, Checkpoint(2, arrays, state, evaluated=False))
    assert _strategy().resume_from(folder) is not None  # the unmutated one loads
    with zipfile.ZipFile(folder / CHECKPOINT_FILE) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    return folder, members, key_file.read_bytes()


def _write(folder, members):
    with zipfile.ZipFile(folder / CHECKPOINT_FILE, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _expect_checkpoint_error_or_load(folder, mutation):
    try:
        _strategy().resume_from(folder)
    except CheckpointError:
        pass
    except Exception as err:  # noqa: BLE001 - the failure to report, with its mutation
        pytest.fail(f"{mutation}: {type(err).__name__}: {err}"[:2000])


def test_mutated_checkpoint_bytes_raise_checkpoint_error_only(checkpoint):
    folder, members, _ = checkpoint
    _write(folder, members)
    original = (folder / CHECKPOINT_FILE).read_bytes()
    rng = random.Random(SEED)
    for trial in range(1500):
        (folder / CHECKPOINT_FILE).write_bytes(mutate_bytes(original, rng))
        _expect_checkpoint_error_or_load(folder, f"byte mutation {trial}")


def test_mutated_checkpoint_state_signed_with_the_key_raises_checkpoint_error_only(checkpoint):
    """What a bug, or whoever holds the key, could write: every check behind the MAC."""
    folder, members, key = checkpoint
    state = json.loads(members[STATE_MEMBER])
    rng = random.Random(SEED)
    loaded = 0
    for trial in range(2000):
        changed = mutate_json(state, rng)
        text = json.dumps(changed).encode()
        _write(folder, {**members, STATE_MEMBER: text, MAC_MEMBER: _mac(key, text).encode()})
        try:
            _strategy().resume_from(folder)
            loaded += 1
        except CheckpointError:
            pass
        except Exception as err:  # noqa: BLE001 - the failure to report, with its mutation
            pytest.fail(f"state mutation {trial} ({json.dumps(changed)[:1500]}): {err!r}")
    assert 0 < loaded < 2000  # harmless changes (metrics, extra fields) still load


def test_replaced_checkpoint_members_raise_checkpoint_error_only(checkpoint):
    folder, members, key = checkpoint
    rng = random.Random(SEED)
    for trial in range(500):
        name = rng.choice(sorted(members))
        changed = {**members, name: mutate_bytes(members[name], rng)}
        if rng.random() < 0.3:  # a member under another name, or one more member
            changed[rng.choice(["array-00009", "state-000-00000", "../evil", name + "x"])] = b"x"
        if rng.random() < 0.5:
            changed[MAC_MEMBER] = _mac(key, changed[STATE_MEMBER]).encode()
        _write(folder, changed)
        _expect_checkpoint_error_or_load(folder, f"member mutation {trial} of {name}")


# ---- DP-SGD state files ----------------------------------------------------------------

STATE = {"run": RUN, "partition": 0, "history": [[1.1, 0.01, 100], [0.9, 0.02, 50]]}


def _context(folder, state=None):
    node_config = {protocol.PARTITION_ID: 0, protocol.STATE_DIR: str(folder)}
    return Context(
        run_id=1, node_id=1, node_config=node_config, state=state or RecordDict(), run_config={}
    )


def _expect_lost_history_or_history(context, mutation, accounted):
    """Loads (and Opacus accounts it at once) or refuses with ``LostHistoryError``.

    ``accounted`` holds the histories already accounted (each distinct one once: Opacus
    takes a tenth of a second per history).
    """
    try:
        histories = DPSGDHistory(context, {protocol.RUN_ID: RUN})
        history = tuple(histories.other_runs() + histories.this_run())
    except LostHistoryError:
        return
    except Exception as err:  # noqa: BLE001 - the failure to report, with its mutation
        pytest.fail(f"{mutation}: {type(err).__name__}: {err}"[:2000])
    if history not in accounted:
        accounted.add(history)
        assert epsilon_after_round(list(history), 1.0, 100, 10, 1, 1e-5) >= 0, mutation


def test_mutated_dpsgd_state_files_raise_lost_history_error_only(tmp_path):
    path = tmp_path / f"dpsgd-{RUN}-partition-0.json"
    original = json.dumps(STATE).encode()
    rng, accounted = random.Random(SEED), set()
    for trial in range(1500):
        if trial % 2:
            changed = json.dumps(mutate_json(STATE, rng)).encode()
        else:
            changed = mutate_bytes(original, rng)
        path.write_bytes(changed)
        _expect_lost_history_or_history(_context(tmp_path), f"{changed[:1500]!r}", accounted)


def test_mutated_dpsgd_node_state_raises_lost_history_error_only(tmp_path):
    """The history kept in ``context.state`` (the SuperNode's memory) is checked alike."""
    runs = {RUN: STATE["history"], "f" * 32: [[2.0, 0.5, 3]]}
    rng, accounted = random.Random(SEED), set()
    for trial in range(1500):
        changed = json.dumps(mutate_json(runs, rng)) if trial % 2 else json.dumps(runs)
        if not trial % 2:
            changed = mutate_bytes(changed.encode(), rng).decode("utf-8", "replace")
        state = RecordDict({protocol.DPSGD_STATE: ConfigRecord({"runs": changed})})
        context = _context(tmp_path / "empty", state)
        _expect_lost_history_or_history(context, changed[:1500], accounted)
