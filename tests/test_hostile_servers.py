"""A hostile server must not turn clients into oracles (issue 12).

What a server (or whoever launches a run) sends a client: the DP parameters it asks for,
and the run config. A node refuses requests below its own privacy floor (node config),
never resolves interpolations, and takes the places of its files from its node config.
"""

import math

import numpy as np
import pytest
from conftest import client_message
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from opacus.accountants import RDPAccountant

from lepton_flwr import protocol
from lepton_flwr.apps.client import make_client_app, with_node_data_root
from lepton_flwr.apps.common import config_from_context, model_for
from lepton_flwr.config import load_config
from lepton_flwr.mods import dp_share_mod, make_he_mod


def _context(node_config=None, run_config=None):
    return Context(
        run_id=1,
        node_id=1,
        node_config=dict(node_config or {}),
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )


def _train_message(arrays, config, server_round=1):
    return client_message(arrays, config, server_round)


def _share_request(clip_norm, share_std):
    return {
        protocol.CLIPPING_NORM: clip_norm,
        protocol.NOISE_SHARE_STD: share_std,
        protocol.UPDATE_SCALE: 1.0,
        protocol.SHARE_BOUND: 1e9,
    }


def _user_app():
    app = ClientApp(mods=[dp_share_mod])

    @app.train()
    def train(msg, context):
        new = {k: Array(v.numpy() + 0.5) for k, v in msg.content["arrays"].items()}
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

    return app


@pytest.mark.parametrize(
    ("node_config", "clip_norm", "share_std", "reason"),
    [
        ({}, 1.0, 0.0, "an update without noise is never sent"),
        ({}, 1.0, float("nan"), "an update without noise is never sent"),
        ({}, float("inf"), 1.0, "clip norm inf is not finite"),
        ({protocol.MAX_CLIP_NORM: 1.0}, 1e9, 1e8, "above this node's dp-max-clip-norm=1"),
        (
            {protocol.MIN_SHARE_NOISE: 0.1},
            1.0,
            0.05,
            "below this node's dp-min-share-noise-multiplier=0.1",
        ),
        ({protocol.MIN_SHARE_NOISE: "lots"}, 1.0, 1.0, "is not a finite number"),
    ],
)
def test_clients_refuse_dp_requests_below_their_floor(node_config, clip_norm, share_std, reason):
    """Before: a server sending σ = 0 and C = 1e9 received the client's exact update."""
    arrays = ArrayRecord({"w": Array(np.zeros(5, dtype=np.float32))})
    msg = _train_message(arrays, _share_request(clip_norm, share_std))
    reply = _user_app()(msg, _context(node_config))
    assert reply.has_error() and reason in reply.error.reason
    assert reply.error.reason.startswith("dp_share_mod:")


def test_a_request_within_the_floor_is_served():
    arrays = ArrayRecord({"w": Array(np.zeros(5, dtype=np.float32))})
    floor = {protocol.MAX_CLIP_NORM: 1.0, protocol.MIN_SHARE_NOISE: 0.1}
    reply = _user_app()(_train_message(arrays, _share_request(1.0, 0.2)), _context(floor))
    assert not reply.has_error(), reply.error.reason
    assert reply.content["metrics"][protocol.DP_SHARE_STD] == 0.2


@pytest.mark.parametrize(
    "override",
    ["dataset.root=/etc", "+dataset.root=/etc", "he.secret_context_path=/home/x/secret.ctx"],
)
def test_run_config_may_not_choose_where_a_node_keeps_its_files(override):
    """Before: the server set dataset.root and learnt from errors which files exist."""
    context = _context(run_config={"hydra-overrides": f"+experiment=digits_smoke {override}"})
    with pytest.raises(ValueError, match="node config only"):
        config_from_context(context)


def test_the_data_folder_comes_from_the_node_config():
    cfg = load_config("")  # Fashion-MNIST: a dataset with a folder
    moved = with_node_data_root(cfg, _context({protocol.DATA_ROOT: "/srv/node-data"}))
    assert moved["dataset"]["root"] == "/srv/node-data"
    assert with_node_data_root(cfg, _context())["dataset"]["root"] == cfg["dataset"]["root"]


