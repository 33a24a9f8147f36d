"""A stock Flower app adds HE, DP or HE + DP with the own-app guide's few lines, under `flwr run`.

The test writes a quickstart-style Flower 1.42 app (its own model, data from
``load_digits``, ``strategy.start`` with an ``evaluate_fn`` in the ServerApp,
``@app.train``/``@app.evaluate`` handlers) into a temporary folder, applies the lines
that docs/guides/own-app.md changes for each variant, and runs it.
It uses only the public API.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from test_end_to_end import _env, _free_port, _stop_processes

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "digitsapp"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "digitsapp.server_app:app"
clientapp = "digitsapp.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 3
out-dir = ""
"""

TASK = '''\
"""Model and data: a linear classifier on scikit-learn's digits."""

import torch
from sklearn.datasets import load_digits
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x)


def load_data(partition_id=None, num_partitions=None):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    train, test = slice(0, 1400), slice(1400, None)
    if partition_id is None:
        return x[test], y[test]
    part = slice(partition_id, 1400, num_partitions)
    return x[train][part], y[train][part]


def train(model, x, y, epochs=5, lr=0.5):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        for start in range(0, len(y), 32):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[start:start + 32]), y[start:start + 32])
            loss.backward()
            optimizer.step()
    return float(loss)


def test(model, x, y):
    with torch.no_grad():
        logits = model(x)
    loss = float(nn.functional.cross_entropy(logits, y))
    return loss, float((logits.argmax(1) == y).float().mean())
'''

CLIENT_APP = '''\
"""ClientApp: local training and evaluation."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from digitsapp.task import Net, load_data, test, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    loss = train(model, x, y)
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(y)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    loss, accuracy = test(model, x, y)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(y)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
'''

SERVER_APP = '''\
"""ServerApp: Flower's FedAvg and its own round loop."""

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from digitsapp.task import Net, load_data, test

app = ServerApp()


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    model = Net()
    model.load_state_dict(arrays.to_torch_state_dict())
    loss, accuracy = test(model, *load_data())
    return MetricRecord({"loss": loss, "accuracy": accuracy})


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(context.run_config["out-dir"])
    strategy = FedAvg(fraction_train=1.0, min_available_nodes=3)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(Net().state_dict()),
        num_rounds=context.run_config["num-server-rounds"],
        evaluate_fn=central_evaluate,
    )
    torch.save(result.arrays.to_torch_state_dict(), out / "model.pt")
    train_metrics = {r: dict(m) for r, m in result.train_metrics_clientapp.items()}
    (out / "train_metrics.json").write_text(json.dumps(train_metrics))
'''

# The lines docs/guides/own-app.md changes, per variant (README.md shows HE + DP's):
# (file, old text, new text).
CLIENT_IMPORT = "from flwr.clientapp import ClientApp"
SERVER_IMPORT = "from flwr.serverapp.strategy import FedAvg"
FEDAVG = "strategy = FedAvg(fraction_train=1.0, min_available_nodes=3)"
SAVE = 'torch.save(result.arrays.to_torch_state_dict(), out / "model.pt")'
SAVE_ENCRYPTED = 'save_encrypted_arrays(result.arrays, out / "model.ckks.zip")'
KEYS_IN_RUN_CONFIG = 'out-dir = ""\nhe-secret-context = ""\nhe-public-context = ""'
CHANGES = {
    "he": [
        ("client_app.py", CLIENT_IMPORT, CLIENT_IMPORT + "\nfrom lepton_flwr.mods import he_mod"),
        ("client_app.py", "app = ClientApp()", "app = ClientApp(mods=[he_mod])"),
        (
            "server_app.py",
            SERVER_IMPORT,
            SERVER_IMPORT + "\nfrom lepton_flwr.he import "
            "save_encrypted_arrays\nfrom lepton_flwr.strategies import HEFedAvg",
        ),
        (
            "server_app.py",
            FEDAVG,
            'strategy = HEFedAvg(context.run_config["he-public-context"], '
            "fraction_train=1.0, min_available_nodes=3)",
        ),
        ("server_app.py", SAVE, SAVE_ENCRYPTED),
        ("pyproject.toml", 'out-dir = ""', KEYS_IN_RUN_CONFIG),
    ],
    "dp": [
        (
            "server_app.py",
            SERVER_IMPORT,
            SERVER_IMPORT + "\nfrom lepton_flwr.strategies import DPFedAvg",
        ),
        (
            "server_app.py",
            FEDAVG,
            "strategy = DPFedAvg(noise_multiplier=0.1, clip_norm=2.0, "
            'sample_rate=1.0, sampling="fixed", delta=1e-3, min_available_nodes=3)',
        ),
    ],
    "he_dp": [
        (
            "client_app.py",
            CLIENT_IMPORT,
            CLIENT_IMPORT + "\nfrom lepton_flwr.mods import he_dp_mod",
        ),
        ("client_app.py", "app = ClientApp()", "app = ClientApp(mods=[he_dp_mod])"),
        (
            "server_app.py",
            SERVER_IMPORT,
            SERVER_IMPORT + "\nfrom lepton_flwr.he import "
            "save_encrypted_arrays\nfrom lepton_flwr.strategies import HEDPFedAvg",
        ),
        (
            "server_app.py",
            FEDAVG,
            'strategy = HEDPFedAvg(context.run_config["he-public-context"], '
            'noise_multiplier=0.1, clip_norm=2.0, sample_rate=1.0, sampling="fixed", delta=1e-3, '
            "min_available_nodes=3)",
        ),
        ("server_app.py", SAVE, SAVE_ENCRYPTED),
        ("pyproject.toml", 'out-dir = ""', KEYS_IN_RUN_CONFIG),
    ],
}


