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


def _message(arrays, server_round):
    return client_message(arrays, {"server-round": server_round}, server_round)


def _context(node_config):
    # A fresh context is what a restarted SuperNode gives the ClientApp: empty state.
    config = {"partition-id": 0, "num-partitions": 3, **node_config}
    return Context(run_id=1, node_id=1, node_config=config, state=RecordDict(), run_config={})


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
    files = list((tmp_path / "state").iterdir())
    assert len(files) == 1 and oct(files[0].stat().st_mode)[-3:] == "600"
    # Without a state dir the restart would have started over: the same ε as round 1.
    fresh = app(_message(first.content["arrays"], 2), _context({}))
    assert fresh.content["metrics"]["client-epsilon"] == pytest.approx(eps[0])


def test_a_client_whose_history_cannot_be_read_refuses_to_train(tmp_path):
    cfg = load_config(DPSGD)
    node = {protocol.STATE_DIR: str(tmp_path)}
    (tmp_path / "dpsgd-run-1-node-1.json").write_text(json.dumps({"run_id": 1}))
    reply = make_client_app(cfg)(
        _message(ArrayRecord(model_for(cfg).state_dict()), 2), _context(node)
    )
    assert (
        reply.has_error() and "will not train rather than restart its epsilon" in reply.error.reason
    )


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