def test_a_key_path_from_the_run_config_does_not_say_whether_the_file_exists(tmp_path):
    """A missing file and a file that is not a key give the same reason."""
    not_a_key = tmp_path / "passwd"
    not_a_key.write_text("root:x:0:0\n")
    reasons = []
    for path in (tmp_path / "missing", not_a_key):
        context = _context(run_config={protocol.SECRET_CONTEXT: str(path)})
        arrays = ArrayRecord({"w": Array(np.zeros(5, dtype=np.float32))})
        app = ClientApp(mods=[make_he_mod()])

        @app.train()
        def train(msg, context):
            return Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)

        reply = app(_train_message(arrays, {}), context)
        assert reply.has_error()
        reasons.append(reply.error.reason.replace(str(path), "<path>"))
    assert reasons[0] == reasons[1] and "node config" in reasons[0]


def test_dpsgd_refuses_a_round_that_would_pass_the_nodes_epsilon(tmp_path):
    cfg = load_config(
        "+experiment=digits_smoke privacy=dpsgd privacy.delta=1e-3 num_rounds=3 train.batch_size=64"
    )
    app = make_client_app(cfg)
    state = {protocol.STATE_DIR: str(tmp_path)}  # a floor needs it: see the next test
    context = _context({"partition-id": 0, "num-partitions": 3, **state})
    arrays = ArrayRecord(model_for(cfg).state_dict())
    reply = app(_train_message(arrays, {"server-round": 1}, 1), context)
    assert not reply.has_error(), reply.error.reason
    z, n = (reply.content["metrics"][k] for k in ("dpsgd-noise-multiplier", "num-examples"))
    steps = math.ceil(n / 64)
    epsilons = []
    for rounds in (2, 3):
        reference = RDPAccountant()
        reference.history = [(z, 1 / steps, rounds * steps)]
        epsilons.append(reference.get_epsilon(1e-3))
    context.node_config[protocol.DPSGD_MAX_EPSILON] = sum(epsilons) / 2  # between rounds 2, 3
    context.node_config[protocol.DPSGD_DELTA] = 1e-3  # the node's own δ (default 1e-5)
    reply = app(_train_message(reply.content["arrays"], {"server-round": 2}, 2), context)
    assert not reply.has_error(), reply.error.reason
    assert reply.content["metrics"]["client-epsilon"] == pytest.approx(epsilons[0], rel=1e-9)
    history = {p.name: p.read_bytes() for p in tmp_path.glob("*.json")}
    reply = app(_train_message(reply.content["arrays"], {"server-round": 3}, 3), context)
    assert reply.has_error() and "dpsgd-max-epsilon" in reply.error.reason
    assert f"{epsilons[1]:.4g}" in reply.error.reason
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.json")} == history  # not trained
    context.node_config[protocol.DPSGD_MIN_NOISE] = z * 2
    context.node_config[protocol.DPSGD_MAX_EPSILON] = 100.0
    reply = app(_train_message(arrays, {}, 4), context)
    assert reply.has_error() and "dpsgd-min-noise-multiplier" in reply.error.reason


def test_a_dpsgd_floor_without_a_state_dir_trains_nothing():
    """Without state-dir the node's history lives in one Flower run's context.state: a
    server that starts another run would find its ε back at zero (attacker review M2)."""
    cfg = load_config("+experiment=digits_smoke privacy=dpsgd privacy.delta=1e-3 num_rounds=3")
    app = make_client_app(cfg)
    node = {"partition-id": 0, "num-partitions": 3, protocol.DPSGD_MAX_EPSILON: 100.0}
    arrays = ArrayRecord(model_for(cfg).state_dict())
    reply = app(_train_message(arrays, {"server-round": 1}, 1), _context(node))
    assert reply.has_error() and protocol.STATE_DIR in reply.error.reason
