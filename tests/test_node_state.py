"""What a SuperNode keeps and decides itself: DP-SGD history across restarts, its device."""

import json

import pytest
import torch
from conftest import client_message
from flwr.app import ArrayRecord, Context, RecordDict

from lepton_flwr import protocol
from lepton_flwr.apps.client import make_client_app
from lepton_flwr.apps.common import model_for
from lepton_flwr.config import load_config

DPSGD = "+experiment=digits_smoke privacy=dpsgd privacy.delta=1e-3 num_rounds=3 train.batch_size=64"


RUN = "0123456789abcdef0123456789abcdef"  # the run's id, as our strategies send it


def _message(arrays, server_round, **config):
    return client_message(arrays, {"server-round": server_round, **config}, server_round)


def _context(node_config, run_id=1):
    # A fresh context is what a restarted SuperNode gives the ClientApp: empty state.
    config = {"partition-id": 0, "num-partitions": 3, **node_config}
    return Context(run_id=run_id, node_id=1, node_config=config, state=RecordDict(), run_config={})


def _epsilon(reply):
    assert not reply.has_error(), reply.error.reason
    return reply.content["metrics"]["client-epsilon"]


def test_dpsgd_epsilon_survives_a_supernode_restart_with_a_state_dir(tmp_path):
    cfg = load_config(DPSGD)
    app = make_client_app(cfg)
    arrays = ArrayRecord(model_for(cfg).state_dict())
    node = {protocol.STATE_DIR: str(tmp_path / "state")}
    first = app(_message(arrays, 1), _context(node))
    assert not first.has_error(), first.error.reason
    # The SuperNode restarts: its memory (context.state) is gone, the state file is not.
    second = app(_message(first.content["arrays"], 2), _context(node))
    assert not second.has_error(), second.error.reason
    eps = [r.content["metrics"]["client-epsilon"] for r in (first, second)]
    assert eps[1] > eps[0] * 1.2  # continued, not restarted at zero
    files = sorted((tmp_path / "state").iterdir())  # the history and the node's lock on it
    assert [f.name for f in files] == ["dpsgd-flower-1-partition-0.json", "dpsgd-partition-0.lock"]
    assert all(oct(f.stat().st_mode)[-3:] == "600" for f in files)
    # Without a state dir the restart would have started over: the same ε as round 1.
    fresh = app(_message(first.content["arrays"], 2), _context({}))
    assert fresh.content["metrics"]["client-epsilon"] == pytest.approx(eps[0])


def test_a_client_whose_history_cannot_be_read_refuses_to_train(tmp_path):
    cfg = load_config(DPSGD)
    node = {protocol.STATE_DIR: str(tmp_path)}
    (tmp_path / "dpsgd-flower-1-partition-0.json").write_text(json.dumps({"run_id": 1}))
    reply = make_client_app(cfg)(
        _message(ArrayRecord(model_for(cfg).state_dict()), 2), _context(node)
    )
    assert (
        reply.has_error() and "will not train rather than restart its epsilon" in reply.error.reason
    )


def test_a_resumed_run_continues_the_nodes_epsilon_under_a_new_flower_run(tmp_path):
    """A resumed run is a new Flower run: the history is keyed by the server's run id,
    which survives the resume (before: 2.46 reported instead of 3.28)."""
    cfg = load_config(DPSGD)
    app = make_client_app(cfg)
    arrays = ArrayRecord(model_for(cfg).state_dict())
    node = {protocol.STATE_DIR: str(tmp_path / "state")}
    whole = _context({protocol.STATE_DIR: str(tmp_path / "whole")})
    uninterrupted = [
        _epsilon(app(_message(arrays, r, **{"lepton-run-id": RUN}), whole)) for r in (1, 2)
    ]
    first = app(_message(arrays, 1, **{"lepton-run-id": RUN}), _context(node, run_id=1))
    resumed = {"lepton-run-id": RUN, "lepton-resumed-after": 1}
    second = app(_message(arrays, 2, **resumed), _context(node, run_id=2))
    assert [_epsilon(first), _epsilon(second)] == pytest.approx(uninterrupted)
    # A node that keeps no state-dir cannot know what it spent before the resume.
    refused = app(_message(arrays, 2, **resumed), _context({}, run_id=2))
    assert refused.has_error()
    assert "resumes an earlier one, and this node keeps no state-dir" in refused.error.reason
    assert str(tmp_path) not in refused.error.reason  # no node path goes to the server


