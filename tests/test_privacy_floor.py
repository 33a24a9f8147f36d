"""A node's privacy floor is default-deny (issue 18, item 4).

Before: a node that set ``dp-max-clip-norm`` or a DP-SGD limit still served a server that
asked for no DP at all (plaintext FedAvg got the plaintext update, HE-FedAvg the unclipped
update encrypted, an HE + DP message without the noise-share key the raw update), a
reproducible DP-SGD request passed the ε check, and the node's ε was computed at the
launcher's δ.
"""

import numpy as np
import pytest
from conftest import client_message
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lepton_flwr import protocol
from lepton_flwr.apps.client import make_client_app
from lepton_flwr.apps.common import model_for
from lepton_flwr.config import load_config
from lepton_flwr.he import CKKSParams, create_secret_context, secret_context_bytes
from lepton_flwr.mods import dp_share_mod, he_dp_mod, make_he_mod, privacy_floor_mod

SHARE_FLOORS = [{protocol.MAX_CLIP_NORM: 1.0}, {protocol.MIN_SHARE_NOISE: 0.0}]
NODE = {protocol.PARTITION_ID: 0, protocol.NUM_PARTITIONS: 3}


def _context(node_config):
    return Context(
        run_id=1, node_id=1, node_config=dict(node_config), state=RecordDict(), run_config={}
    )


def _user_app(mods, trained):
    """A user's ClientApp: adds 0.5 to every weight and notes that it trained."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg, context):
        trained.append(True)
        new = {k: Array(v.numpy() + 0.5) for k, v in msg.content["arrays"].items()}
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": metrics}), reply_to=msg)

    return app


def _weights():
    return ArrayRecord({"w": Array(np.zeros(5, dtype=np.float32))})


HEFEDAVG_REQUEST = {protocol.SERVER_ROUND: 1, protocol.VALUE_BOUND: 100.0}
SHARE_REQUEST = {
    protocol.SERVER_ROUND: 1,
    protocol.CLIPPING_NORM: 1.0,
    protocol.NOISE_SHARE_STD: 1.0,
    protocol.UPDATE_SCALE: 1.0,
    protocol.SHARE_BOUND: 1e3,
}


@pytest.fixture(scope="module")
def key_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "secret.ctx"
    path.write_bytes(secret_context_bytes(create_secret_context(CKKSParams())))
    return path


@pytest.mark.parametrize("floor", SHARE_FLOORS)
@pytest.mark.parametrize(
    ("mods", "request_config"),
    [
        (["floor"], {}),  # plaintext FedAvg
        (["dp_share"], {}),
        (["he"], HEFEDAVG_REQUEST),  # HE-FedAvg: the unclipped update, encrypted
        (["floor", "he"], HEFEDAVG_REQUEST),
    ],
)
def test_a_node_with_a_share_floor_refuses_requests_without_noise(
    key_path, floor, mods, request_config
):
    trained = []
    named = {
        "floor": privacy_floor_mod,
        "dp_share": dp_share_mod,
        "he": make_he_mod(key_path, workers=1),
    }
    app = _user_app([named[m] for m in mods], trained)
    reply = app(client_message(_weights(), request_config), _context(floor))
    assert reply.has_error() and "noise share" in reply.error.reason
    assert next(iter(floor)) in reply.error.reason and not trained


def test_he_dp_mod_never_encrypts_an_update_without_a_noise_share():
    """Even on a node without any floor: he_dp_mod exists to send noise shares only."""
    trained = []
    reply = _user_app([he_dp_mod], trained)(client_message(_weights(), {}), _context({}))
    assert reply.has_error() and "he_dp_mod never encrypts" in reply.error.reason
    assert not trained


def test_the_floor_mod_sends_only_noise_shares():
    """A request that asks for a share, on an app where no dp_share_mod makes one."""
    trained = []
    app = _user_app([privacy_floor_mod], trained)
    reply = app(client_message(_weights(), SHARE_REQUEST), _context(SHARE_FLOORS[0]))
    assert reply.has_error() and "only noise shares" in reply.error.reason
    assert trained  # it trained, but nothing of it left the node


def test_a_share_that_meets_the_floor_passes():
    trained = []
    app = _user_app([privacy_floor_mod, dp_share_mod], trained)
    reply = app(client_message(_weights(), SHARE_REQUEST), _context(SHARE_FLOORS[0]))
    assert not reply.has_error(), reply.error.reason
    assert reply.content["metrics"][protocol.DP_SHARE_STD] == 1.0


def test_a_node_without_a_floor_serves_every_strategy():
    trained = []
    reply = _user_app([privacy_floor_mod], trained)(client_message(_weights(), {}), _context({}))
    assert not reply.has_error() and trained


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (protocol.MAX_CLIP_NORM, -1),
        (protocol.MAX_CLIP_NORM, 0),
        (protocol.MIN_SHARE_NOISE, -0.5),
        (protocol.DPSGD_MAX_EPSILON, 0),
        (protocol.DPSGD_MIN_NOISE, -1),
        (protocol.DPSGD_DELTA, 1.5),
    ],
)
def test_a_meaningless_floor_setting_is_refused(key, value):
    trained = []
    app = _user_app([privacy_floor_mod, dp_share_mod], trained)
    reply = app(client_message(_weights(), SHARE_REQUEST), _context({key: value}))
    if key in (protocol.MAX_CLIP_NORM, protocol.MIN_SHARE_NOISE):
        assert reply.has_error() and f"{key}={value:g} is not in" in reply.error.reason
        assert not trained
    else:  # DP-SGD settings: checked where DP-SGD runs (below)
        config = load_config("+experiment=digits_smoke privacy=dpsgd")
        app = make_client_app(config)
        message = client_message(ArrayRecord(model_for(config).state_dict()), {"server-round": 1})
        reply = app(message, _context({**NODE, key: value}))
        assert reply.has_error() and f"{key}={value:g} is not in" in reply.error.reason


@pytest.mark.parametrize(
    "overrides",
    ["strategy=fedavg privacy=none", "strategy=dp_fedavg privacy=client_dp"],
)
@pytest.mark.parametrize("floor", [*SHARE_FLOORS, {protocol.DPSGD_MAX_EPSILON: 5.0}])
def test_our_client_app_refuses_a_run_below_the_nodes_floor(overrides, floor):
    """Through the ClientApp every run uses: the server chose no DP, the node said no."""
    config = load_config(f"+experiment=digits_smoke {overrides}")
    app = make_client_app(config)
    message = client_message(ArrayRecord(model_for(config).state_dict()), {"server-round": 1})
    reply = app(message, _context({**NODE, **floor}))
    assert reply.has_error() and next(iter(floor)) in reply.error.reason


def test_a_dpsgd_floor_refuses_reproducible_noise():
    config = load_config("+experiment=digits_smoke privacy=dpsgd privacy.reproducible=true")
    app = make_client_app(config)
    message = client_message(ArrayRecord(model_for(config).state_dict()), {"server-round": 1})
    reply = app(message, _context({**NODE, protocol.DPSGD_MAX_EPSILON: 100.0}))
    assert reply.has_error() and "reproducible" in reply.error.reason


def test_the_nodes_epsilon_is_at_its_own_delta_not_the_launchers(tmp_path):
    """A launcher's large δ makes ε small; the node computes its ε at its own δ."""
    config = load_config(
        "+experiment=digits_smoke privacy=dpsgd privacy.delta=2e-3 privacy.noise_multiplier=1.0"
    )
    app = make_client_app(config)
    message = client_message(ArrayRecord(model_for(config).state_dict()), {"server-round": 1})
    plain = _context(NODE)
    state = {protocol.STATE_DIR: str(tmp_path / "state")}  # a floor needs one
    reply = app(message, plain)
    assert not reply.has_error(), reply.error.reason
    at_launchers_delta = reply.content["metrics"][protocol.CLIENT_EPSILON]
    limit = at_launchers_delta * 1.2  # passes at δ = 2e-3, not at the node's δ = 1e-5
    reply = app(message, _context({**NODE, **state, protocol.DPSGD_MAX_EPSILON: limit}))
    assert reply.has_error() and "dpsgd-max-epsilon" in reply.error.reason
    own_delta = {**NODE, **state, protocol.DPSGD_MAX_EPSILON: limit, protocol.DPSGD_DELTA: 2e-3}
    assert not app(message, _context(own_delta)).has_error()


