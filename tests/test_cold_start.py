"""What a fresh ClientApp process imports: only what the message it handles needs.

A SuperNode starts a fresh ``flwr-clientapp`` process for every message, so every import
at module level is paid per message. Each check runs in a fresh interpreter and reads
``sys.modules``; none times anything.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

from lepton_flwr.data.partition import iid_shards

TRAINING_STACK = ("torch", "opacus", "kymatio", "sklearn", "scipy.stats", "dp_accounting")
DATA_STACK = ("sklearn", "datasets", "flwr_datasets", "pandas", "matplotlib")


def _fresh(code: str) -> list[str]:
    """The modules among TRAINING_STACK + DATA_STACK a fresh process has after ``code``."""
    watched = sorted(set(TRAINING_STACK + DATA_STACK))
    probe = (
        f"{code}\nimport sys, json\nprint(json.dumps([m for m in {watched!r} if m in sys.modules]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _handled(folder, write: str) -> dict:
    """Write a message into ``folder`` with the benchmark's ``write`` (a call, ``folder``
    bound), then handle it in a fresh process (the benchmark's child)."""
    setup = (
        "from pathlib import Path\nfrom simulations.bench_cold_start import *\n"
        f"folder = Path({str(folder)!r})\n{write}"
    )
    subprocess.run([sys.executable, "-c", setup], cwd=REPO_ROOT, check=True, capture_output=True)
    done = subprocess.run(
        [sys.executable, "-m", "simulations.bench_cold_start", "--handle", str(folder)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_client_app_imports_no_training_or_data_library():
    assert _fresh("import lepton_flwr.apps.client") == []


def test_the_public_import_paths_import_no_training_library():
    # The package inits a ClientApp goes through; the strategies are the server's.
    code = "import lepton_flwr.models, lepton_flwr.data, lepton_flwr.mods, lepton_flwr.apps.build"
    assert _fresh(code) == []


def test_checking_a_config_imports_no_training_library():
    # Every model and strategy name is checked (the catalogue, not the classes).
    code = (
        "from lepton_flwr.config import load_run_config\n"
        "load_run_config('+experiment=digits_smoke model=logreg strategy=he_dp_fedavg "
        "privacy.sampling=fixed privacy.sample_rate=1.0 privacy.delta=1e-3', False)"
    )
    assert _fresh(code) == []


def test_a_secure_aggregation_stage_is_answered_without_torch_data_or_model(tmp_path):
    # The node config names a key that is not there: the stage never reads it.
    result = _handled(tmp_path, "write_stage_message(folder, folder / 'no-such-secret.ctx')")
    assert result["reply"] == ["lepton-secagg"]  # he_mod's answer, not a handler's
    assert result["imported"] == []


def test_a_digits_logreg_training_message_imports_torch_and_sklearn_only(tmp_path):
    result = _handled(tmp_path, "write_train_message(folder)")
    assert result["reply"] == ["arrays", "metrics"]
    # torch (and its _dynamo, which torch.optim imports) and scikit-learn's digits, with
    # the SciPy and pandas scikit-learn imports; nothing for DP-SGD, scattering or HF.
    assert set(result["imported"]) <= {"torch", "torch._dynamo", "sklearn", "scipy.stats", "pandas"}
    assert "torch" in result["imported"] and "sklearn" in result["imported"]


def test_the_model_catalogue_names_models_without_importing_them():
    code = (
        "from lepton_flwr.models import MODELS, model_supports\n"
        "assert list(MODELS) == ['linreg', 'logreg', 'mlp', 'cnn', 'scatnet'], list(MODELS)\n"
        "assert 'cnn' in MODELS and 'resnet' not in MODELS and len(MODELS) == 5\n"
        "assert model_supports('logreg', 'regression', False)"
    )
    assert _fresh(code) == []


def test_the_model_catalogue_looks_classes_up_in_nets():
    from lepton_flwr.models import MODELS, nets

    assert MODELS["cnn"] is nets.CNN and MODELS["scatnet"] is nets.ScatterNet
    assert dict(MODELS) == {
        "linreg": nets.LinearRegression,
        "logreg": nets.LogisticRegression,
        "mlp": nets.MLP,
        "cnn": nets.CNN,
        "scatnet": nets.ScatterNet,
    }
    with pytest.raises(KeyError):
        MODELS["resnet"]


def test_the_catalogue_names_the_cnn_activations_nets_has():
    from lepton_flwr.models import catalogue, nets

    assert tuple(nets.ACTIVATIONS) == catalogue.ACTIVATION_NAMES


@pytest.mark.parametrize(
    ("rows", "partitions"),
    [(1, 1), (2, 2), (7, 3), (10, 10), (100, 7), (383, 4), (1437, 3), (1437, 100), (5000, 9)],
)
def test_iid_shards_are_flwr_datasets_iid_partitions(rows, partitions):
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    partitioner = IidPartitioner(num_partitions=partitions)
    partitioner.dataset = Dataset.from_dict({"row": np.arange(rows)})
    expected = [list(partitioner.load_partition(i)["row"]) for i in range(partitions)]
    shards = iid_shards(rows, partitions)
    assert [s.tolist() for s in shards] == expected
    assert all(s.dtype == np.int64 for s in shards)
