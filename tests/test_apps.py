"""The ClientApp's handlers and the round loop, driven without a Flower runtime."""

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from lepton_flwr.apps.client import make_client_app
from lepton_flwr.apps.common import model_for
from lepton_flwr.config import load_config


@pytest.fixture(autouse=True)
def _task_identity():
    # Messages can only be built inside a running app; pretend to be one.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _message(content, message_type):
    msg = Message(content, dst_node_id=1, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg


def _context(node_config):
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_train_reply_carries_new_weights_and_the_example_count(digits_cfg):
    model = model_for(digits_cfg)
    sent = ArrayRecord(model.state_dict())
    content = RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1})})
    app = make_client_app(digits_cfg)
    reply = app(_message(content, "train"), _context({"partition-id": 0, "num-partitions": 3}))
    assert not reply.has_error()
    arrays, metrics = reply.content["arrays"], reply.content["metrics"]
    assert list(arrays.keys()) == list(sent.keys())
    assert metrics["num-examples"] == 383  # 1437 pool rows / 3 clients, 80 % kept for training
    assert metrics["train-loss"] > 0
    before, after = sent.to_numpy_ndarrays(), arrays.to_numpy_ndarrays()
    assert any((a != b).any() for a, b in zip(before, after, strict=True))


def test_evaluate_reply_reports_local_metrics(digits_cfg):
    sent = ArrayRecord(model_for(digits_cfg).state_dict())
    content = RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1})})
    app = make_client_app(digits_cfg)
    reply = app(_message(content, "evaluate"), _context({"partition-id": 2, "num-partitions": 3}))
    metrics = reply.content["metrics"]
    assert set(metrics) == {"eval-loss", "eval-accuracy", "num-examples"}
    assert metrics["num-examples"] == 96 and 0 <= metrics["eval-accuracy"] <= 1


def test_missing_node_config_becomes_an_error_reply_that_says_what_to_set(digits_cfg):
    sent = ArrayRecord(model_for(digits_cfg).state_dict())
    content = RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1})})
    app = make_client_app(digits_cfg)
    reply = app(_message(content, "train"), _context({}))
    assert "--node-config 'partition-id=<i> num-partitions=<n>'" in reply.error.reason


def test_a_node_error_reaches_the_server_without_the_nodes_paths(digits_cfg, tmp_path):
    """Before: a missing dataset file sent the node's data folder back to the server."""
    cfg = load_config("strategy=fedavg privacy=none he=none")  # Fashion-MNIST, from data-root
    sent = ArrayRecord(model_for(digits_cfg).state_dict())
    content = RecordDict({"arrays": sent, "config": ConfigRecord({"server-round": 1})})
    hidden = tmp_path / "patients-2024"
    hidden.mkdir()
    node = {"partition-id": 0, "num-partitions": 3, "data-root": str(hidden)}
    reply = make_client_app(cfg)(_message(content, "train"), _context(node))
    assert reply.has_error() and "patients-2024" not in reply.error.reason
    assert "its log has the reason" in reply.error.reason