def _evaluating_app(mods, evaluated):
    app = ClientApp(mods=mods)

    @app.evaluate()
    def evaluate(msg, context):
        evaluated.append(True)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    return app


@pytest.mark.parametrize(
    ("node_config", "answers"),
    [
        ({}, True),
        ({protocol.MAX_CLIP_NORM: 1.0}, False),
        ({protocol.DPSGD_MAX_EPSILON: 3.0}, False),
        ({protocol.MAX_CLIP_NORM: 1.0, protocol.ALLOW_EVALUATION: "true"}, True),
        ({protocol.ALLOW_EVALUATION: False}, False),
        ({protocol.ALLOW_EVALUATION: "maybe"}, False),
    ],
)
def test_evaluation_is_refused_under_a_floor_unless_the_node_opts_in(node_config, answers):
    """Before: a node with a floor answered evaluation of any plaintext model: ten bias-only
    models gave the node's exact test-label histogram."""
    evaluated = []
    app = _evaluating_app([privacy_floor_mod], evaluated)
    reply = app(client_message(_weights(), {}, 1, "evaluate"), _context(node_config))
    assert reply.has_error() != answers and bool(evaluated) == answers


@pytest.mark.parametrize("raw", ["", True, "1_0", "\u0661", "0x10", " ", "nan", "inf"])
def test_a_floor_value_is_a_plain_number_or_refused(raw):
    """Before: '' turned the floor off; True, '1_0' and Arabic-Indic digits were numbers."""
    trained = []
    app = _user_app([privacy_floor_mod, dp_share_mod], trained)
    reply = app(client_message(_weights(), SHARE_REQUEST), _context({protocol.MAX_CLIP_NORM: raw}))
    assert reply.has_error() and "is not a finite number" in reply.error.reason
    assert not trained