def write_app(folder: Path, variant: str) -> Path:
    """The quickstart app with the variant's changes applied; fails if a line is missing."""
    files = {
        "pyproject.toml": PYPROJECT,
        "digitsapp/__init__.py": "",
        "digitsapp/task.py": TASK,
        "digitsapp/client_app.py": CLIENT_APP,
        "digitsapp/server_app.py": SERVER_APP,
    }
    for name, old, new in CHANGES[variant]:
        key = name if name == "pyproject.toml" else f"digitsapp/{name}"
        assert files[key].count(old) == 1, (variant, name, old)
        files[key] = files[key].replace(old, new)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def _accuracy(state_dict) -> float:
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[1400:] / 16.0, dtype=torch.float32)
    logits = x @ state_dict["fc.weight"].T + state_dict["fc.bias"]
    return float((logits.argmax(1) == torch.tensor(y[1400:])).float().mean())


def _shown_lines(variant: str) -> list[str]:
    """A variant's added lines as a guide shows them: the strategies by name only."""
    shown = []
    for _, old, new in CHANGES[variant]:
        for line in new.splitlines():
            if line in old.splitlines() or "out-dir" in line:
                continue  # the app's own lines, kept
            shown.append(line.split("(")[0] if line.startswith("strategy = ") else line)
    return shown


@pytest.mark.parametrize("variant", sorted(CHANGES))
def test_the_own_app_guide_shows_the_lines_this_test_applies(variant):
    """Imports, mods and saving verbatim; the strategies by name (the values differ)."""
    guide = (REPO_ROOT / "docs" / "guides" / "own-app.md").read_text()
    for line in _shown_lines(variant):
        assert line.strip() in guide, line


def test_the_readme_shows_the_lines_this_test_applies_for_he_dp():
    """The README's minimal drop-in is the HE + DP variant, line for line."""
    readme = (REPO_ROOT / "README.md").read_text()
    for line in _shown_lines("he_dp"):
        assert line.strip() in readme, line


@pytest.mark.slow
def test_the_readme_lines_add_he_dp_and_he_dp_to_a_stock_flower_app(tmp_path):
    import torch

    from lepton_flwr.he import decrypt_arrays

    keys = tmp_path / "keys"
    subprocess.run(
        [str(Path(sys.executable).parent / "lepton-flwr"), "keygen", "--out", str(keys)],
        check=True,
    )
    http_port, control_port = _free_port(), _free_port()
    env = _env(
        FLWR_HOME=str(tmp_path / "flwr-home"),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
    )

    def flwr_run(app: Path, run_config: str) -> tuple[int, str]:
        """`flwr run <app> --stream` on 3 simulated SuperNodes: exit status and log."""
        proc = subprocess.run(
            [
                str(Path(sys.executable).parent / "flwr"),
                "run",
                str(app),
                "--stream",
                "--run-config",
                run_config,
                "--federation-config",
                "num-supernodes=3 client-resources-num-cpus=1",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        return proc.returncode, proc.stdout + proc.stderr

    try:
        for variant in ("he", "dp", "he_dp"):
            app = write_app(tmp_path / variant, variant)
            out = tmp_path / f"{variant}-out"
            out.mkdir()
            run_config = f"out-dir='{out}'"
            if variant != "dp":
                run_config += (
                    f" he-secret-context='{keys / 'secret.ctx'}'"
                    f" he-public-context='{keys / 'public.ctx'}'"
                )
            returncode, log = flwr_run(app, run_config)
            assert returncode == 0, log[-4000:]
            assert (out / "train_metrics.json").is_file(), f"{variant}: {log[-4000:]}"
            metrics = json.loads((out / "train_metrics.json").read_text())
            assert sorted(metrics) == ["1", "2", "3"], (variant, metrics)
            if variant == "he":
                assert log.count("server-side evaluate_fn skipped") == 1
            if variant in ("dp", "he_dp"):  # ε per round, in the Result
                epsilons = [metrics[r]["epsilon"] for r in ("1", "2", "3")]
                assert 0 < epsilons[0] < epsilons[1] < epsilons[2], epsilons
                assert all(metrics[r]["delta"] == 1e-3 for r in metrics)
            if variant == "dp":
                accuracy = _accuracy(torch.load(out / "model.pt"))
            else:
                state = decrypt_arrays(out / "model.ckks.zip", keys / "secret.ctx")
                accuracy = _accuracy(state.to_torch_state_dict())
            assert accuracy > (0.85 if variant == "he" else 0.5), (variant, accuracy)
            assert np.isfinite(accuracy)
        # The HE app without its secret context: the run stops after round 1 and says why
        # (issue 21: it used to run all 3 rounds first; Flower's `flwr run --stream` itself
        # exits 0 for a failed run; its log says so).
        out = tmp_path / "no-key-out"
        out.mkdir()
        run_config = f"out-dir='{out}' he-public-context='{keys / 'public.ctx'}'"
        log = flwr_run(tmp_path / "he", run_config)[1]
        stopped = "stopped after round 1: every reply failed for the same configuration "
        assert stopped in log, log[-4000:]
        assert "mistake (no secret context" in log and "[ROUND 2/3]" not in log
        assert "no CKKS secret context given" in log and "--node-config" in log
        assert not (out / "model.ckks.zip").exists()
    finally:
        _stop_processes(f"flower-superlink.*--port {http_port}")
