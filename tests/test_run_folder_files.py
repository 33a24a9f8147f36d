"""A run folder's files are never written or read through a link planted there (issue 18)."""

import json

import pytest
import torch

from lepton_flwr.apps.common import resumed_config
from lepton_flwr.config import ConfigError
from lepton_flwr.files import UnsafeFileError
from lepton_flwr.he.codec import TensorSpec
from lepton_flwr.he.records import EncryptedModel, save_encrypted
from lepton_flwr.results import RunRecorder

WRITTEN = (
    "config.yaml",
    "metrics.jsonl",
    "metrics.csv",
    "summary.json",
    "model.pt",
    "metrics.png",
    "model.ckks.zip",
)


def _row(server_round, **extra):
    return {"round": server_round, "round_seconds": 1.0, "bytes_down": 1, "bytes_up": 1, **extra}


def test_files_planted_as_links_are_replaced_and_their_targets_untouched(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    victims = {}
    for name in WRITTEN:
        victims[name] = tmp_path / f"victim-{name}"
        victims[name].write_text("keep me")
        (run / name).symlink_to(victims[name])
    recorder = RunRecorder(run, {"num_rounds": 1})
    recorder.record(_row(1, central_loss=0.5))
    recorder.save_model({"w": torch.ones(1)})
    recorder.plot()
    recorder.write_summary()
    recorder.close()
    encrypted = EncryptedModel([TensorSpec("w", (1,), "float32")], [b"ct"], 1.0, "f", 1.0)
    save_encrypted(encrypted, run / "model.ckks.zip")
    for name in WRITTEN:
        assert victims[name].read_text() == "keep me", name
        assert not (run / name).is_symlink() and (run / name).stat().st_size > 0, name


def test_a_log_planted_as_a_link_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "victim.log").write_text("keep me")
    (run / "run.log").symlink_to(tmp_path / "victim.log")
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        RunRecorder(run, {"num_rounds": 1})
    assert (tmp_path / "victim.log").read_text() == "keep me"


def test_resumed_rows_are_read_without_links_and_checked(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text(json.dumps(_row(1)) + "\n")
    (run / "metrics.jsonl").symlink_to(elsewhere)
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        RunRecorder(run, {"num_rounds": 2}, resume_after=1)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").write_text(json.dumps(_row(1)) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match="metrics.jsonl, line 2: not a row"):
        RunRecorder(run, {"num_rounds": 2}, resume_after=1)


def test_a_dpsgd_summary_holds_the_largest_client_epsilon(tmp_path):
    """Each client's ε is cumulative; a client absent from the last round may hold the max."""
    recorder = RunRecorder(tmp_path / "run", {"num_rounds": 3})
    for server_round, epsilon in ((1, 1.5), (2, 2.5), (3, 2.0)):
        recorder.record(_row(server_round, client_epsilon=epsilon))
    summary = recorder.write_summary({"epsilon_unit": "example"})
    recorder.close()
    assert summary["client_epsilon"] == 2.5
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["client_epsilon"] == 2.5


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("link", "symbolic link"),
        ("num_rounds: ${oc.env:HOME}\n", "holds an interpolation at num_rounds"),
        ("- a list\n", "is not a run's config"),
        ("seed: 1\n", "is not a run's config"),
        ("a: [unclosed\n", "cannot be read"),
    ],
)
def test_a_saved_config_is_read_as_plain_values_without_links(tmp_path, content, reason):
    run = tmp_path / "run"
    run.mkdir()
    if content == "link":
        (tmp_path / "real.yaml").write_text("num_rounds: 2\n")
        (run / "config.yaml").symlink_to(tmp_path / "real.yaml")
    else:
        (run / "config.yaml").write_text(content)
    with pytest.raises(ConfigError, match=reason):
        resumed_config({"resume": str(run), "num_rounds": 2}, take_saved=True)


def test_a_dpsgd_runs_summary_states_the_clients_largest_epsilon(tmp_path):
    """Before, a DP-SGD run's summary.json held no ε at all."""
    from lepton_flwr.apps.client import make_client_app
    from lepton_flwr.apps.inprocess import InProcessGrid
    from lepton_flwr.apps.server import run_server
    from lepton_flwr.config import load_config

    cfg = load_config(
        "+experiment=digits_smoke privacy=dpsgd privacy.delta=1e-3 num_rounds=2 "
        f"train.batch_size=64 output_dir={tmp_path / 'run'}"
    )
    run_server(InProcessGrid(make_client_app(cfg), 3), cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["client_epsilon"] == max(row["client_epsilon"] for row in rows) > 0
    assert summary["client_delta"] == 1e-3
    assert summary["epsilon_unit"].startswith("example")
