"""What a fresh ClientApp process imports: only what the message it handles needs.

A SuperNode starts a fresh ``flwr-clientapp`` process for every message, so every import
at module level is paid per message. Each check runs in a fresh interpreter and reads
``sys.modules``; none times anything.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

from lepton_flwr.data.dataset_cache import DATA_CACHE_ENV
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


def _write(folder, write: str) -> None:
    """Write a message into ``folder`` with the benchmark's ``write`` (a call, ``folder``
    bound)."""
    setup = (
        "from pathlib import Path\nfrom simulations.bench_cold_start import *\n"
        f"folder = Path({str(folder)!r})\n{write}"
    )
    subprocess.run([sys.executable, "-c", setup], cwd=REPO_ROOT, check=True, capture_output=True)


def _handle(folder, data_cache="", before: bool = False) -> dict:
    """Handle the message in ``folder`` in a fresh process (the benchmark's child).

    ``data_cache``: the dataset cache folder (``LEPTON_FLWR_DATA_CACHE``; empty: none).
    ``before``: train with ``torch.optim.SGD``, as before ``EagerSGD``.
    """
    argv = [sys.executable, "-m", "simulations.bench_cold_start", "--handle", str(folder)]
    env = {**os.environ, DATA_CACHE_ENV: str(data_cache)}
    done = subprocess.run(
        [*argv, *(["--before"] if before else [])],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _handled(folder, write: str, data_cache="") -> dict:
    """Write a message into ``folder`` (see :func:`_write`), then handle it (:func:`_handle`)."""
    _write(folder, write)
    return _handle(folder, data_cache)


def test_importing_the_client_app_imports_no_training_or_data_library():
    assert _fresh("import lepton_flwr.apps.client") == []


def test_the_public_import_paths_import_no_training_library():
    # The package inits a ClientApp goes through; the strategies are the server's.
    code = "import lepton_flwr.models, lepton_flwr.data, lepton_flwr.mods, lepton_flwr.apps.build"
    assert _fresh(code) == []


@pytest.mark.parametrize(
    "overrides",
    [
        "+experiment=digits_smoke model=logreg strategy=he_dp_fedavg privacy.sampling=fixed "
        "privacy.sample_rate=1.0 privacy.delta=1e-3",
        # The cnn's activations, the scatnet's shapes and DP-SGD's modes are checked by name.
        "model=cnn",
        "dataset=fashion_mnist model=scatnet",
        "privacy=dpsgd",
    ],
)
def test_checking_a_config_imports_no_training_library(overrides):
    # Every model and strategy name is checked (the catalogue, not the classes).
    code = f"from lepton_flwr.config import load_run_config\nload_run_config({overrides!r}, False)"
    assert _fresh(code) == []


def test_config_names_the_dpsgd_modes_dpsgd_has():
    from lepton_flwr.config import DPSGD_MODES
    from lepton_flwr.dp.dpsgd import MODES

    assert DPSGD_MODES == MODES


def test_a_secure_aggregation_stage_is_answered_without_torch_data_or_model(tmp_path):
    # The node config names a key that is not there: the stage never reads it.
    result = _handled(tmp_path, "write_stage_message(folder, folder / 'no-such-secret.ctx')")
    assert result["reply"] == ["lepton-secagg"]  # he_mod's answer, not a handler's
    assert result["imported"] == []


@pytest.fixture(scope="module")
def train_message(tmp_path_factory):
    """The benchmark's digits / logreg training message, written once for this module."""
    folder = tmp_path_factory.mktemp("train-message")
    _write(folder, "write_train_message(folder)")
    return folder


def test_a_digits_training_message_reads_the_split_from_the_cache_without_sklearn(
    train_message, tmp_path
):
    # The cache is empty: filled now (in the folder the benchmark names by DATA_CACHE_ENV).
    first = _handle(train_message, tmp_path / "cache")
    assert "sklearn" in first["imported"]
    assert [p.name.startswith("digits-") for p in (tmp_path / "cache").iterdir()] == [True]
    second = _handle(train_message, tmp_path / "cache")
    assert second["reply"] == ["arrays", "metrics"]
    # torch (and, until train uses EagerSGD, torch._dynamo): no scikit-learn, SciPy stats,
    # pandas, nor anything for DP-SGD, scattering or HF.
    assert set(second["imported"]) <= {"torch", "torch._dynamo"}
    assert "torch" in second["imported"]
    assert second["arrays_digest"] == first["arrays_digest"]


def test_without_a_dataset_cache_scikit_learn_loads_the_digits(train_message):
    result = _handle(train_message, data_cache="")
    assert "sklearn" in result["imported"]


def test_the_reply_is_bit_for_bit_the_one_before_eager_sgd_and_the_dataset_cache(
    train_message, tmp_path
):
    before = _handle(train_message, data_cache="", before=True)
    assert before["eager_sgd"] is False and "torch._dynamo" in before["imported"]
    _handle(train_message, tmp_path)  # fills the cache
    after = _handle(train_message, tmp_path)
    assert after["arrays_digest"] == before["arrays_digest"]
    assert after["arrays_digest"] is not None


def test_a_digits_training_message_imports_torch_alone(train_message, tmp_path):
    _handle(train_message, tmp_path)  # fills the cache
    result = _handle(train_message, tmp_path)
    assert result["eager_sgd"] is True
    assert result["imported"] == ["torch"]  # no torch._dynamo: EagerSGD, not torch.optim


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