def test_a_fresh_run_id_every_round_does_not_reset_the_nodes_budget(tmp_path):
    """A server that names a new run every round still meets dpsgd-max-epsilon: the
    node's budget counts every history it keeps."""
    cfg = load_config(DPSGD)
    app = make_client_app(cfg)
    arrays = ArrayRecord(model_for(cfg).state_dict())
    node = {protocol.STATE_DIR: str(tmp_path / "state")}
    one_round = _epsilon(app(_message(arrays, 1, **{"lepton-run-id": "a" * 32}), _context(node)))
    # The node's own δ is the run's here, so that its budget compares with the ε reported.
    floor = {protocol.DPSGD_MAX_EPSILON: one_round * 1.2, protocol.DPSGD_DELTA: 1e-3}
    again = app(_message(arrays, 1, **{"lepton-run-id": "b" * 32}), _context({**node, **floor}))
    assert again.has_error() and "dpsgd-max-epsilon" in again.error.reason
    # The same request to a node that never trained is within that budget.
    fresh = {protocol.STATE_DIR: str(tmp_path / "fresh"), **floor}
    assert _epsilon(app(_message(arrays, 1, **{"lepton-run-id": "b" * 32}), _context(fresh)))


NAN_HISTORY = {"run": RUN, "partition": 0, "history": [[float("nan"), 0.1, 10]]}


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("nan", "cannot be read"),
        ("link", "cannot be read"),
        ("other partition", "cannot be read"),
        ("run id", "run id is not 32 hexadecimal digits"),
    ],
)
def test_a_state_file_that_is_not_this_nodes_history_is_refused(tmp_path, case, reason):
    """A NaN noise multiplier made the client hang in Opacus' accountant; a planted link
    was read through: the node refuses to train, and writes nothing through the link."""
    cfg = load_config(DPSGD)
    state = tmp_path / "state"
    state.mkdir()
    path = state / f"dpsgd-{RUN}-partition-0.json"
    victim = tmp_path / "victim.json"
    victim.write_text(json.dumps({**NAN_HISTORY, "history": []}))
    if case == "nan":
        path.write_text(json.dumps(NAN_HISTORY))
    elif case == "link":
        path.symlink_to(victim)
    elif case == "other partition":
        path.write_text(json.dumps({**NAN_HISTORY, "partition": 1, "history": []}))
    run = "../../x" if case == "run id" else RUN
    node = {protocol.STATE_DIR: str(state), protocol.DPSGD_MAX_EPSILON: 50}
    reply = make_client_app(cfg)(
        _message(ArrayRecord(model_for(cfg).state_dict()), 2, **{"lepton-run-id": run}),
        _context(node),
    )
    assert reply.has_error() and reason in reply.error.reason
    assert "will not train rather than restart its epsilon" in reply.error.reason
    assert json.loads(victim.read_text())["history"] == []


def test_the_node_config_chooses_the_device():
    cfg = load_config("+experiment=digits_smoke device=cuda")  # the run asks for a GPU
    app = make_client_app(cfg)
    arrays = ArrayRecord(model_for(cfg).state_dict())
    reply = app(_message(arrays, 1), _context({protocol.DEVICE: "cpu"}))  # this node has none
    assert not reply.has_error(), reply.error.reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_a_gpu_node_trains_on_its_gpu():
    cfg = load_config("+experiment=digits_smoke")
    app = make_client_app(cfg)
    reply = app(
        _message(ArrayRecord(model_for(cfg).state_dict()), 1), _context({protocol.DEVICE: "cuda"})
    )
    assert not reply.has_error(), reply.error.reason


def test_check_node_names_every_wrong_file_and_setting_before_start(tmp_path):
    from lepton_flwr.cli import main
    from lepton_flwr.deploy import make_certificates, make_node_key
    from lepton_flwr.he import CKKSParams, write_keys

    secret, _ = write_keys(CKKSParams(), tmp_path / "keys")
    certs = make_certificates(tmp_path / "certs", ["127.0.0.1"])
    node_key, _ = make_node_key(tmp_path / "node-keys", "node-0")
    good = (
        f"partition-id=0 num-partitions=2 he-secret-context='{secret}' "
        f"state-dir='{tmp_path / 'state'}' dp-max-clip-norm=1.0 device='cpu'"
    )
    main(
        [
            "check-node",
            "--node-config",
            good,
            "--root-certificates",
            str(certs["ca.crt"]),
            "--auth-key",
            str(node_key),
        ]
    )
    (tmp_path / "garbage.pem").write_text("not a certificate")
    bad = (
        f"partition-id=3 num-partitions=2 he-secret-context='{tmp_path / 'missing.ctx'}' "
        f"data-root='{tmp_path / 'nowhere'}' dp-max-clip-norm='big' device='tpu'"
    )
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "check-node",
                "--node-config",
                bad,
                "--root-certificates",
                str(tmp_path / "garbage.pem"),
                "--auth-key",
                str(certs["ca.crt"]),
            ]
        )
    message = str(stop.value)
    for expected in (
        "partition-id=3 is not in [0, 2)",
        f"he-secret-context={tmp_path / 'missing.ctx'}",
        f"data-root={tmp_path / 'nowhere'}: no such folder",
        "dp-max-clip-norm='big' is not a finite number",
        "device=tpu",
        f"root certificates {tmp_path / 'garbage.pem'}",
        f"auth key {certs['ca.crt']}",
    ):
        assert expected in message, message
